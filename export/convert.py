"""Conversions: the backbone to full-int8 TFLite and to int8 QDQ ONNX, the head to float TFLite and ONNX.

Head models take `features` [T, F] and one 0/1 keep mask per dropout block (`mask0` [T, F], `mask1` [T, H], ...)
and apply the 1/(1-p) scaling inside, so the runtime only draws Bernoulli masks. T is dynamic in both.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from edge_quq.bundle import ModelFile, QuantParams
from edge_quq.errors import ExportError
from edge_quq.head import HeadWeights

ONNX_OPSET = 17
BACKBONE_INPUT = "image"
BACKBONE_OUTPUT = "features"


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


@contextlib.contextmanager
def quiet_fds():
    """Send native stdout/stderr (the TFLite converter's and interpreter's C++ log lines) to /dev/null.

    Errors still reach the user: they arrive as Python exceptions, printed after the descriptors are back.
    EDGE_QUQ_EXPORT_VERBOSE=1 keeps everything.
    """
    if os.environ.get("EDGE_QUQ_EXPORT_VERBOSE"):
        yield
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


@contextlib.contextmanager
def quiet():
    """Hide the converters' progress prints (Keras prints every SavedModel signature to stdout)."""
    with quiet_fds(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- TFLite --------------------------------------------------------------------------------------------

def rename_tflite_tensors(data: bytes, single: Optional[Tuple[str, str]] = None) -> bytes:
    """Give the signature's input/output tensors their signature names (`features`, `probs`, ...).

    The converter names tensors `serving_default_x:0` / `StatefulPartitionedCall:1`; the runtime finds
    tensors by name through get_input_details(), which does not see signature names. `single` names the
    one input and one output of a single-input, single-output model instead.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(data))
    sg = model.subgraphs[0]
    sig = model.signatureDefs[0] if model.signatureDefs else None
    if single is not None:
        if len(sg.inputs) != 1 or len(sg.outputs) != 1:
            raise ExportError("the TFLite backbone does not have exactly one input and one output")
        sg.tensors[sg.inputs[0]].name = single[0].encode()
        sg.tensors[sg.outputs[0]].name = single[1].encode()
        for tm, new in ((sig.inputs[0], single[0]), (sig.outputs[0], single[1])) if sig is not None else ():
            tm.name = new.encode()
        return bytes(fu.convert_object_to_bytearray(model))
    if sig is None:
        return data
    for tm in list(sig.inputs) + list(sig.outputs):
        key = tm.name.decode() if isinstance(tm.name, bytes) else str(tm.name)
        sg.tensors[tm.tensorIndex].name = key.encode()
    return bytes(fu.convert_object_to_bytearray(model))


def _backbone_function(backbone, input_shape: Tuple[int, ...]):
    tf = _quiet_tf()
    spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=BACKBONE_INPUT)

    @tf.function(input_signature=[spec])
    def serve(image):
        return {BACKBONE_OUTPUT: backbone(image, training=False)}

    return serve


def tflite_backbone(backbone, quant: Optional[np.ndarray], input_shape: Tuple[int, ...]) -> bytes:
    """Full-integer int8 TFLite (int8 weights, activations, input and output; activation ranges from the
    quantization data `quant`) or, with quant None, float32."""
    tf = _quiet_tf()
    # from_keras_model freezes the Keras 3 variables; a concrete function of a Keras model would leave
    # READ_VARIABLE ops that fail at run time.
    conv = tf.lite.TFLiteConverter.from_keras_model(backbone)
    if quant is not None:
        def representative() -> Iterator[List[np.ndarray]]:
            for i in range(len(quant)):
                yield [quant[i : i + 1].astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    try:
        with quiet():
            data = conv.convert()
    except Exception as e:  # the converter raises many unrelated types; the message is what matters
        raise ExportError(f"TFLite conversion of the backbone failed: {str(e).strip().splitlines()[0][:300]}") from None
    return rename_tflite_tensors(data, single=(BACKBONE_INPUT, BACKBONE_OUTPUT))


def tflite_model_file(path: Path) -> ModelFile:
    """The manifest entry of a TFLite model: its file name, and the quantization and name of its single input
    and output."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet_fds():
        it = Interpreter(model_path=str(path))
    io = []
    for d in (it.get_input_details()[0], it.get_output_details()[0]):
        dtype = np.dtype(d["dtype"]).name
        scale, zp = d["quantization"]
        q = QuantParams(dtype, float(scale), int(zp)) if dtype in ("int8", "uint8") else QuantParams(dtype)
        io.append((q, str(d["name"])))
    return ModelFile(file=path.name, input=io[0][0], output=io[1][0], input_name=io[0][1], output_name=io[1][1])


def _tf_hidden(tf, kind: str):
    """edge_quq.head.hidden_activation in TensorFlow ops."""
    fns = {"relu": tf.nn.relu, "hardswish": lambda h: h * tf.nn.relu6(h + 3.0) / 6.0, "silu": tf.nn.silu,
           "gelu": lambda h: tf.nn.gelu(h, approximate=False)}
    if kind not in fns:
        raise ExportError(f"the exported TFLite head has no hidden activation {kind!r}")
    return fns[kind]


def tflite_head(head: HeadWeights) -> bytes:
    tf = _quiet_tf()
    specs = [tf.TensorSpec([None, head.feature_size], tf.float32, name="features")]
    fan_in = head.feature_size
    for i, k in enumerate(head.kernels):
        specs.append(tf.TensorSpec([None, fan_in], tf.float32, name=f"mask{i}"))
        fan_in = k.shape[1]
    kernels = [tf.constant(k) for k in head.kernels]
    biases = [tf.constant(b) for b in head.biases]
    scales = [np.float32(1.0 / (1.0 - r)) for r in head.rates]
    n = len(kernels)
    acts = [_tf_hidden(tf, a) for a in head.hidden_activations]

    class Head(tf.Module):
        @tf.function(input_signature=specs)
        def __call__(self, features, *masks):
            h = features
            for i in range(n):
                # The scale is folded into the mask so that a mask of 1-p (the runtime's eval row) gives h.
                h = h * (masks[i] * scales[i])
                h = tf.matmul(h, kernels[i]) + biases[i]
                if i < n - 1:
                    h = acts[i](h)
            if head.activation == "sigmoid":
                p = tf.sigmoid(h)
            elif head.activation == "softmax":
                p = tf.nn.softmax(h, axis=-1)
            else:
                p = tf.identity(h)
            return {"logits": h, "probs": p}

    mod = Head()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([mod.__call__.get_concrete_function()], mod)
    try:
        with quiet():
            data = conv.convert()
    except Exception as e:
        raise ExportError(f"TFLite conversion of the head failed: {str(e).strip().splitlines()[0][:300]}") from None
    return rename_tflite_tensors(data)


# --- ONNX ----------------------------------------------------------------------------------------------

def _rename_onnx_value(model, old: str, new: str) -> None:
    g = model.graph
    for node in g.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.name == old:
            v.name = new


def onnx_float_backbone(backbone, input_shape: Tuple[int, ...]):
    """Float32 ONNX backbone (opset 17) with input `image` [N, H, W, C] and output `features` [N, F]."""
    tf = _quiet_tf()
    import tf2onnx

    spec = (tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=BACKBONE_INPUT),)
    try:
        with quiet():
            model, _ = tf2onnx.convert.from_keras(backbone, input_signature=spec, opset=ONNX_OPSET)
    except Exception:
        # tf2onnx's Keras path follows Keras internals that change between releases; a tf.function is stable.
        fn = _backbone_function(backbone, input_shape)
        try:
            with quiet():
                model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
        except Exception as e:
            raise ExportError(f"ONNX conversion of the backbone failed: {str(e).strip().splitlines()[0][:300]}") from None
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise ExportError("ONNX backbone does not have exactly one input and one output")
    _rename_onnx_value(model, model.graph.input[0].name, BACKBONE_INPUT)
    _rename_onnx_value(model, model.graph.output[0].name, BACKBONE_OUTPUT)
    return model


