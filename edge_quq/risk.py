"""Selective classification with a finite-sample guarantee: the keep threshold of the `risk` policy.

Pure numpy (no scipy on the board). Inputs are what a bundle stores: calibration confidence scores (HIGHER =
MORE confident, e.g. the MC-mean max probability) and whether each calibration prediction was correct.
The rule is keep iff score > threshold (strict: the guarantee's argument needs it, see below).

Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021, arXiv 2110.01052), selective risk:
- For a threshold t, R(t) = P(wrong | score > t). Null hypothesis H_t: R(t) > target.
- Given the m calibration points kept at t, their errors are Binomial(m, R(t)), so
  p_t = P(Binomial(m, target) <= errors) is a valid p-value for H_t (exact binomial tail; the
  Hoeffding-Bentkus p-value of the LTT paper is available too and is never smaller for 0/1 losses).
- Fixed-sequence testing: thresholds are the distinct calibration scores, from the most confident down,
  then "keep all". Testing starts at the first threshold that keeps at least start_kept(target, delta)
  points (a count fixed by target and delta alone: where half the target as empirical error would
  certify; with fewer than ceil(ln(delta) / ln(1 - target)) not even zero errors could). It walks down
  while p_t <= delta and returns the last rejected threshold.
- Guarantee: with probability >= 1 - delta over the calibration draw, R(threshold) <= target, for
  exchangeable (calibration, test) data. Argument: let tau = sup{t: R(t) > target}. A violation means the
  walk rejected the first candidate at or below tau; with strict keeping, that candidate keeps exactly the
  points with score > tau, a fixed set, whose test is exact (continuous scores). This needs R to be
  non-increasing in t between tau and the starting threshold when the start lies below tau (an error rate
  that rises as only more confident points are kept); a usable confidence score has that shape, and the
  tests check the violation rate empirically.
- Not promised: anything under distribution shift, or the error of one particular prediction.

SGR (Geifman & El-Yaniv 2017, "Selective classification for deep neural networks") is sgr_threshold: a
binary search over the sorted scores with a binomial upper bound at level delta / ceil(log2 n) per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Tuple

import numpy as np

from edge_quq.conformal import check_level
from edge_quq.errors import InputError, OptionError

BOUNDS: Tuple[str, ...] = ("binomial", "hb")
_TINY = 1e-300


# --- binomial tail, scipy-free ----------------------------------------------------------------------------

def _log_factorials(upto: int) -> np.ndarray:
    """log(k!) for k = 0..upto, exact to float rounding (cumulative sum of logs)."""
    return np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, upto + 1, dtype=np.float64)))))


def _beta_cf(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_iter: int = 100000) -> np.ndarray:
    """Continued fraction of the incomplete beta (modified Lentz), vectorised; converges fast for
    x < (a + 1) / (a + b + 2), the only side it is called on."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < _TINY, _TINY, d)
    h = d.copy()
    active = np.ones(x.shape, bool)
    for m in range(1, max_iter + 1):
        m2 = 2.0 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < _TINY, _TINY, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < _TINY, _TINY, c)
            step = d * c
            h = np.where(active, h * step, h)
        active &= np.abs(step - 1.0) > 1e-15
        if not active.any():
            break
    return h


def binom_cdf(k: np.ndarray, n: np.ndarray, p: np.ndarray) -> np.ndarray:
    """P(Binomial(n, p) <= k), elementwise over integer arrays k, n and probabilities p (broadcast), via the
    regularised incomplete beta I_{1-p}(n - k, k + 1) and a continued fraction. Accurate to ~1e-12
    relative; the tests check it against scipy.stats.binom.cdf."""
    k_arr, n_arr, p_arr = np.broadcast_arrays(np.asarray(k, np.int64), np.asarray(n, np.int64),
                                              np.asarray(p, np.float64))
    out = np.where(k_arr >= n_arr, 1.0, 0.0)
    inner = (k_arr >= 0) & (k_arr < n_arr)
    out[inner & (p_arr <= 0.0)] = 1.0
    inner &= (p_arr > 0.0) & (p_arr < 1.0)
    if not inner.any():
        return out
    kk, nn, x = k_arr[inner].astype(np.float64), n_arr[inner].astype(np.float64), 1.0 - p_arr[inner]
    a, b = nn - kk, kk + 1.0
    lf = _log_factorials(int(nn.max()) + 1)
    log_beta = lf[(a - 1).astype(np.int64)] + lf[(b - 1).astype(np.int64)] - lf[(a + b - 1).astype(np.int64)]
    log_front = a * np.log(x) + b * np.log1p(-x) - log_beta
    direct = x < (a + 1.0) / (a + b + 2.0)
    res = np.empty_like(a)
    if direct.any():
        res[direct] = np.exp(log_front[direct]) * _beta_cf(a[direct], b[direct], x[direct]) / a[direct]
    flip = ~direct
    if flip.any():
        cf = _beta_cf(b[flip], a[flip], 1.0 - x[flip])
        res[flip] = 1.0 - np.exp(log_front[flip]) * cf / b[flip]
    out[inner] = np.clip(res, 0.0, 1.0)
    return out


