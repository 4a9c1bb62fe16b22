"""Random heads for the parity tests: every parity test (sampler vs reference, closed form vs MC, bench vs
runtime) runs over PARITY_HEADS, a sigmoid and a softmax head with one and with two hidden layers."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_quq.head import HeadWeights


def random_head(f: int, hidden: Sequence[int], c: int, rates: Sequence[float], activation: str, seed: int = 0,
                temperature: float = 1.0) -> HeadWeights:
    """He-scaled random head: blocks F -> hidden... -> C, rates[i] on block i's input."""
    rng = np.random.default_rng(seed)
    sizes = [f, *hidden, c]
    kernels = tuple((rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32) for a, b in zip(sizes, sizes[1:]))
    biases = tuple((rng.normal(size=b) * 0.1).astype(np.float32) for b in sizes[1:])
    return HeadWeights(kernels=kernels, biases=biases, rates=tuple(rates), activation=activation, temperature=temperature)


# (id, activation, hidden sizes, rates)
PARITY_SHAPES = [
    ("sigmoid-1hidden", "sigmoid", (32,), (0.2, 0.5)),
    ("softmax-1hidden", "softmax", (32,), (0.2, 0.5)),
    ("sigmoid-2hidden", "sigmoid", (24, 16), (0.1, 0.3, 0.5)),
    ("softmax-2hidden", "softmax", (24, 16), (0.0, 0.3, 0.5)),
]
PARITY_IDS = [s[0] for s in PARITY_SHAPES]


def parity_head(shape_id: str, f: int = 16, c: int = 5, seed: int = 0) -> HeadWeights:
    _, act, hidden, rates = next(s for s in PARITY_SHAPES if s[0] == shape_id)
    return random_head(f, hidden, c, rates, act, seed)


def relu_rows(n: int, f: int, seed: int) -> np.ndarray:
    """Backbone-like features: non-negative, some exactly zero."""
    return (np.maximum(np.random.default_rng(seed).normal(size=(n, f)), 0) * 2).astype(np.float32)


def int8_tolerance(mean: np.ndarray, activation: str) -> tuple:
    """The int8 kernel variants' tolerance against the float reference with the same masks (docs/samplers.md):
    the features are quantised per tensor and W0 per column, so the outputs move by up to ~1% of their scale.
    (mean, std) absolute tolerances: 0.02 and 0.01 on probabilities (sigmoid, softmax); 0.05 times the logits'
    scale (the largest |logit|, at least 1) on both for linear heads, whose raw logits average nothing out."""
    if activation == "linear":
        scale = max(1.0, float(np.max(np.abs(mean))))
        return 0.05 * scale, 0.05 * scale
    return 0.02, 0.01