class _QuantDataReader:
    """onnxruntime CalibrationDataReader (its name for quantization data) over the array, one sample per call."""

    def __init__(self, name: str, quant: np.ndarray) -> None:
        self.name = name
        self.quant = quant
        self.i = 0

    def get_next(self):
        if self.i >= len(self.quant):
            return None
        x = self.quant[self.i : self.i + 1].astype(np.float32)
        self.i += 1
        return {self.name: x}

    def rewind(self) -> None:
        self.i = 0


def onnx_int8_backbone(float_model, quant: np.ndarray, out_path: Path) -> None:
    """Static int8 QDQ quantization, per-channel weights, int8 activations; float32 in/out stays.

    reduce_range (7-bit weights): on x86-64 without VNNI, onnxruntime's int8 GEMM sums pairs of u8*s8
    products in 16 bits and saturates. Measured on the tiny test model: feature cosine min 0.945 without it,
    0.999 with it, and 0.9991 vs 0.9989 when the graph runs unfused (no saturation) - the 7th bit costs
    almost nothing, and ARM boards run the same file.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="edge_quq_onnx_") as tmp:
        src = Path(tmp) / "float.onnx"
        onnx.save(float_model, str(src))
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            with quiet():
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:
            pass  # pre-processing only improves fusion; the plain model quantizes correctly too
        try:
            with quiet():
                quantize_static(str(src), str(out_path), _QuantDataReader(BACKBONE_INPUT, quant), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:
            raise ExportError(f"ONNX int8 quantization of the backbone failed: {str(e).strip().splitlines()[0][:300]}") from None


def _onnx_hidden(kind: str, x: str, y: str):
    """edge_quq.head.hidden_activation as ONNX nodes (opset 17: GELU as its erf form, no Gelu op yet)."""
    from onnx import helper, numpy_helper

    if kind == "relu":
        return [helper.make_node("Relu", [x], [y])], []
    if kind == "hardswish":
        return [helper.make_node("HardSwish", [x], [y])], []
    if kind == "silu":
        return [helper.make_node("Sigmoid", [x], [f"{y}_sig"]), helper.make_node("Mul", [x, f"{y}_sig"], [y])], []
    if kind == "gelu":
        consts = [numpy_helper.from_array(np.array(v, np.float32), f"{y}_{n}") for n, v in
                  (("rsqrt2", 1.0 / np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
        nodes = [helper.make_node("Mul", [x, f"{y}_rsqrt2"], [f"{y}_s"]), helper.make_node("Erf", [f"{y}_s"], [f"{y}_e"]),
                 helper.make_node("Add", [f"{y}_e", f"{y}_one"], [f"{y}_a"]), helper.make_node("Mul", [x, f"{y}_a"], [f"{y}_m"]),
                 helper.make_node("Mul", [f"{y}_m", f"{y}_half"], [y])]
        return nodes, consts
    raise ExportError(f"the exported ONNX head has no hidden activation {kind!r}")


def onnx_head(head: HeadWeights):
    """The masked head as a hand-built ONNX graph: Mul (mask * 1/(1-p)), MatMul, Add, Relu, Sigmoid|Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["T", head.feature_size])]
    h = "features"
    fan_in = head.feature_size
    n = len(head.kernels)
    for i, (k, b, r) in enumerate(zip(head.kernels, head.biases, head.rates)):
        inputs.append(helper.make_tensor_value_info(f"mask{i}", TensorProto.FLOAT, ["T", fan_in]))
        inits += [numpy_helper.from_array(np.asarray(k, np.float32), f"kernel{i}"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"bias{i}"),
                  numpy_helper.from_array(np.array(1.0 / (1.0 - r), np.float32), f"scale{i}")]
        nodes += [helper.make_node("Mul", [f"mask{i}", f"scale{i}"], [f"smask{i}"]),
                  helper.make_node("Mul", [h, f"smask{i}"], [f"drop{i}"]),
                  helper.make_node("MatMul", [f"drop{i}", f"kernel{i}"], [f"mm{i}"])]
        last = i == n - 1
        nodes.append(helper.make_node("Add", [f"mm{i}", f"bias{i}"], ["logits" if last else f"pre{i}"]))
        if not last:
            act_nodes, act_inits = _onnx_hidden(head.hidden_activations[i], f"pre{i}", f"h{i}")
            nodes += act_nodes
            inits += act_inits
            h = f"h{i}"
        fan_in = k.shape[1]
    if head.activation == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["probs"]))
    elif head.activation == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["probs"]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["T", head.num_classes]) for name in ("logits", "probs")]
    graph = helper.make_graph(nodes, "edge_quq_head", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="edge_quq_export")
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime >= 1.14 on older boards
    onnx.checker.check_model(model)
    return model
