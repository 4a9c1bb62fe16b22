"""The droppable head as plain numpy: weights file, activations, and the masked forward pass.

The head is a stack of blocks, each `dropout(p_i) -> dense(W_i, b_i) -> activation_i`, hidden activations
ReLU (the default), Hardswish, SiLU or GELU (exact, erf form), the last sigmoid, softmax or linear. This module is the reference every other head implementation
(native kernel, exported TFLite/ONNX head) must match given the same keep masks.
"""
from __future__ import annotations

import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from edge_quq.bundle import HIDDEN_ACTIVATIONS, Bundle, HeadSpec
from edge_quq.errors import BundleError


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so that exp never overflows for large |x|.
    out = np.empty_like(x, dtype=np.result_type(x, np.float32))
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf, |error| < 1.2e-7 (Numerical Recipes erfc with a Chebyshev fit), float64."""
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def hidden_activation(h: np.ndarray, kind: str) -> np.ndarray:
    """A hidden layer's activation, as PyTorch defines it (GELU: the exact erf form, torch's default)."""
    if kind == "relu":
        return np.maximum(h, 0.0)
    if kind == "hardswish":
        return h * np.clip(h + 3.0, 0.0, 6.0) / 6.0
    if kind == "silu":
        return h * sigmoid(h)
    if kind == "gelu":
        return (0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))).astype(h.dtype)
    raise ValueError(f"hidden activation {kind!r} is not one of {', '.join(HIDDEN_ACTIVATIONS)}")


def output_activation(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return sigmoid(logits)
    if kind == "softmax":
        return softmax(logits, axis=-1)
    return logits


@dataclass(frozen=True)
class HeadWeights:
    kernels: Sequence[np.ndarray]  # each [in, out], float32, C-contiguous
    biases: Sequence[np.ndarray]  # each [out], float32
    rates: Sequence[float]  # dropout rate applied to each block's input
    activation: str  # output activation
    # Post-hoc temperature (bundle calibration.temperature): probabilities are activation(logits / T).
    # logits() stays the raw last-layer output; every sampler applies T through probs_from_logits().
    temperature: float = 1.0
    # Activation of each hidden block (len(kernels) - 1 names from HIDDEN_ACTIVATIONS); () means all ReLU.
    hidden: Sequence[str] = ()

    @cached_property
    def kernels64(self) -> List[np.ndarray]:
        """The kernels as float64, converted once per head: the float64 score math (gradients) feeds them
        single rows every frame, and the copy cost more than the matmul."""
        return [np.asarray(k, np.float64) for k in self.kernels]

    @cached_property
    def bias_rows(self) -> List[np.ndarray]:
        """The biases as [1, out] rows (views): added to one row's [1, out] product they need no broadcast, which
        cost numpy more than the addition itself (a frame's eval-mode pass for the logit detectors)."""
        return [np.asarray(b).reshape(1, -1) for b in self.biases]

    @property
    def hidden_activations(self) -> Sequence[str]:
        return tuple(self.hidden) if self.hidden else ("relu",) * (len(self.kernels) - 1)

    @property
    def relu_only(self) -> bool:
        """Every hidden block is ReLU: what the native kernel and the closed form handle."""
        return all(a == "relu" for a in self.hidden_activations)

    @property
    def feature_size(self) -> int:
        return int(self.kernels[0].shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.kernels[-1].shape[1])

    @property
    def hidden_sizes(self) -> List[int]:
        return [int(k.shape[1]) for k in self.kernels[:-1]]

    def logits(self, x: np.ndarray, masks: Optional[Sequence[Optional[np.ndarray]]] = None) -> np.ndarray:
        """Head logits for rows of x [N, F]; masks[i] is a 0/1 keep mask [N, in_i] or None (no dropout).

        Inverted dropout: kept units are scaled by 1/(1-p), so the mask-free pass is the eval-mode output.
        """
        h = np.asarray(x, dtype=np.float32)
        n_blocks = len(self.kernels)
        acts = self.hidden_activations
        biases = self.bias_rows if h.ndim == 2 else self.biases  # the same sums: [N, out] + [1, out] or + [out]
        for i in range(n_blocks):
            m = None if masks is None else masks[i]
            if m is not None and self.rates[i] > 0.0:
                h = h * (m.astype(np.float32, copy=False) * np.float32(1.0 / (1.0 - self.rates[i])))
            h = h @ self.kernels[i] + biases[i]
            if i < n_blocks - 1:
                h = hidden_activation(h, acts[i])
        return h

    def probs_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """The output activation of raw logits, with the temperature applied."""
        if self.temperature != 1.0:
            logits = logits / np.asarray(self.temperature, dtype=np.result_type(logits, np.float32))
        return output_activation(logits, self.activation)

    def probs(self, x: np.ndarray, masks: Optional[Sequence[Optional[np.ndarray]]] = None) -> np.ndarray:
        return self.probs_from_logits(self.logits(x, masks))


def save_head_weights(path: Path, spec_layers: Sequence[str], kernels: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> None:
    """Write the head weights file: `<name>/kernel` [in, out] and `<name>/bias` [out], float32, no pickle."""
    arrays = {}
    for name, k, b in zip(spec_layers, kernels, biases):
        arrays[f"{name}/kernel"] = np.ascontiguousarray(k, dtype=np.float32)
        arrays[f"{name}/bias"] = np.ascontiguousarray(b, dtype=np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: Path, what: str) -> Dict[str, np.ndarray]:
    """Every array of an npz file (no pickle), or one BundleError line: a damaged or hostile file can fail
    in the zip layer, in zlib, or in numpy's header parser (ValueError, SyntaxError, TokenError: it reads the
    header with the Python tokenizer), or claim a shape too big to allocate."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("not an npz archive")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, SyntaxError, tokenize.TokenError,
            MemoryError, OverflowError, KeyError, struct.error, NotImplementedError) as e:
        raise BundleError(f"{path}: {what} file cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def _float_array(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    """A stored weight as float32, refused unless numeric and finite: one inf bias makes a class present for
    every input, and the decision would never say so."""
    if a.dtype.kind not in "fiu":
        raise BundleError(f"{path}: {key} has dtype {a.dtype}, not a number array")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise BundleError(f"{path}: {key} holds NaN or infinite values (or values beyond float32)")
    return out


def load_head_weights(bundle: Bundle) -> HeadWeights:
    return load_head_from_spec(bundle.path / bundle.head.weights, bundle.head, bundle.temperature)


def load_head_from_spec(path: Path, spec: HeadSpec, temperature: float = 1.0) -> HeadWeights:
    arrays = read_npz(path, "head weights")
    kernels, biases = [], []
    fan_in = spec.feature_size
    for layer in spec.layers:
        kk, bk = f"{layer.name}/kernel", f"{layer.name}/bias"
        if kk not in arrays or bk not in arrays:
            raise BundleError(f"{path}: head weights lack {kk!r} or {bk!r}")
        k, b = _float_array(arrays[kk], path, kk), _float_array(arrays[bk], path, bk)
        if k.shape != (fan_in, layer.units) or b.shape != (layer.units,):
            raise BundleError(
                f"{path}: layer {layer.name!r} has kernel {k.shape} / bias {b.shape}, manifest says ({fan_in}, {layer.units})"
            )
        kernels.append(k)
        biases.append(b)
        fan_in = layer.units
    return HeadWeights(
        kernels=tuple(kernels),
        biases=tuple(biases),
        rates=tuple(l.dropout for l in spec.layers),
        activation=spec.output_activation,
        temperature=float(temperature),
        hidden=tuple(l.activation for l in spec.layers[:-1]),
    )
