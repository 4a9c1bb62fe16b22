"""The OOD gate's math: conformal p-values of detector scores, their combination, the keep/ignore decision.

Pure batched numpy, no I/O. Scores follow the detectors' direction (edge_quq.detectors): HIGHER = MORE
out-of-distribution. docs/decisions.md has the guarantees and their limits.

p-value (split/inductive conformal, Vovk et al. 2005; Angelopoulos & Bates 2021, "A gentle introduction"):
    p(s) = (1 + #{cal >= s}) / (n + 1)
over n calibration scores from held-out in-distribution data that was not used to fit the detector. If the
test point and the calibration points are exchangeable, P(p <= a) <= a for every a in [0, 1].
The smoothed (randomised) variant, p = (#{cal > s} + U * (1 + #{cal == s})) / (n + 1) with U ~ U(0, 1), is
exactly uniform under the same assumption; the drift martingale (edge_quq.drift) wants that one.

Combining D detectors' p-values of one input into one p-value, valid whatever their dependence:
- "bonferroni": min(1, D * min_d p_d).
- "hmp": min(1, c_D * HM(p)), HM the harmonic mean; c_D = e * ln(D) for D >= 3 (Vovk & Wang 2020,
  "Combining p-values via averaging", Biometrika 107(4):791-808: the harmonic mean scaled by e ln K is a
  p-merging function for K > 2), c_D = D for D <= 2 (HM >= min, so this is never below Bonferroni). Since
  e ln D < D for D >= 3 it is smaller than Bonferroni's factor, and it gains when several detectors agree.
- "calibrated_minp" (the default since 2026-12-02): the smallest of the D p-values, itself turned into a
  conformal p-value against the same statistic on the calibration samples,
      p = (1 + #{i : m_i <= min_d p_d}) / (n + 1),   m_i = min_d r_d(i) / (n + 1),
  r_d(i) = #{j : s_dj >= s_di} the in-sample rank of calibration sample i under detector d (itself counted).
  It needs the D detectors' scores on the same n calibration samples (gate.npz stores them so).
  Why valid whatever the dependence: rank the n + 1 points (calibration plus test) under each detector and
  take each point's smallest rank; that is a symmetric function of the points, so for exchangeable data the
  test point's rank among those values is uniform, and (1 + #{i : C_i <= C_test}) / (n + 1) is a valid
  p-value (full conformal). The test point's smallest rank C_test is (n + 1) min_d p_d; a calibration
  point's, C_i, is its in-sample rank plus one where the test point scores at least as high, so C_i >= m_i (n + 1)
  and the formula above counts at least as many points: it is never below the exact one, hence valid too.
  Why: Bonferroni pays the factor D whatever the dependence, so with correlated detectors the gate ignored
  fewer in-distribution inputs than alpha allows and let the borderline out-of-distribution ones through
  (4.1% of Fashion-MNIST test images at alpha 0.05 with kNN + ViM, where this rule ignores 5.3% and also
  catches the photo frames Bonferroni kept: docs/decisions.md). It is within 1 / (n + 1) of Bonferroni's
  value or below it (at most D k calibration samples have some r_d(i) <= k).
The gate ignores an input when the combined p < alpha.

conformal_pvalues (non-smoothed) and combine run in C (edge_quq._gatekernel) when the extension is built: on
one frame the numpy calls' fixed cost was nearly all of the decision's. The numpy bodies below
(pvalues_reference, combine_reference) are the reference the C path must match, and the path used without
a compiler; tests/test_gate_conformance.py runs both (calibrated_minp: _gatekernel.minp, the reference's
searchsorted in C, and RowGate's bisect on one frame).
"""
from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from edge_quq.defaults import COMBINE_RULES
from edge_quq.errors import InputError, OptionError

try:
    from edge_quq import _gatekernel as NATIVE  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the numpy reference does the work
    NATIVE = None


@dataclass(frozen=True)
class CalibrationScores:
    """Per-detector calibration scores, each ascending float64, plus n + 1 per detector (precomputed: the
    per-sample path is a handful of small array operations and every one of them counts)."""

    arrays: Tuple[np.ndarray, ...]
    plus_one: np.ndarray  # float64 [D]: n_d + 1
    concat: np.ndarray  # float64: the arrays end to end, for the C path
    offsets: np.ndarray  # int64 [D + 1]: where each detector's scores start in concat
    # calibrated_minp's m_i, ascending: each calibration sample's smallest in-sample p-value over the detectors
    # (module docstring); None when the detectors' scores are not of the same samples (sizes differ).
    min_p: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.arrays)

    @property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(int(a.shape[0]) for a in self.arrays)