def binomial_pvalue(errors: np.ndarray, kept: np.ndarray, target: float) -> np.ndarray:
    """p-value of H: error rate > target, from `errors` wrong among `kept` (1 where nothing is kept)."""
    return np.where(np.asarray(kept) > 0, binom_cdf(errors, kept, target), 1.0)


def hb_pvalue(errors: np.ndarray, kept: np.ndarray, target: float) -> np.ndarray:
    """Hoeffding-Bentkus p-value of the LTT paper: min(exp(-m h(min(r, a), a)), e * P(Bin(m, a) <= m r))."""
    e, m = np.asarray(errors, np.float64), np.asarray(kept, np.float64)
    r = np.minimum(np.divide(e, m, out=np.zeros_like(e), where=m > 0), target)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(r > 0, r * np.log(r / target), 0.0) + (1 - r) * np.log((1 - r) / (1 - target))
    hoeffding = np.exp(-m * h)
    bentkus = math.e * binom_cdf(np.ceil(m * r - 1e-9).astype(np.int64), m.astype(np.int64), target)
    return np.where(m > 0, np.minimum(np.minimum(hoeffding, bentkus), 1.0), 1.0)


# --- calibration table and the threshold --------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationTable:
    """Calibration data as a bundle stores it: scores sorted descending, and 1 where that prediction was wrong."""

    scores: np.ndarray   # float64 [n], descending
    wrong: np.ndarray    # uint8 [n]

    @classmethod
    def build(cls, scores: np.ndarray, correct: np.ndarray) -> "CalibrationTable":
        s = np.asarray(scores, np.float64).ravel()
        c = np.asarray(correct).ravel()
        if s.shape != c.shape or s.size == 0:
            raise InputError("calibration scores and correctness must be two non-empty arrays of one length, "
                             f"got {s.shape} and {c.shape}")
        if not np.all(np.isfinite(s)):
            raise InputError("calibration confidence scores must all be finite")
        order = np.argsort(-s, kind="stable")
        return cls(scores=s[order], wrong=(~c.astype(bool))[order].astype(np.uint8))

    def candidates(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds, kept, errors): thresholds descending (distinct scores, then -inf = keep all);
        kept[j] = #{score > thresholds[j]}, errors[j] the wrong ones among them."""
        neg_vals, first = np.unique(-self.scores, return_index=True)
        cum = np.concatenate(([0], np.cumsum(self.wrong, dtype=np.int64)))
        thresholds = np.concatenate((-neg_vals, [-np.inf]))
        kept = np.concatenate((first, [self.scores.size])).astype(np.int64)
        return thresholds, kept, cum[kept]


@dataclass(frozen=True)
class RiskThreshold:
    """The chosen keep threshold (keep iff score > threshold) and what it achieved on calibration data."""

    threshold: float
    coverage: float        # share of calibration samples kept
    kept: int
    errors: int
    p_value: float         # LTT: p-value of the last rejected test; SGR: the risk bound
    target_error: float
    delta: float
    method: str


def min_kept(target: np.ndarray, delta: float) -> np.ndarray:
    """Fewest kept points at which zero errors reject H (p = (1 - target)^m <= delta)."""
    return np.ceil(np.log(delta) / np.log1p(-np.asarray(target, np.float64)) - 1e-12).astype(np.int64)


def start_kept(target: np.ndarray, delta: float) -> np.ndarray:
    """Kept count where the walk starts: where an empirical error of half the target would already
    certify the target (normal approximation, m = 4 z^2 (1 - a) / a, z = Phi^-1(1 - delta)), and never
    below min_kept. It depends on (target, delta) only, not on the data, which the guarantee needs; it
    keeps one unlucky error among the very first points from stopping the walk."""
    a = np.asarray(target, np.float64)
    z = NormalDist().inv_cdf(1.0 - delta)
    return np.maximum(min_kept(a, delta), np.ceil(4.0 * z * z * (1.0 - a) / a).astype(np.int64))


