"""Gradient-based epistemic uncertainty of the head in closed form (after arXiv 2404.10124, REGrad).

The int8 backbone is frozen; the head is float and small, so the gradient of every class's log-probability
with respect to every head parameter has a closed form that costs about one extra head pass for all classes
at once, with no autodiff framework on the device.

For a dense layer with input u and output pre-activation z = u W + b, and g = d log p_k / d z:
    dW = u^T g  (an outer product, so ||dW||_F = ||u|| * ||g||),   db = g,
    so the layer's gradient norm is ||g|| * sqrt(||u||^2 + 1).
Going down one layer: g_below = (g W^T) * act'(z_below), act' the hidden activation's derivative (ReLU,
Hardswish, SiLU or GELU as edge_quq.head.hidden_activation defines them: activation_derivative below).

The score (higher = less trust):
    U(x) = sum_l  omega_l * sum_k  w_k * ||d log p_k / d theta_l||
  layer weights omega_l = base^l / sum_j base^j (l = 0 the first head layer; base > 1 weighs deeper layers
  exponentially more, base = 1 weighs them equally), class weights w_k:
    "sqrt":  sqrt(p_k) / sum_j sqrt(p_j)   (the root-normalised weighting: low-probability classes still count)
    "prob":  p_k                           (ExGrad's expected gradient norm)
    "uniform": 1 / C
Smoothing: the score is averaged over `perturbations` copies of the features with Gaussian noise of
standard deviation `noise` times the features' RMS (free: no extra backbone pass). Noise on the image
instead costs one backbone pass per copy and lives in the predictor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from edge_quq.errors import OptionError
from edge_quq.head import HeadWeights, erf, hidden_activation, output_activation, sigmoid

CLASS_WEIGHTINGS = ("sqrt", "prob", "uniform")


@dataclass(frozen=True)
class GradientSettings:
    layer_base: float = 2.0
    class_weighting: str = "sqrt"
    perturbations: int = 0
    noise: float = 0.05
    seed: Optional[int] = 0

    def validate(self) -> "GradientSettings":
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise OptionError(f"class weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, got {self.class_weighting!r}")
        if self.layer_base <= 0:
            raise OptionError(f"layer base must be > 0, got {self.layer_base}")
        if self.perturbations < 0 or self.noise < 0:
            raise OptionError("perturbations and noise must be >= 0")
        return self


def output_log_prob_grads(logits: np.ndarray, activation: str) -> np.ndarray:
    """G[n, k, c] = d log p_k / d logit_c for every class k at once, [N, C, C] for logits [N, C]."""
    z = np.atleast_2d(np.asarray(logits, np.float64))
    p = output_activation(z, activation)
    eye = np.eye(z.shape[-1])[None]
    if activation == "softmax":
        return eye - p[:, None, :]
    if activation == "sigmoid":
        return eye * (1.0 - p)[:, None, :]
    # linear head: log of a raw output is meaningless; use the logit itself as the target
    return np.broadcast_to(eye, (len(z),) + eye.shape[1:]).copy()


def activation_derivative(z: np.ndarray, kind: str) -> np.ndarray:
    """d act(z) / dz elementwise for a hidden activation of edge_quq.head (at the kinks: PyTorch's choice,
    relu'(0) = 0 and hardswish'(+-3) = the inner piece's value)."""
    z = np.asarray(z, np.float64)
    if kind == "relu":
        return (z > 0.0).astype(np.float64)
    if kind == "hardswish":  # z * relu6(z + 3) / 6
        return np.where(z < -3.0, 0.0, np.where(z > 3.0, 1.0, (2.0 * z + 3.0) / 6.0))
    if kind == "silu":  # z * s(z): s + z s (1 - s)
        s = sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if kind == "gelu":  # z * Phi(z): Phi + z phi
        return 0.5 * (1.0 + erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
    raise ValueError(f"no derivative for hidden activation {kind!r}")


def layer_gradient_norms(head: HeadWeights, x: np.ndarray) -> np.ndarray:
    """N[n, l, k] = ||d log p_k / d (W_l, b_l)||, eval mode (no dropout), for rows x [N, F]; [l, k] for one [F]."""
    single = np.ndim(x) == 1
    a = np.atleast_2d(np.asarray(x, np.float64))
    inputs: List[np.ndarray] = []
    pre: List[np.ndarray] = []
    n = len(head.kernels)
    acts = head.hidden_activations
    for i in range(n):
        inputs.append(a)
        z = a @ head.kernels64[i] + head.biases[i]
        pre.append(z)
        a = hidden_activation(z, acts[i]) if i < n - 1 else z
    g = output_log_prob_grads(pre[-1], head.activation)  # [N, C, out_L]
    norms = np.empty((len(a), n, g.shape[1]))
    for i in range(n - 1, -1, -1):
        norms[:, i] = np.linalg.norm(g, axis=2) * np.sqrt(np.sum(inputs[i] ** 2, axis=1) + 1.0)[:, None]
        if i > 0:
            g = (g @ head.kernels64[i].T) * activation_derivative(pre[i - 1], acts[i - 1])[:, None, :]
    return norms[0] if single else norms


def class_weights(p: np.ndarray, how: str) -> np.ndarray:
    """Class weights over the last axis of probabilities p ([C] or [N, C])."""
    p = np.asarray(p, np.float64)
    if how == "sqrt":
        r = np.sqrt(np.clip(p, 0.0, None))
        return r / np.maximum(r.sum(axis=-1, keepdims=True), 1e-12)
    if how == "prob":
        return p
    return np.full(p.shape, 1.0 / p.shape[-1])


def layer_weights(n: int, base: float) -> np.ndarray:
    w = base ** np.arange(n, dtype=np.float64)
    return w / w.sum()


def _unperturbed_scores(head: HeadWeights, x: np.ndarray, settings: GradientSettings) -> np.ndarray:
    om = layer_weights(len(head.kernels), settings.layer_base)
    p = head.probs(x.astype(np.float32)).astype(np.float64)
    return np.einsum("l,nlc,nc->n", om, layer_gradient_norms(head, x), class_weights(p, settings.class_weighting))


def gradient_scores(head: HeadWeights, feats: np.ndarray, settings: GradientSettings = GradientSettings(),
                    chunk: int = 1000) -> np.ndarray:
    """U(x) for rows of feats [N, F] -> [N] (see the module docstring); chunked to bound memory ([chunk, C, H])."""
    x = np.atleast_2d(np.asarray(feats, np.float64))
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        rows = x[s : s + chunk]
        if settings.perturbations == 0:
            out[s : s + chunk] = _unperturbed_scores(head, rows, settings)
            continue
        # Each row gets its own seeded noise stream, so a row's score does not depend on its batch.
        for j, v in enumerate(rows):
            rng = np.random.default_rng(settings.seed)
            scale = settings.noise * float(np.sqrt(np.mean(v * v)) + 1e-12)
            noisy = v[None] + rng.normal(0.0, scale, (settings.perturbations, v.shape[0]))
            out[s + j] = float(np.mean(_unperturbed_scores(head, noisy, settings)))
    return out


def gradient_score(head: HeadWeights, x: np.ndarray, settings: GradientSettings = GradientSettings()) -> float:
    """U(x) for one feature vector: gradient_scores on a batch of one."""
    return float(gradient_scores(head, np.asarray(x, np.float64).reshape(1, -1), settings)[0])
