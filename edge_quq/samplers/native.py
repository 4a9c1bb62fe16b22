"""The native head sampler: T MC-dropout samples of a 2-block head in C (edge_quq/csrc/headkernel.c).

Same moments as NumpySampler for the same masks (within float32 rounding), several times faster: the first
layer is computed once densely and each sample only subtracts the rows of its dropped units; masks come from
the kernel's own xoshiro256** generator, 64 samples at a time. The kernel variant (NEON, AVX2+FMA, SSE2, plain C)
is picked at run time from the CPU; `kernel_isa()` says which one runs. On ARMv8.2 CPUs with the dot product
(`asimddp`, Cortex-A76 / Pi 5) the default 'neon_sdot' runs the first layer in int8 (`kernel_is_int8`). The kernel takes one feature vector
per call; a batch is a loop over its rows.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from edge_quq.errors import OptionError
from edge_quq.head import HeadWeights, output_activation
from edge_quq.samplers.base import HeadMoments, Sampler, as_rows, unbatch

try:
    from edge_quq import _headkernel as _kernel  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the numpy sampler remains
    _kernel = None

_ACTIVATIONS = {"linear": 0, "sigmoid": 1, "softmax": 2}


def available() -> bool:
    """True when the C extension was built and imports."""
    return _kernel is not None


def kernel_isa() -> Optional[str]:
    """The kernel variant used by default here ('avx2_fma', 'sse2', 'neon_sdot', 'neon' or 'scalar'), None without
    the extension."""
    return _kernel.isa() if _kernel is not None else None


def kernel_isas() -> Tuple[str, ...]:
    """Variants usable on this CPU, best first; 'scalar' (the plain C reference) is always last."""
    return tuple(_kernel.isas()) if _kernel is not None else ()


def kernel_is_int8(isa: str) -> bool:
    """True for a variant whose first layer runs in int8 (quantised features and W0; docs/samplers.md gives its
    tolerance against the float reference): 'neon_sdot', and 'scalar_i8', its plain C reference."""
    return _kernel is not None and bool(_kernel.is_int8(isa))


def supports(head: HeadWeights) -> bool:
    """The kernel handles the canonical head: one hidden ReLU block, then the output block."""
    return (
        len(head.kernels) == 2
        and head.relu_only
        and head.activation in _ACTIVATIONS
        and all(0.0 <= float(r) < 1.0 for r in head.rates)
    )


class NativeSampler(Sampler):
    """MC dropout in C. `isa` forces a kernel variant (tests compare them); None picks the best."""

    name = "native"

    takes_masks = True

    def __init__(self, head: HeadWeights, seed: Optional[int] = None, isa: Optional[str] = None) -> None:
        super().__init__(head, seed)
        if _kernel is None:
            raise OptionError("sampler 'native' is not available: the C extension edge_quq._headkernel was not built "
                              "(reinstall with a C compiler, or use --sampler numpy)")
        if not supports(head):
            raise OptionError(f"sampler 'native' needs a head with exactly 2 dense blocks, a ReLU hidden layer and rates in [0, 1); "
                              f"this one has {len(head.kernels)} blocks, hidden {list(head.hidden_activations)}, "
                              f"rates {list(head.rates)}, activation {head.activation!r} (use --sampler numpy)")
        # 'scalar_i8' (the int8 variants' plain C reference) runs anywhere but is never picked by default.
        if isa is not None and isa not in _kernel.isas() + ("scalar_i8",):
            raise OptionError(f"kernel variant {isa!r} is not available here (available: {', '.join(_kernel.isas())})")
        self.isa = isa or _kernel.isa()
        # Contiguous float32 copies once, so that each call only borrows buffers.
        self._w0, self._w1 = (np.ascontiguousarray(k, dtype=np.float32) for k in head.kernels)
        self._b0, self._b1 = (np.ascontiguousarray(b, dtype=np.float32) for b in head.biases)
        # The temperature folds into the last layer: (h W1 + b1) / T = h (W1 / T) + b1 / T, so the kernel
        # needs no change; the logits it returns are divided by T and are scaled back for reporting.
        self._temperature = float(head.temperature)
        if self._temperature != 1.0:
            self._w1 = np.ascontiguousarray(self._w1 / np.float32(self._temperature), dtype=np.float32)
            self._b1 = np.ascontiguousarray(self._b1 / np.float32(self._temperature), dtype=np.float32)
        self._rates = (float(head.rates[0]), float(head.rates[1]))
        self._act = _ACTIVATIONS[head.activation]
        # Int8 variants: W0 quantised once here rather than on every call.
        self._int8 = {}
        if kernel_is_int8(self.isa):
            h = self._b0.shape[0]
            w0q = np.empty((self._w0.shape[0], _kernel.w0q_stride(h)), np.int8)
            w0s = np.empty(h, np.float32)
            _kernel.quantize_w0(self._w0, h, w0q, w0s)
            self._int8 = {"w0q": w0q, "w0s": w0s}

    def _args(self, x: np.ndarray):
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
        if x.shape[0] != self._w0.shape[0]:
            raise OptionError(f"features have size {x.shape[0]}, the head expects {self._w0.shape[0]}")
        return (x, self._w0, self._b0, self._w1, self._b1, self._rates[0], self._rates[1], self._act)

    def _moments(self, mean: np.ndarray, std: np.ndarray, logits: np.ndarray, ent: np.ndarray, t: int) -> HeadMoments:
        # logits here are the kernel's, already divided by the temperature.
        return HeadMoments(
            mean=mean,
            std=std,
            deterministic=output_activation(logits.astype(np.float64), self.head.activation),
            logits=logits.astype(np.float64) * self._temperature,
            expected_entropy=ent,
            num_samples=int(t),
        )

    def _buffers(self, n: int):
        c = self._b1.shape[0]
        return np.empty((n, c)), np.empty((n, c)), np.empty((n, c), np.float32), np.empty(n)

    def sample_rows(self, x: np.ndarray, num_iter: int) -> HeadMoments:
        mean, std, logits, ent = self._buffers(len(x))
        for i, row in enumerate(x):
            # One kernel seed per sample from the sampler's generator: a fixed seed reproduces the whole
            # stream, a batch equals the same samples one by one, and reseed() works as for the other samplers.
            kseed = int(self.rng.integers(0, 2**63))
            ent[i] = _kernel.moments(*self._args(row), int(num_iter), mean[i], std[i], logits[i], seed=kseed, isa=self.isa,
                                      **self._int8)
        return self._moments(mean, std, logits, ent, num_iter)

    def sample_with_masks(self, features: np.ndarray, masks: Sequence[Optional[np.ndarray]],
                          return_probs: bool = False):
        """Moments for caller-given 0/1 keep masks ([N * T, F], [N * T, H], sample-major; None = keep all),
        as NumpySampler's.

        With return_probs, also every sample's outputs ([T, C], or [N, T, C] for a batch) for exact
        per-sample comparisons."""
        x = as_rows(features, self.head.feature_size)
        n = len(x)
        t = next(m.shape[0] for m in masks if m is not None) // n
        k0, k1 = (None if m is None else np.ascontiguousarray(np.asarray(m) != 0, dtype=np.uint8).reshape(n, t, -1)
                  for m in masks)
        mean, std, logits, ent = self._buffers(n)
        probs = np.empty((n, t, self._b1.shape[0]), np.float32)
        for i, row in enumerate(x):
            ent[i] = _kernel.moments_with_masks(*self._args(row), int(t), mean[i], std[i], logits[i],
                                                mask0=None if k0 is None else k0[i], mask1=None if k1 is None else k1[i],
                                                probs_out=probs[i], isa=self.isa, **self._int8)
        m = unbatch(features, self._moments(mean, std, logits, ent, t))
        if not return_probs:
            return m
        return m, (probs[0] if np.ndim(features) == 1 else probs)