def _pvalues(errors: np.ndarray, kept: np.ndarray, target: float, bound: str) -> np.ndarray:
    if bound == "binomial":
        return binomial_pvalue(errors, kept, target)
    if bound == "hb":
        return hb_pvalue(errors, kept, target)
    raise OptionError(f"unknown risk bound {bound!r}; choose from {', '.join(BOUNDS)}")


def smallest_reachable_target(table: CalibrationTable, delta: float, bound: str = "binomial") -> float:
    """The smallest target on a 1e-4 grid whose fixed-sequence walk rejects its first test (nan: none)."""
    _, kept, errors = table.candidates()
    grid = np.arange(1, 10000, dtype=np.float64) / 10000.0
    start = np.searchsorted(kept, start_kept(grid, delta), side="left")  # kept never decreases
    ok = start < kept.size
    p = _pvalues(errors[start[ok]], kept[start[ok]], grid[ok], bound)
    reach = np.flatnonzero(p <= delta)
    return float(grid[ok][reach[0]]) if reach.size else float("nan")


def ltt_threshold(table: CalibrationTable, target_error: float, delta: float = 0.05,
                  bound: str = "binomial") -> RiskThreshold:
    """Learn-then-Test keep threshold (module docstring); OptionError naming the smallest reachable target
    when the calibration data cannot certify `target_error` at `delta`."""
    target = check_level(target_error, "target error")
    delta = check_level(delta, "delta")
    thresholds, kept, errors = table.candidates()
    start = int(np.searchsorted(kept, start_kept(target, delta), side="left"))
    p = _pvalues(errors[start:], kept[start:], target, bound) if start < kept.size else np.ones(0)
    fail = np.flatnonzero(p > delta)
    last = (fail[0] if fail.size else p.size) - 1
    if last < 0:
        best = smallest_reachable_target(table, delta, bound)
        hint = (f"the smallest reachable target is {best:.4f}" if np.isfinite(best)
                else "no target below 1 is reachable")
        raise OptionError(f"target error {target:g} cannot be certified at delta {delta:g} from "
                          f"{table.scores.size} calibration samples; {hint}")
    j = start + last
    n = table.scores.size
    return RiskThreshold(threshold=float(thresholds[j]), coverage=float(kept[j]) / n, kept=int(kept[j]),
                         errors=int(errors[j]), p_value=float(p[last]), target_error=target, delta=delta,
                         method=f"ltt-{bound}")


def binomial_upper_bound(errors: int, kept: int, level: float) -> float:
    """Clopper-Pearson upper bound: the b with P(Bin(kept, b) <= errors) = level (bisection; 1 if kept = 0)."""
    if kept <= 0 or errors >= kept:
        return 1.0
    lo, hi = errors / kept, 1.0
    for _ in range(6):  # each round: one vectorised tail over 64 points shrinks the bracket 63-fold (~1e-11)
        grid = np.linspace(lo, hi, 64)
        above = binom_cdf(errors, kept, grid) > level  # decreasing in b: True then False
        i = int(np.count_nonzero(above))
        lo, hi = grid[max(i - 1, 0)], grid[min(i, 63)]
    return float(hi)


def sgr_threshold(table: CalibrationTable, target_error: float, delta: float = 0.05) -> RiskThreshold:
    """Selection with guaranteed risk (Geifman & El-Yaniv 2017, Algorithm 1): binary search over the
    candidate thresholds for ceil(log2 n) steps, each step's risk bounded by Clopper-Pearson at
    delta / steps (union bound); the most covering threshold whose bound is below the target wins."""
    target = check_level(target_error, "target error")
    delta = check_level(delta, "delta")
    thresholds, kept, errors = table.candidates()
    steps = max(1, math.ceil(math.log2(table.scores.size)))
    lo, hi, best, best_bound = 0, kept.size - 1, -1, 1.0
    for _ in range(steps):
        j = (lo + hi + 1) // 2
        bound = binomial_upper_bound(int(errors[j]), int(kept[j]), delta / steps)
        if bound < target:
            lo, best, best_bound = j, max(best, j), bound
        else:
            hi = j - 1
        if lo >= hi:
            break
    if best < 0:
        raise OptionError(f"target error {target:g} cannot be certified at delta {delta:g} by SGR from "
                          f"{table.scores.size} calibration samples")
    n = table.scores.size
    return RiskThreshold(threshold=float(thresholds[best]), coverage=float(kept[best]) / n, kept=int(kept[best]),
                         errors=int(errors[best]), p_value=best_bound, target_error=target, delta=delta,
                         method="sgr")


def keep_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The risk policy's keep decision for a batch of confidence scores (strict >, as calibrated)."""
    return np.asarray(scores, np.float64) > threshold
