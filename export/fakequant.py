"""Simulated post-training quantization of a Keras model (fake-quant), after Xia et al. (Guoxoug/PTQ-acc-cal).

What is quantized, and how:
- Weights of every Conv1D/Conv2D/Conv3D, DepthwiseConv2D and Dense layer: per-output-channel symmetric,
  `bits` bits, narrow range: q = clip(round(w / s_c), -(2^(b-1) - 1), 2^(b-1) - 1), s_c = max|w_c| / (2^(b-1) - 1).
  A BatchNormalization that directly and solely follows such a layer is folded into it first (as TFLite and
  PyTorch's fusion do), so the folded kernel is what gets quantized; biases stay float (int32 in real kernels).
- Activations: 8-bit per-tensor asymmetric (affine, uint8 grid 0..255 with a zero point; the range always
  contains 0), min/max observed on the float model over a few batches of quantization data. Quantized tensors: the model
  input and the output of every layer, except where a real int8 runtime keeps the value or fuses the op:
  Dropout, Flatten, Reshape and max pooling (their output lies on their input's grid), a conv/dense output
  consumed only by a folded BN, and a conv/dense/folded-BN output consumed only by a ReLU (fused activation).
  Standalone BN layers (not after a conv/dense) run in float and their output is quantized.
- The last layer's activation (sigmoid/softmax) is split off: the simulation returns the (quantized) logits
  and the caller applies the activation, so that temperatures can be applied to the same logits.

The model is cloned and run layer by layer in topological order; the original model is never modified.
Rounding is numpy's (half to even); TFLite rounds half away from zero, a difference only at exact ties.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from edge_quq.errors import ExportError

_WEIGHT_LAYERS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "Dense")
_PASS_THROUGH = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout", "AlphaDropout", "Flatten",
                 "Reshape", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D")
_HEAD_ACTIVATIONS = ("sigmoid", "softmax", "linear")


def quantize_weights_per_channel(w: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Symmetric per-channel fake quantization of a weight tensor along `axis` (the output channels)."""
    if not 2 <= bits <= 16:
        raise ExportError(f"weight bits must be in 2..16, got {bits}")
    w = np.asarray(w, np.float32)
    qmax = float(2 ** (bits - 1) - 1)
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.float32)