def sort_calibration(cal_scores: Sequence[np.ndarray]) -> CalibrationScores:
    """Sort each detector's calibration scores once; NaN or none at all is a bad calibration file. Given in
    sample order (row i of every detector is one sample), as gate.npz stores them, it also makes
    calibrated_minp's m_i."""
    raw, out = [], []
    for d, cal in enumerate(cal_scores):
        r = np.asarray(cal, np.float64).ravel()
        arr = np.sort(r)
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise InputError(f"calibration scores of detector {d}: need at least one, all finite (got {arr.size})")
        raw.append(r)
        out.append(arr)
    sizes = [a.shape[0] for a in out]
    plus_one = np.array([n + 1.0 for n in sizes])
    min_p = None
    if len(set(sizes)) == 1:
        # in-sample p of sample i: (n + 1 - (#{cal < s_i} + 1)) / (n + 1), in the float operations of a test
        # point's (n + 1 - #{cal < s}) / (n + 1), so that equal ranks give equal floats
        own = [(plus_one[0] - (a.searchsorted(r, side="left") + 1.0)) / plus_one[0] for a, r in zip(out, raw)]
        min_p = np.sort(np.minimum.reduce(own))
    return CalibrationScores(tuple(out), plus_one, np.concatenate(out), np.cumsum([0] + sizes, dtype=np.int64), min_p)


def _as_scores(scores: np.ndarray, num_detectors: int) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    if s.ndim == 1 and num_detectors == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[1] != num_detectors:
        raise InputError(f"scores must be [N, {num_detectors}] (one column per detector), got shape {s.shape}")
    return s


