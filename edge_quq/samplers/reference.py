"""The reference sampler: vectorised numpy, all N * T masks at once, one matrix product per layer.

Faster samplers (native kernel, exported TFLite/ONNX head, closed form) must agree with it; the
conformance test (tests/test_samplers_conformance.py) compares them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from edge_quq.samplers.base import HeadMoments, Sampler, as_rows, mc_probs, mc_probs_with_masks, moments_from_probs, unbatch


class NumpySampler(Sampler):
    """Inverted dropout with masks from the shared stream (edge_quq.samplers.base.draw_keep_masks)."""

    name = "numpy"
    same_stream = True
    takes_masks = True

    def sample_rows(self, x: np.ndarray, num_iter: int) -> HeadMoments:
        return moments_from_probs(mc_probs(self.head, x, num_iter, self.rng), self.head, self.head.logits(x))

    def sample_with_masks(self, features: np.ndarray, masks: Sequence[Optional[np.ndarray]]) -> HeadMoments:
        """Moments for caller-given masks ([N * T, in_i], sample-major; None = keep all): the hook other
        samplers are compared against."""
        x = as_rows(features, self.head.feature_size)
        t = next(m.shape[0] for m in masks if m is not None) // len(x)
        probs = mc_probs_with_masks(self.head, x, masks, t)
        return unbatch(features, moments_from_probs(probs, self.head, self.head.logits(x)))
