"""Post-hoc temperature scaling and the calibration figures of a head's outputs, as pure numpy.

Temperature scaling divides the logits by one scalar T > 0 before the output activation; it never changes
the predicted class (argmax of logits / T is the argmax of the logits), only how confident the model claims
to be. T is fitted on held-out labelled data by minimising the negative log-likelihood of the head's own
training objective:
- softmax head: the categorical NLL, -log softmax(z / T)[y] (Guo et al. 2017);
- sigmoid head (one independent Bernoulli per class, trained with binary cross-entropy on one-hot labels):
  the binary NLL summed over classes, -sum_c [y_c log s(z_c / T) + (1 - y_c) log(1 - s(z_c / T))], with one
  T shared by all classes.
Both objectives are convex in beta = 1/T, so a golden-section search over log T finds the one minimum.

For the reliability figures of a sigmoid head, the confidence is the largest per-class probability (the
probability the predicted class is present, which is what the decision rule thresholds) and the
categorical NLL uses the probabilities renormalised to sum to one; the binary NLL is reported beside it.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np

from edge_quq.errors import OptionError
from edge_quq.head import output_activation
from edge_quq.metrics import brier, ece

# Search range for T: wide enough for any sensible model, and the ends are reported as such.
T_MIN, T_MAX = 0.05, 20.0
_EPS = 1e-12


def _check(logits: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).reshape(-1)
    if z.ndim != 2 or len(z) == 0:
        raise OptionError(f"temperature fit needs logits [N, C] with N > 0, got shape {z.shape}")
    if len(y) != len(z):
        raise OptionError(f"temperature fit: {len(y)} labels for {len(z)} logit rows")
    if not np.all(np.isfinite(z)):
        raise OptionError("temperature fit: logits contain NaN or infinity")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise OptionError(f"temperature fit: labels must be class indices 0..{z.shape[1] - 1}")
    return z, y


def binary_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean over samples of the per-class binary cross-entropy summed over classes, at temperature T."""
    z = np.asarray(logits, np.float64) / float(temperature)
    onehot = np.zeros_like(z)
    onehot[np.arange(len(z)), np.asarray(labels, np.int64)] = 1.0
    # -log s(z) = softplus(-z), -log(1 - s(z)) = softplus(z), both without overflow.
    loss = onehot * np.logaddexp(0.0, -z) + (1.0 - onehot) * np.logaddexp(0.0, z)
    return float(np.mean(np.sum(loss, axis=1)))


def softmax_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / float(temperature)
    m = np.max(z, axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.sum(np.exp(z - m), axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), np.asarray(labels, np.int64)]))


def temperature_objective(activation: str) -> str:
    if activation == "sigmoid":
        return "binary NLL summed over the per-class sigmoids, one T for all classes"
    if activation == "softmax":
        return "categorical NLL of softmax(logits / T)"
    raise OptionError(f"temperature scaling needs a sigmoid or softmax head, not {activation!r}")


def fit_temperature(logits: np.ndarray, labels: np.ndarray, activation: str, tol: float = 1e-6) -> float:
    """The T in [T_MIN, T_MAX] minimising the head's NLL on (logits, labels); see the module docstring."""
    temperature_objective(activation)
    z, y = _check(logits, labels)
    loss = binary_nll if activation == "sigmoid" else softmax_nll
    # Golden-section search on u = log T: the loss is convex in 1/T, hence unimodal in log T.
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(z, y, math.exp(a)), loss(z, y, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(z, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(z, y, math.exp(b))
    return float(math.exp(0.5 * (lo + hi)))


def confidence_and_prediction(probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, np.float64)
    return p.max(axis=1), p.argmax(axis=1)


def calibration_summary(logits: np.ndarray, labels: np.ndarray, activation: str, temperature: float = 1.0,
                        bins: int = 15) -> Dict[str, float]:
    """top-1, ECE (equal-width bins on the top-class probability), NLL, Brier at temperature T."""
    z, y = _check(logits, labels)
    probs = output_activation(z / float(temperature), activation)
    conf, pred = confidence_and_prediction(probs)
    correct = pred == y
    if activation == "sigmoid":
        # Per-class sigmoids need not sum to 1: the categorical figures use the renormalised vector.
        norm = probs / np.maximum(probs.sum(axis=1, keepdims=True), _EPS)
        cat_nll = float(-np.mean(np.log(np.clip(norm[np.arange(len(y)), y], _EPS, 1.0))))
        out = {"top1": float(correct.mean()), "ece": ece(conf, correct, bins), "nll": cat_nll,
               "binary_nll": binary_nll(z, y, temperature), "brier": brier(norm, y)}
    else:
        out = {"top1": float(correct.mean()), "ece": ece(conf, correct, bins), "nll": softmax_nll(z, y, temperature),
               "brier": brier(probs, y)}
    out["mean_confidence"] = float(conf.mean())
    return out
