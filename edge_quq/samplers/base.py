"""What every head sampler shares: the moments it returns, the mask stream and the batched MC math.

A sampler turns backbone features into per-class moments of the head output under MC dropout. Features
are rows [N, F] (a single [F] vector is a batch of one and gives unbatched moments). The mask stream is
shared: for a seed, sample i of a batch gets the masks that the i-th of N single calls would get, and the
numpy, TFLite and ONNX samplers all draw from it (draw_keep_masks), so they see identical masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from edge_quq.head import HeadWeights
from edge_quq.scores import entropy


@dataclass
class HeadMoments:
    """Per-class statistics of the head output over T dropout samples (std with ddof=0).

    Arrays are [N, C] (expected_entropy [N]) for a batch and [C] (a float) for one sample. Probabilities
    (mean, std, deterministic, expected_entropy) include the bundle's temperature; `logits` are the raw
    eval-mode logits, before it."""

    mean: np.ndarray  # MC mean of the output probabilities
    std: np.ndarray  # MC standard deviation of the output probabilities
    deterministic: np.ndarray  # eval-mode (no dropout) probabilities
    logits: np.ndarray  # eval-mode logits
    expected_entropy: Union[np.ndarray, float]  # mean over samples of the per-sample entropy (for mutual information)
    num_samples: int

    def row(self, i: int) -> "HeadMoments":
        """Sample i of a batch, unbatched."""
        return HeadMoments(self.mean[i], self.std[i], self.deterministic[i], self.logits[i],
                           float(np.asarray(self.expected_entropy)[i]), self.num_samples)


def draw_keep_masks(rng: np.random.Generator, head: HeadWeights, t: int) -> List[Optional[np.ndarray]]:
    """0/1 keep masks for one sample, one [T, in_i] float32 array per dropout block (None where the rate is 0)."""
    masks: List[Optional[np.ndarray]] = []
    fan_in = head.feature_size
    for rate, k in zip(head.rates, head.kernels):
        if rate > 0.0:
            masks.append((rng.random((t, fan_in), dtype=np.float32) >= np.float32(rate)).astype(np.float32))
        else:
            masks.append(None)
        fan_in = k.shape[1]
    return masks


def full_keep_masks(rng: np.random.Generator, head: HeadWeights, t: int) -> List[np.ndarray]:
    """draw_keep_masks with all-ones arrays where a block has no dropout (models that take every mask)."""
    fans = [head.feature_size] + head.hidden_sizes
    return [np.ones((t, f), np.float32) if m is None else m for m, f in zip(draw_keep_masks(rng, head, t), fans)]


def draw_batch_masks(rng: np.random.Generator, head: HeadWeights, n: int, t: int) -> List[Optional[np.ndarray]]:
    """Masks for n samples of t rows each, [n * t, in_i] sample-major, drawn sample by sample from the stream."""
    per = [draw_keep_masks(rng, head, t) for _ in range(n)]
    return [None if per[0][b] is None else np.concatenate([p[b] for p in per]) for b in range(len(head.kernels))]


def mc_probs_with_masks(head: HeadWeights, feats: np.ndarray, masks: Sequence[Optional[np.ndarray]], t: int) -> np.ndarray:
    """[N, T, C] output probabilities for rows feats [N, F] and sample-major masks [N * T, in_i]."""
    x = np.asarray(feats, np.float32)
    return head.probs(np.repeat(x, t, axis=0), masks).reshape(len(x), t, -1)


def mc_probs(head: HeadWeights, feats: np.ndarray, t: int, rng: np.random.Generator, chunk: int = 1000) -> np.ndarray:
    """[N, T, C] output probabilities of T dropout samples per row of feats [N, F], masks from the shared
    stream; chunked to bound memory (the chunk does not change the result)."""
    x = np.asarray(feats, np.float32)
    out = np.empty((len(x), t, head.num_classes), np.float32)
    for s in range(0, len(x), chunk):
        rows = x[s : s + chunk]
        out[s : s + len(rows)] = mc_probs_with_masks(head, rows, draw_batch_masks(rng, head, len(rows), t), t)
    return out


def moments_from_probs(probs: np.ndarray, head: HeadWeights, det_logits: np.ndarray) -> HeadMoments:
    """Batched moments from MC samples probs [N, T, C] and eval-mode logits [N, C]."""
    p64 = probs.astype(np.float64)
    logits = np.asarray(det_logits, np.float64)
    return HeadMoments(
        mean=p64.mean(axis=1),
        std=p64.std(axis=1),
        deterministic=head.probs_from_logits(logits),
        logits=logits,
        expected_entropy=entropy(probs, head.activation).mean(axis=1),
        num_samples=int(probs.shape[1]),
    )


def as_rows(features: np.ndarray, feature_size: int) -> np.ndarray:
    """Features [F] or [N, F] as float32 rows [N, F]."""
    x = np.asarray(features, np.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, feature_size)


class Sampler:
    """Base: subclasses implement `sample_rows` (batched). `name` is what `--sampler` calls it.

    `same_stream`: seeded results equal the reference's (same masks); `takes_masks`: has
    `sample_with_masks(features, masks)` for caller-given masks."""

    name = "base"
    same_stream = False
    takes_masks = False

    def __init__(self, head: HeadWeights, seed: Optional[int] = None) -> None:
        self.head = head
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: Optional[int]) -> None:
        """Restart the mask stream; samplers with their own generator override this."""
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def sample(self, features: np.ndarray, num_iter: int) -> HeadMoments:
        """Moments for features [N, F] (batched) or [F] (one sample, unbatched)."""
        return unbatch(features, self.sample_rows(as_rows(features, self.head.feature_size), num_iter))

    def sample_rows(self, x: np.ndarray, num_iter: int) -> HeadMoments:
        raise NotImplementedError


def unbatch(features: np.ndarray, moments: HeadMoments) -> HeadMoments:
    return moments.row(0) if np.ndim(features) == 1 else moments
