"""Head samplers: T Monte-Carlo dropout samples of the head for one feature vector -> per-class moments.

Every sampler returns HeadMoments. `NumpySampler` is the reference: all T masks drawn at once, inverted
dropout scaling, one matrix product per layer. Faster samplers (native kernel, exported TFLite/ONNX head,
closed form) must agree with it; tests compare them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Type

import numpy as np

from edge_quq.errors import OptionError
from edge_quq.head import HeadWeights

if TYPE_CHECKING:
    from edge_quq.bundle import Bundle

_EPS = 1e-12


@dataclass
class HeadMoments:
    """Per-class statistics of the head output over T dropout samples (std with ddof=0).

    Probabilities (mean, std, deterministic, expected_entropy) include the bundle's temperature; `logits`
    are the raw eval-mode logits, before it."""

    mean: np.ndarray  # [C] MC mean of the output probabilities
    std: np.ndarray  # [C] MC standard deviation of the output probabilities
    deterministic: np.ndarray  # [C] eval-mode (no dropout) probabilities
    logits: np.ndarray  # [C] eval-mode logits
    expected_entropy: float  # mean over samples of the per-sample entropy (for mutual information)
    num_samples: int


def sample_entropy(probs: np.ndarray, activation: str) -> np.ndarray:
    """Entropy per row of probs [T, C]: Shannon for softmax, sum of per-class binary entropies otherwise."""
    p = np.clip(probs.astype(np.float64), _EPS, 1.0)
    if activation == "softmax":
        return -np.sum(p * np.log(p), axis=-1)
    q = np.clip(1.0 - probs.astype(np.float64), _EPS, 1.0)
    return -np.sum(p * np.log(p) + q * np.log(q), axis=-1)


def draw_keep_masks(rng: np.random.Generator, head: HeadWeights, t: int) -> List[Optional[np.ndarray]]:
    """0/1 keep masks, one [T, in_i] float32 array per dropout block (None where the rate is 0)."""
    masks: List[Optional[np.ndarray]] = []
    fan_in = head.feature_size
    for rate, k in zip(head.rates, head.kernels):
        if rate > 0.0:
            masks.append((rng.random((t, fan_in), dtype=np.float32) >= np.float32(rate)).astype(np.float32))
        else:
            masks.append(None)
        fan_in = k.shape[1]
    return masks


def moments_from_samples(probs: np.ndarray, head: HeadWeights, det_logits: np.ndarray) -> HeadMoments:
    p64 = probs.astype(np.float64)
    return HeadMoments(
        mean=p64.mean(axis=0),
        std=p64.std(axis=0),
        deterministic=head.probs_from_logits(det_logits.astype(np.float64)[None, :])[0],
        logits=det_logits.astype(np.float64),
        expected_entropy=float(sample_entropy(probs, head.activation).mean()),
        num_samples=int(probs.shape[0]),
    )


class Sampler:
    """Base: subclasses implement `sample`. `name` is what `--sampler` calls it."""

    name = "base"

    def __init__(self, head: HeadWeights, seed: Optional[int] = None, bundle: Optional["Bundle"] = None, threads: Optional[int] = None) -> None:
        # bundle and threads matter only to samplers that run exported head models (TFLite/ONNX).
        self.head = head
        self.seed = seed
        self.bundle = bundle
        self.threads = threads
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: Optional[int]) -> None:
        """Restart the mask stream; samplers with their own generator override this."""
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def sample(self, features: np.ndarray, num_iter: int) -> HeadMoments:
        raise NotImplementedError

    def sample_batch(self, features: np.ndarray, num_iter: int) -> List[HeadMoments]:
        return [self.sample(f, num_iter) for f in np.asarray(features, dtype=np.float32)]


class NumpySampler(Sampler):
    """Reference sampler: vectorised numpy, all T masks at once."""

    name = "numpy"

    def sample(self, features: np.ndarray, num_iter: int) -> HeadMoments:
        x = np.asarray(features, dtype=np.float32).reshape(1, -1)
        det_logits = self.head.logits(x)[0]
        masks = draw_keep_masks(self.rng, self.head, num_iter)
        probs = self.head.probs(np.broadcast_to(x, (num_iter, x.shape[1])), masks)
        return moments_from_samples(probs, self.head, det_logits)

    def sample_with_masks(self, features: np.ndarray, masks: Sequence[Optional[np.ndarray]]) -> HeadMoments:
        """Moments for caller-given masks: the hook other samplers are compared against."""
        x = np.asarray(features, dtype=np.float32).reshape(1, -1)
        t = next(m.shape[0] for m in masks if m is not None)
        det_logits = self.head.logits(x)[0]
        probs = self.head.probs(np.broadcast_to(x, (t, x.shape[1])), masks)
        return moments_from_samples(probs, self.head, det_logits)


SAMPLERS: Dict[str, Type[Sampler]] = {"numpy": NumpySampler}


def make_sampler(name: str, head: HeadWeights, seed: Optional[int] = None, bundle: Optional["Bundle"] = None, threads: Optional[int] = None) -> Sampler:
    """Build a sampler by name. `auto` = "native" when the C extension is built and the head is the canonical
    2-block shape it handles (edge_quq.sampler_native.supports), else "numpy"; both give the same moments."""
    if name in ("tflite", "onnx"):
        import edge_quq.sampler_runtime  # noqa: F401  (registers the exported-head samplers)
    if name == "analytic":
        import edge_quq.analytic  # noqa: F401  (registers the closed-form sampler)
    if name in ("native", "auto"):
        from edge_quq import sampler_native  # registers "native"; imports without the extension built
        if name == "auto":
            name = "native" if sampler_native.available() and sampler_native.supports(head) else "numpy"
    cls = SAMPLERS.get(name)
    if cls is None:
        raise OptionError(f"sampler {name!r} is not available here (available: {', '.join(sorted(SAMPLERS))})")
    return cls(head, seed=seed, bundle=bundle, threads=threads)