def conformal_pvalues(scores: np.ndarray, cal: CalibrationScores, smooth: bool = False,
                      rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """p-values [N, D] of scores [N, D] against sorted calibration scores (sort_calibration).

    smooth=False: (1 + #{cal >= s}) / (n + 1), super-uniform. smooth=True: the randomised variant, exactly
    uniform for exchangeable data (rng: a numpy Generator; default a fresh one). A NaN score has no rank:
    it gets p = 0 so that the gate ignores it (a score that cannot be computed is not evidence of being in
    distribution).
    """
    if smooth or NATIVE is None:
        return pvalues_reference(scores, cal, smooth, rng)
    s = _as_scores(scores, len(cal))
    s = s if s.flags.c_contiguous else np.ascontiguousarray(s)
    out = np.empty(s.shape)
    NATIVE.pvalues(s, cal.concat, cal.offsets, out)
    return out


def pvalues_reference(scores: np.ndarray, cal: CalibrationScores, smooth: bool = False,
                      rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """conformal_pvalues in numpy. The loop runs over detectors (a handful), never over samples."""
    s = _as_scores(scores, len(cal))
    below = np.empty_like(s)  # #{cal < s}; the ndarray method, as np.searchsorted's dispatch costs more
    for d, arr in enumerate(cal.arrays):  # than the search itself on one sample
        below[:, d] = arr.searchsorted(s[:, d], side="left")
    finite = s == s  # False for NaN: p = 0
    if not smooth:
        return np.where(finite, (cal.plus_one - below) / cal.plus_one, 0.0)
    below_eq = np.empty_like(s)  # #{cal <= s}
    for d, arr in enumerate(cal.arrays):
        below_eq[:, d] = arr.searchsorted(s[:, d], side="right")
    u = (rng or np.random.default_rng()).random(s.shape)
    n_gt = cal.plus_one - 1.0 - below_eq
    return np.where(finite, (n_gt + u * (1.0 + below_eq - below)) / cal.plus_one, 0.0)


def hmp_factor(num_detectors: int) -> float:
    """c_D of the corrected harmonic-mean p-value (module docstring)."""
    if num_detectors <= 2:
        return float(num_detectors)
    return math.e * math.log(num_detectors)


def _as_pvalues(pvalues: np.ndarray) -> np.ndarray:
    p = np.asarray(pvalues, np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[1] == 0:
        raise InputError(f"p-values must be [N, D] with D >= 1, got shape {p.shape}")
    return p


_RULE_CODES = {"bonferroni": 0, "hmp": 1}  # _gatekernel.combine's; calibrated_minp is _gatekernel.minp


def combine(pvalues: np.ndarray, rule: str = "bonferroni", cal: Optional[CalibrationScores] = None) -> np.ndarray:
    """One p-value per row of pvalues [N, D], valid under arbitrary dependence between the D columns. `cal`:
    the calibration the p-values were computed against, which calibrated_minp needs."""
    code = _RULE_CODES.get(rule)
    if rule == "calibrated_minp" and NATIVE is not None and hasattr(NATIVE, "minp"):
        p = _as_pvalues(pvalues)
        m_cal, n1 = _min_p_of(cal, p.shape[1])
        out = np.empty(p.shape[0])
        NATIVE.minp(p if p.flags.c_contiguous else np.ascontiguousarray(p), p.shape[1], m_cal, n1, out)
        return out
    if NATIVE is None or code is None:  # an unknown rule gets its error from the reference
        return combine_reference(pvalues, rule, cal)
    p = _as_pvalues(pvalues)
    p = p if p.flags.c_contiguous else np.ascontiguousarray(p)
    out = np.empty(p.shape[0])
    NATIVE.combine(p, p.shape[1], code, hmp_factor(p.shape[1]) * p.shape[1], out)
    return out


def _min_p_of(cal: Optional[CalibrationScores], num: int) -> Tuple[np.ndarray, float]:
    """(m_i ascending, n + 1) of calibrated_minp, or one clear error when `cal` cannot give them."""
    if cal is None or cal.min_p is None or len(cal) != num:
        raise InputError(f"the calibrated_minp rule needs the calibration scores of the same {num} detector(s), "
                         "each on the same calibration samples")
    return cal.min_p, float(cal.plus_one[0])


def combine_reference(pvalues: np.ndarray, rule: str = "bonferroni", cal: Optional[CalibrationScores] = None) -> np.ndarray:
    """combine in numpy."""
    p = _as_pvalues(pvalues)
    num = p.shape[1]
    if rule == "calibrated_minp":
        m_cal, n1 = _min_p_of(cal, num)
        low = np.minimum.reduce(p, axis=1)  # NaN sticks, as in the other rules
        out = (1.0 + m_cal.searchsorted(low, side="right")) / n1
        return np.where(low == low, out, np.nan)
    if rule == "bonferroni":
        out = num * np.minimum.reduce(p, axis=1)
    elif rule == "hmp":
        # a zero p-value gives hm ~ 0, as it should, without a divide-by-zero warning
        out = (hmp_factor(num) * num) / (1.0 / np.maximum(p, 1e-300)).sum(axis=1)
    else:
        raise OptionError(f"unknown p-value combination rule {rule!r}; choose from {', '.join(COMBINE_RULES)}")
    return np.minimum(out, 1.0)


class RowGate:
    """conformal_pvalues and combine for one sample's float scores, in plain Python: the per-frame gate of a
    predictor. On one frame of a few detectors the numpy and C paths' fixed costs (arrays, buffers, argument
    parsing) were most of the gate's; here it is one bisect per detector on the calibration scores as a list.
    The results are identical to both: the same comparisons (bisect_left is searchsorted's side "left"), and
    the same float64 operations in the same order as _gatekernel's (tests/test_gate_conformance.py checks all three)."""

    __slots__ = ("cal", "rule", "_lists", "_plus_one", "_hmp", "_scale", "_min_p")

    def __init__(self, cal: CalibrationScores, rule: str = "bonferroni") -> None:
        if rule not in _RULE_CODES:
            combine_reference(np.ones((1, len(cal))), rule, cal)  # its error for an unknown rule or missing m_i
        self.cal, self.rule = cal, rule
        self._lists = [a.tolist() for a in cal.arrays]
        self._plus_one = cal.plus_one.tolist()
        self._hmp = rule == "hmp"
        self._scale = hmp_factor(len(cal)) * len(cal)
        self._min_p = cal.min_p.tolist() if rule == "calibrated_minp" and cal.min_p is not None else None

    def pvalues(self, scores: Sequence[float]) -> List[float]:
        """One p-value per detector of float scores [D] (a NaN score gets 0, as in conformal_pvalues)."""
        if len(scores) != len(self._lists):
            raise InputError(f"scores must be [{len(self._lists)}] (one per detector), got {len(scores)}")
        return [(n1 - bisect_left(c, s)) / n1 if s == s else 0.0
                for s, c, n1 in zip(scores, self._lists, self._plus_one)]

    def combine(self, pvalues: Sequence[float]) -> float:
        """combine() of one row of p-values in [0, 1] (NaN sticks, as there)."""
        if self._min_p is not None:
            low = pvalues[0]
            for v in pvalues:
                if v < low or v != v:
                    low = v
            return (1.0 + bisect_right(self._min_p, low)) / self._plus_one[0] if low == low else low
        if self._hmp:
            acc = 0.0
            for v in pvalues:
                acc += 1.0 / (v if v > 1e-300 or v != v else 1e-300)
            r = self._scale / acc
        else:
            acc = pvalues[0]
            for v in pvalues:
                if v < acc or v != v:
                    acc = v
            r = len(pvalues) * acc
        return 1.0 if r > 1.0 else r


def check_level(value: float, name: str) -> float:
    """A probability option (alpha, delta) strictly inside (0, 1), else one clear OptionError."""
    v = float(value)
    if not 0.0 < v < 1.0:
        raise OptionError(f"{name} must be strictly between 0 and 1, got {value}")
    return v


def gate(combined_p: np.ndarray, alpha: float) -> np.ndarray:
    """True where the gate ignores the input: combined p < alpha."""
    return np.asarray(combined_p, np.float64) < check_level(alpha, "ood alpha")


def gate_pvalues(scores: np.ndarray, cal: CalibrationScores, rule: str = "bonferroni") -> np.ndarray:
    """scores [N, D] -> combined p [N]: what a predictor stores as ood_p and compares with alpha."""
    return combine(conformal_pvalues(scores, cal), rule, cal)
