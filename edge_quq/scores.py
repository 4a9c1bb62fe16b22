"""Uncertainty scores beside the decision, as pure functions of the head moments.

Directions: for every score here a HIGHER value means LESS trust (more likely wrong or out-of-distribution),
except `max_prob`, where higher means more trust. The benchmark suite relies on these directions.

- max_prob: the largest MC-mean probability.
- predictive_entropy: entropy of the MC-mean prediction (Shannon for softmax; for sigmoid heads the sum of
  the per-class binary entropies, since each class is its own Bernoulli).
- mutual_information: predictive entropy minus the mean per-sample entropy (the epistemic part; the BALD
  quantity for softmax heads, its per-class-Bernoulli sum for sigmoid heads).
- mean_variance: mean over classes of the MC variance.
- energy: from the eval-mode logits. Softmax: -logsumexp(logits) (Liu et al. 2020). Sigmoid: the joint
  energy -sum_c softplus(logit_c) (Wang et al. 2021), which treats each class logit as its own two-way
  softmax against zero. Higher energy = less in-distribution.
The predictor adds `gradient` (edge_quq.gradients), which needs the features, not only the moments.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

_EPS = 1e-12


def entropy_of(p: np.ndarray, activation: str) -> float:
    p = np.asarray(p, dtype=np.float64)
    pc = np.clip(p, _EPS, 1.0)
    if activation == "softmax":
        return float(-np.sum(pc * np.log(pc)))
    qc = np.clip(1.0 - p, _EPS, 1.0)
    return float(-np.sum(pc * np.log(pc) + qc * np.log(qc)))


def energy_of(logits: np.ndarray, activation: str) -> float:
    z = np.asarray(logits, dtype=np.float64)
    if activation == "softmax":
        m = np.max(z)
        return float(-(m + np.log(np.sum(np.exp(z - m)))))
    # softplus(z) = log(1 + e^z), computed without overflow
    return float(-np.sum(np.logaddexp(0.0, z)))


def compute_scores(mean: np.ndarray, std: np.ndarray, logits: np.ndarray, expected_entropy: float, activation: str) -> Dict[str, float]:
    pe = entropy_of(mean, activation)
    scores = {
        "max_prob": float(np.max(mean)),
        "predictive_entropy": pe,
        "mutual_information": max(0.0, pe - float(expected_entropy)),
        "mean_variance": float(np.mean(np.square(std))),
    }
    if activation in ("sigmoid", "softmax"):
        scores["energy"] = energy_of(logits, activation)
    return scores