def activation_qparams(lo: float, hi: float, bits: int = 8) -> Tuple[float, int]:
    """(scale, zero point) of an asymmetric per-tensor grid 0..2^b-1 over [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zp = int(np.clip(np.round(-lo / scale), 0, levels))
    return float(scale), zp


def fake_quant_activation(x: np.ndarray, scale: float, zero_point: int, bits: int = 8) -> np.ndarray:
    levels = 2 ** bits - 1
    q = np.clip(np.round(np.asarray(x, np.float32) / np.float32(scale)) + zero_point, 0, levels)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def _kind(layer) -> str:
    return type(layer).__name__


def _activation_name(fn) -> str:
    return getattr(fn, "__name__", str(fn))


@dataclass
class _Step:
    layer: object  # the clone's layer
    inputs: List[int]  # ids of input tensors
    output: int  # id of the output tensor
    quantize: bool  # fake-quantize the output
    fold_into: Optional[str] = None  # for BN: the conv/dense layer it is folded into


class FakeQuantModel:
    """`FakeQuantModel(model).set_activation_ranges(x)` then `.logits(x, weight_bits)` (None = float weights)."""

    def __init__(self, model, act_bits: int = 8) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras

        self.act_bits = act_bits
        self.source = model
        self.clone = keras.models.clone_model(model)
        self.clone.set_weights(model.get_weights())
        if len(self.clone.inputs) != 1 or len(self.clone.outputs) != 1:
            raise ExportError("the quantization report needs a model with one input and one output")
        self.original = {l.name: [np.asarray(w) for w in l.get_weights()] for l in model.layers}
        self._plan(keras)

    # -- graph ---------------------------------------------------------------------------------------------
    def _plan(self, keras) -> None:
        layers = [l for l in self.clone.layers if _kind(l) != "InputLayer"]
        for l in layers:
            if len(l._inbound_nodes) != 1:
                raise ExportError(f"layer {l.name!r} is used {len(l._inbound_nodes)} times; shared layers are not supported")
        self.input_id = id(self.clone.inputs[0])
        consumers: Dict[int, List[object]] = {}
        nodes = {}
        for l in layers:
            node = l._inbound_nodes[0]
            ins = [id(t) for t in node.input_tensors]
            outs = list(node.output_tensors)
            if len(outs) != 1:
                raise ExportError(f"layer {l.name!r} has {len(outs)} outputs; only single-output layers are supported")
            nodes[l.name] = (ins, id(outs[0]))
            for t in ins:
                consumers.setdefault(t, []).append(l)
        out_id = id(self.clone.outputs[0])

        # The model's output activation is split off so that the simulation yields logits.
        last = next(l for l in layers if nodes[l.name][1] == out_id)
        if _kind(last) in ("Activation", "Softmax"):
            act = "softmax" if _kind(last) == "Softmax" else _activation_name(last.activation)
            out_id = nodes[last.name][0][0]
            layers = [l for l in layers if l is not last]
        elif hasattr(last, "activation"):
            act = _activation_name(last.activation)
            last.activation = keras.activations.linear
        else:
            act = "linear"
        if act not in _HEAD_ACTIVATIONS:
            raise ExportError(f"the model's output activation {act!r} is not sigmoid, softmax or linear")
        self.activation = act
        self.output_id = out_id

        folded: Dict[str, str] = {}  # BN name -> weight layer name
        for l in layers:
            if _kind(l) in _WEIGHT_LAYERS and _activation_name(getattr(l, "activation", None)) == "linear":
                users = consumers.get(nodes[l.name][1], [])
                if len(users) == 1 and _kind(users[0]) == "BatchNormalization" and users[0].axis in (-1, len(l.output.shape) - 1):
                    folded[users[0].name] = l.name
        self.folded = folded
        steps = []
        for l in layers:
            ins, out = nodes[l.name]
            users = consumers.get(out, [])
            only = users[0] if len(users) == 1 else None
            quant = True
            if _kind(l) in _PASS_THROUGH:
                quant = False
            elif _kind(l) in _WEIGHT_LAYERS and l.name in folded.values():
                quant = False  # its output only feeds the folded BN
            elif (_kind(l) in _WEIGHT_LAYERS and _activation_name(getattr(l, "activation", None)) == "linear"
                  or l.name in folded) and only is not None and _is_relu(only) and out != out_id:
                quant = False  # fused activation: the ReLU's output is the quantized tensor
            steps.append(_Step(l, ins, out, quant, folded.get(l.name)))
        self.steps = steps
        self.ranges: Dict[int, Tuple[float, float]] = {}

    # -- weights ---------------------------------------------------------------------------------------------
    def set_weight_bits(self, bits: Optional[int]) -> None:
        """Load the source weights into the clone, fold BNs, quantize to `bits` (None: float, folded)."""
        by_name = {l.name: l for l in self.clone.layers}
        for name, ws in self.original.items():
            if name in by_name and ws:
                by_name[name].set_weights(ws)
        for bn_name, w_name in self.folded.items():
            bn, wl = by_name[bn_name], by_name[w_name]
            kernel, bias = _fold(wl, bn, self.original[w_name], self.original[bn_name])
            _set_identity_bn(bn, bias)
            wl.set_weights([kernel, np.zeros_like(bias)] if getattr(wl, "use_bias", False) else [kernel])
        if bits is None:
            return
        for l in self.clone.layers:
            if _kind(l) not in _WEIGHT_LAYERS:
                continue
            ws = l.get_weights()
            k = ws[0]
            if _kind(l) == "DepthwiseConv2D":  # [kh, kw, in, mult]: each (in, mult) pair is a channel
                q = quantize_weights_per_channel(k.reshape(k.shape[0], k.shape[1], -1), bits).reshape(k.shape)
            else:
                q = quantize_weights_per_channel(k, bits)
            l.set_weights([q] + ws[1:])

    # -- running -----------------------------------------------------------------------------------------------
    def _run(self, x: np.ndarray, quant_act: bool, observe: bool) -> np.ndarray:
        import tensorflow as tf

        def q(tid: int, v):
            a = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
            if observe:
                lo, hi = float(a.min()), float(a.max())
                old = self.ranges.get(tid)
                self.ranges[tid] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            if quant_act:
                s, zp = activation_qparams(*self.ranges[tid], self.act_bits)
                return tf.convert_to_tensor(fake_quant_activation(a, s, zp, self.act_bits))
            return v

        values = {self.input_id: q(self.input_id, tf.convert_to_tensor(x))}
        for st in self.steps:
            args = [values[t] for t in st.inputs]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = st.layer(args[0] if len(args) == 1 else args, training=False)
            values[st.output] = q(st.output, out) if st.quantize else out
        out = values[self.output_id]
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, np.float32).reshape(len(x), -1)

    def set_activation_ranges(self, x: np.ndarray, batch: int = 128) -> None:
        """Activation ranges (min/max) over `x`, on the float model (folded BN, float weights)."""
        self.set_weight_bits(None)
        self.ranges = {}
        for s in range(0, len(x), batch):
            self._run(x[s : s + batch], quant_act=False, observe=True)

    def logits(self, x: np.ndarray, weight_bits: Optional[int], quantize_activations: bool = True,
               batch: int = 500) -> np.ndarray:
        """Logits with weights at `weight_bits` (None: float) and 8-bit activations (unless turned off)."""
        if quantize_activations and not self.ranges:
            raise ExportError("set_activation_ranges() before running with quantized activations")
        self.set_weight_bits(weight_bits)
        return np.concatenate([self._run(x[s : s + batch], quantize_activations, False) for s in range(0, len(x), batch)])

    def describe(self) -> Dict[str, object]:
        return {
            "weight_layers": [st.layer.name for st in self.steps if _kind(st.layer) in _WEIGHT_LAYERS],
            "folded_batchnorm": dict(self.folded),
            "quantized_tensors": ["input"] + [st.layer.name for st in self.steps if st.quantize],
            "output_activation": self.activation,
        }


def _is_relu(layer) -> bool:
    if _kind(layer) == "ReLU":
        return True
    return _kind(layer) == "Activation" and _activation_name(layer.activation) == "relu"


def _fold(wl, bn, w_weights: List[np.ndarray], bn_weights: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of weight layer followed by inference-mode BN: W * s, (b - mean) * s + beta."""
    kernel = np.asarray(w_weights[0], np.float32)
    # Output channels: the last kernel axis, or (in, multiplier) pairs for a depthwise kernel [kh, kw, in, mult].
    n_out = kernel.shape[2] * kernel.shape[3] if _kind(wl) == "DepthwiseConv2D" else kernel.shape[-1]
    bias = np.asarray(w_weights[1], np.float32) if getattr(wl, "use_bias", False) else np.zeros(n_out, np.float32)
    it = iter(bn_weights)
    gamma = next(it) if bn.scale else np.ones_like(bias)
    beta = next(it) if bn.center else np.zeros_like(bias)
    mean, var = next(it), next(it)
    s = (gamma / np.sqrt(var + bn.epsilon)).astype(np.float32)
    if _kind(wl) == "DepthwiseConv2D":
        folded = kernel * s.reshape(kernel.shape[2], kernel.shape[3])
    else:
        folded = kernel * s
    return folded.astype(np.float32), ((bias - mean) * s + beta).astype(np.float32)


def _set_identity_bn(bn, bias: np.ndarray) -> None:
    """Make an inference-mode BN compute x + bias: gamma 1, beta 0, mean -bias, var 1 - eps."""
    ws = []
    if bn.scale:
        ws.append(np.ones_like(bias))
    if bn.center:
        ws.append(np.zeros_like(bias))
    ws += [-bias, np.full_like(bias, 1.0 - bn.epsilon)]
    bn.set_weights(ws)
