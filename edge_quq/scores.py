"""Uncertainty scores beside the decision, as batched pure functions of the head moments.

Every function works over the last axis: rows [N, C] give [N] scores, a single [C] vector gives a scalar
array (a sample is a batch of one). The runtime, the benchmark suite and the detectors all call these.

Directions: for every score here a HIGHER value means LESS trust (more likely wrong or out-of-distribution),
except `max_prob`, where higher means more trust. The benchmark suite relies on these directions.

- max_prob: the largest MC-mean probability.
- predictive_entropy: entropy of the MC-mean prediction (Shannon for softmax; for sigmoid heads the sum of
  the per-class binary entropies, since each class is its own Bernoulli).
- mutual_information: predictive entropy minus the mean per-sample entropy (the epistemic part; the BALD
  quantity for softmax heads, its per-class-Bernoulli sum for sigmoid heads).
- mean_variance: mean over classes of the MC variance.
- energy: from the eval-mode logits. Softmax (and linear) heads: -logsumexp(logits) (Liu et al. 2020).
  Sigmoid: the joint energy -sum_c softplus(logit_c) (Wang et al. 2021), which treats each class logit as
  its own two-way softmax against zero. Higher energy = less in-distribution.
- gradient: the closed-form head-gradient score (edge_quq.gradients.gradient_scores), which needs the
  features, not only the moments; `compute_scores` takes it precomputed.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from edge_quq import framekernels as _native

_EPS = 1e-12


# The ufuncs and ndarray methods below rather than np.clip / np.sum / np.mean: the same operations without
# their Python wrappers, which cost more than the arithmetic on one frame's few classes.

def _clip01(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, _EPS), 1.0)


def entropy(p: np.ndarray, activation: str) -> np.ndarray:
    """Entropy over the last axis: Shannon for softmax, sum of per-class binary entropies otherwise."""
    p = np.asarray(p, dtype=np.float64)
    pc = _clip01(p)
    if activation == "softmax":
        return -(pc * np.log(pc)).sum(axis=-1)
    qc = _clip01(1.0 - p)
    return -(pc * np.log(pc) + qc * np.log(qc)).sum(axis=-1)


def energy(logits: np.ndarray, activation: str) -> np.ndarray:
    """Energy over the last axis: -sum softplus(z) for sigmoid heads, -logsumexp(z) otherwise."""
    z = np.asarray(logits, dtype=np.float64)
    if activation == "sigmoid":
        # softplus(z) = log(1 + e^z), computed without overflow
        return -np.add.reduce(np.logaddexp(0.0, z), axis=-1)
    m = z.max(axis=-1, keepdims=True)
    return -(m[..., 0] + np.log(np.exp(z - m).sum(axis=-1)))


# Column order of the native kernel's table (edge_quq.framekernels.moment_scores); energy only for the heads
# in ENERGY_ACTIVATIONS.
MOMENT_SCORES = ("max_prob", "predictive_entropy", "mutual_information", "mean_variance", "energy")
ENERGY_ACTIVATIONS = ("sigmoid", "softmax")
_ENERGY_NAMES, _NAMES_WITHOUT_ENERGY = MOMENT_SCORES, MOMENT_SCORES[:-1]
_NATIVE_ROWS = _native.available()


def compute_scores(mean: np.ndarray, std: np.ndarray, logits: np.ndarray, expected_entropy: np.ndarray, activation: str,
                   gradient: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Every score for rows of head moments ([N, C] -> [N] each; [C] -> numpy scalars): the native kernel
    when the extension is built (edge_quq.framekernels), compute_scores_numpy, its reference, otherwise or
    for shapes the kernel does not take (broadcast inputs, more than 2 dimensions)."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    logits = np.asarray(logits)
    ee = np.asarray(expected_entropy, dtype=np.float64)
    # ndarray attributes and methods, not np.shape/np.reshape: their wrappers cost more than the kernel here
    if not (_native.available() and 1 <= mean.ndim <= 2 and mean.size and std.shape == mean.shape == logits.shape
            and ee.size * mean.shape[-1] == mean.size):
        return compute_scores_numpy(mean, std, logits, ee, activation, gradient)
    c = mean.shape[-1]
    table = _native.moment_scores(mean.reshape(-1, c), std.reshape(-1, c), logits.reshape(-1, c), ee.reshape(-1),
                                  activation)
    names = MOMENT_SCORES if activation in ENERGY_ACTIVATIONS else MOMENT_SCORES[:-1]
    # a single [C] vector gives numpy scalars, as the reference's reductions do
    scores = {n: table[k] if mean.ndim == 2 else table[k, 0] for k, n in enumerate(names)}
    if gradient is not None:
        scores["gradient"] = np.asarray(gradient, dtype=np.float64)
    return scores


def score_row(mean: np.ndarray, std: np.ndarray, logits: np.ndarray, expected_entropy: float, activation: str,
              gradient: Optional[np.ndarray] = None) -> Dict[str, float]:
    """One sample's scores ([C] moments and a float expected entropy) as plain floats, what a Prediction carries:
    row_scores(compute_scores(...)), in one native call when the kernel takes the inputs."""
    row = (_native.moment_scores_row(mean, std, logits, expected_entropy, activation)
           if _NATIVE_ROWS and getattr(mean, "ndim", 0) == 1 else None)
    if row is None:
        return row_scores(compute_scores(mean, std, logits, expected_entropy, activation, gradient))
    # zip stops at the names: the kernel's energy is left out for heads without one
    out = dict(zip(_ENERGY_NAMES if activation in ENERGY_ACTIVATIONS else _NAMES_WITHOUT_ENERGY, row))
    if gradient is not None:
        out.update(row_scores({"gradient": np.asarray(gradient, dtype=np.float64)}))
    return out


def compute_scores_numpy(mean: np.ndarray, std: np.ndarray, logits: np.ndarray, expected_entropy: np.ndarray,
                         activation: str, gradient: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """compute_scores in numpy: the definition of the scores, and the native kernel's reference."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    pe = entropy(mean, activation)
    scores = {
        "max_prob": mean.max(axis=-1),
        "predictive_entropy": pe,
        "mutual_information": np.maximum(pe - np.asarray(expected_entropy, dtype=np.float64), 0.0),
        "mean_variance": np.square(std).sum(axis=-1) / std.shape[-1],
    }
    if activation in ENERGY_ACTIVATIONS:
        scores["energy"] = energy(logits, activation)
    if gradient is not None:
        scores["gradient"] = np.asarray(gradient, dtype=np.float64)
    return scores


def row_scores(scores: Dict[str, np.ndarray], i: int = 0) -> Dict[str, float]:
    """One sample's scores as plain floats (what a Prediction carries)."""
    # .item(i) (flat index) takes an array or a numpy scalar alike, at a tenth of np.reshape's cost per call
    return {k: float(v.item(i)) if hasattr(v, "item") else float(np.reshape(v, -1)[i]) for k, v in scores.items()}
