"""The keep/ignore rule of the seed paper (arXiv 2403.01076), as pure functions.

Per class c, the interval is mean_c ± z·std_c against a threshold:
  1  the interval lies entirely above the threshold (present),
  0  entirely below (absent),
 -1  it straddles the threshold (uncertain).
Then, per sample:
  no -1 and at least one 1          -> keep (as the 1 classes)                  rule "confident"
  all 0                             -> ignore                                     rule "none_present"
  some -1, no 1, exactly one -1     -> keep as that class ("benefit of the doubt") rule "benefit_of_doubt"
  some -1, no 1, two or more -1     -> ignore                                     rule "uncertain"
  both 1s and -1s (paper leaves it open) -> `mixed` policy: "ignore" (default)    rule "mixed_ignore"
                                         or "keep" as the 1 classes             rule "mixed_keep"
The default ignores the open case: a straddling second class means the model cannot rule out a competing
label, which for a single-label task is exactly the ambiguity the rule exists to catch.

The interval factor is z itself (the multiplier of std). A two-sided confidence level c is accepted as an
alternative and turned into z = Phi^-1((1 + c) / 2). We read the paper's "conf_factor" grid (0.7, 0.8, 0.9)
as z, because the paper writes the interval as (mu - Z sigma, mu + Z sigma) and feeds conf_factor in as Z.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from edge_quq import framekernels as _native
from edge_quq.defaults import DECISION_DEFAULTS, IGNORE_ON_WORDS, MIXED_POLICIES
from edge_quq.errors import OptionError

if TYPE_CHECKING:
    from edge_quq.detectors import DetectorSet

PRESENT, ABSENT, UNCERTAIN = 1, 0, -1


def z_from_confidence_level(level: float) -> float:
    """z of a two-sided normal interval with the given coverage, e.g. 0.95 -> 1.96."""
    if not 0.0 < level < 1.0:
        raise OptionError(f"confidence level must be strictly between 0 and 1, got {level}")
    return NormalDist().inv_cdf((1.0 + level) / 2.0)


def resolve_z(z: Optional[float] = None, confidence_level: Optional[float] = None, default: float = float(DECISION_DEFAULTS["z"])) -> float:  # type: ignore[arg-type]
    """The interval factor from exactly one of z or confidence_level (neither: the default z)."""
    if z is not None and confidence_level is not None:
        raise OptionError("give either z or confidence level, not both")
    if confidence_level is not None:
        return z_from_confidence_level(confidence_level)
    value = default if z is None else float(z)
    if not np.isfinite(value) or value < 0.0:
        raise OptionError(f"z must be a finite number >= 0, got {value}")
    return value


def interval_states(mean: np.ndarray, std: np.ndarray, z: float, threshold: float) -> np.ndarray:
    """1 / 0 / -1 per class (any leading shape), as int8."""
    return _interval_states(mean - z * std, mean + z * std, threshold)


def _interval_states(lower: np.ndarray, upper: np.ndarray, threshold: float) -> np.ndarray:
    # 1 / 0 / -1 as arithmetic on the two comparisons instead of masked writes (this runs once per frame):
    # upper below the threshold wins, as it always did, should both ever hold
    below = upper < threshold
    return ((lower > threshold) & ~below).astype(np.int8) * np.int8(2) + below.astype(np.int8) - np.int8(1)


# Rule code per (no PRESENT?, uncertain count clipped at 2): indexed by [n_pos > 0, min(n_unc, 2)].
_CODES = {mixed: np.array([[1, 2, 3], [0, code, code]], np.int8) for mixed, code in (("ignore", 4), ("keep", 5))}
_KEEP_CODE = np.array([True, False, True, False, False, True])  # codes 0, 2, 5 keep


def decide_states(states: np.ndarray, mixed: str = "ignore") -> Tuple[np.ndarray, np.ndarray]:
    """Vectorised rule over the last axis: (keep [N] bool, rule code [N] int8).

    Rule codes: 0 confident, 1 none_present, 2 benefit_of_doubt, 3 uncertain, 4 mixed_ignore, 5 mixed_keep.
    """
    if mixed not in MIXED_POLICIES:
        raise OptionError(f"mixed policy must be one of {', '.join(MIXED_POLICIES)}, got {mixed!r}")
    s = states if getattr(states, "ndim", 0) >= 2 else np.atleast_2d(states)
    # one table look-up instead of a mask per rule: this runs once per frame on the device (ndarray methods,
    # not np.any / np.count_nonzero: their wrappers cost more than the work on a few classes)
    code = _CODES[mixed][(s == PRESENT).any(axis=-1).view(np.int8), np.minimum((s == UNCERTAIN).sum(axis=-1), 2)]
    return _KEEP_CODE[code], code


RULE_NAMES = ("confident", "none_present", "benefit_of_doubt", "uncertain", "mixed_ignore", "mixed_keep")


def kept_classes(states: np.ndarray, code: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[N, C] bool: the classes each sample is kept as (the 1s; the single -1 under benefit of the doubt;
    none when ignored)."""
    states = states if getattr(states, "ndim", 0) >= 2 else np.atleast_2d(states)
    return np.where((np.asarray(code) == 2)[..., None], states == UNCERTAIN, states == PRESENT) & np.asarray(keep)[..., None]


class Decision(NamedTuple):
    """One sample's rule (decide). Immutable; a NamedTuple rather than a frozen dataclass, whose __init__ (a
    guarded setattr per field) cost a twentieth of a frame's overhead."""

    keep: bool
    rule: str
    states: np.ndarray  # [C] int8: 1 / 0 / -1
    classes: Tuple[int, ...]  # the classes the sample is kept as (empty when ignored)
    label: Optional[int]  # the kept class with the highest MC mean, None when ignored
    lower: np.ndarray
    upper: np.ndarray


@dataclass
class Decisions:
    """The rule over a batch: keep [N] bool, rule codes [N] (RULE_NAMES), states and kept classes [N, C],
    labels [N] (-1 when ignored)."""

    keep: np.ndarray
    code: np.ndarray
    states: np.ndarray
    indicators: np.ndarray
    labels: np.ndarray


def decide_many(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed: str = "ignore") -> Decisions:
    """The full rule for rows of per-class MC mean and std [N, C]."""
    mean = np.atleast_2d(np.asarray(mean, dtype=np.float64))
    std = np.atleast_2d(np.asarray(std, dtype=np.float64))
    return _interval_rule(mean, std, z, threshold, mixed)[0]


def _interval_rule(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed: str
                   ) -> Tuple[Decisions, np.ndarray, np.ndarray]:
    """(Decisions, lower, upper) for float64 rows [N, C]: the native kernel when the extension is built
    (edge_quq.framekernels.interval_decide), decide_numpy, its reference, otherwise or for broadcast inputs."""
    if not (_native.available() and mean.ndim == 2 and mean.size and std.shape == mean.shape and mixed in _CODES):
        return decide_numpy(mean, std, z, threshold, mixed)
    keep, code, states, kept, labels, lower, upper = _native.interval_decide(mean, std, z, threshold, mixed == "keep")
    return Decisions(keep, code, states, kept, labels), lower, upper


def decide_numpy(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed: str = "ignore"
                 ) -> Tuple[Decisions, np.ndarray, np.ndarray]:
    """(Decisions, lower, upper) for float64 rows [N, C] in numpy: the definition of the rule, and the native
    kernel's reference."""
    lower, upper = mean - z * std, mean + z * std
    return _decisions(mean, lower, upper, threshold, mixed), lower, upper


def _decisions(mean: np.ndarray, lower: np.ndarray, upper: np.ndarray, threshold: float, mixed: str) -> Decisions:
    states = _interval_states(lower, upper, threshold)
    keep, code = decide_states(states, mixed)
    kept = kept_classes(states, code, keep)
    # the kept classes are exactly predicted_labels' eligible ones where keep holds: its argmax, without
    # working them out a second time
    labels = np.where(keep, np.where(kept, mean, -np.inf).argmax(axis=-1), -1)
    return Decisions(keep, code, states, kept, labels)


_NATIVE_ROWS = _native.available()
_F64 = np.dtype(np.float64)


def decide(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed: str = "ignore") -> Decision:
    """The full rule for one sample's per-class MC mean and std: the batched rule on a batch of one (the native
    kernel's row mode when it takes the inputs)."""
    # the conversions only when needed: a frame's moments are float64 arrays already, and np.asarray's call
    # costs more than the check
    if type(mean) is not np.ndarray or mean.dtype is not _F64:
        mean = np.asarray(mean, dtype=np.float64)
    if type(std) is not np.ndarray or std.dtype is not _F64:
        std = np.asarray(std, dtype=np.float64)
    one = (_native.interval_decide_row(mean, std, z, threshold, mixed == "keep")
           if _NATIVE_ROWS and mean.ndim == 1 and mixed in _CODES else None)
    if one is not None:
        keep, code, label, classes, states, lower, upper = one
        return Decision(keep, RULE_NAMES[code], states, classes, label if classes else None, lower, upper)
    d, lower, upper = _interval_rule(mean[None, :], std[None, :], z, threshold, mixed)
    classes = tuple(d.indicators[0].nonzero()[0].tolist())
    return Decision(
        keep=bool(d.keep[0]),
        rule=RULE_NAMES[d.code.item(0)],
        states=d.states[0],
        classes=classes,
        label=d.labels.item(0) if classes else None,
        lower=lower[0],
        upper=upper[0],
    )


def predicted_labels(mean: np.ndarray, states: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Vectorised label per sample for evaluation: -1 when ignored, else the argmax of the MC mean over
    the classes the sample is kept as (the 1s when there are any, otherwise the single -1)."""
    mean = np.atleast_2d(mean)
    states = np.atleast_2d(states)
    has_pos = np.any(states == PRESENT, axis=-1, keepdims=True)
    eligible = np.where(has_pos, states == PRESENT, states == UNCERTAIN)
    masked = np.where(eligible, mean, -np.inf)
    labels = np.argmax(masked, axis=-1)
    return np.where(np.asarray(keep), labels, -1)


# --- who may ignore: the MC rule, the bundle's detectors, or both --------------------------------------------

def check_ignore_on(ignore_on: str, detectors: "Optional[DetectorSet]") -> str:
    """'mc', 'any', or the name of a detector of this bundle that has a fitted threshold."""
    if ignore_on in IGNORE_ON_WORDS:
        return ignore_on
    have = detectors.with_threshold() if detectors is not None else []
    if ignore_on not in have:
        if detectors is None:
            raise OptionError(f"--ignore-on {ignore_on!r}: this bundle has no fitted detectors (add them with edge-quq fit-detectors); use mc")
        raise OptionError(f"--ignore-on {ignore_on!r}: not a detector with a fitted threshold in this bundle; choose mc, any or one of {', '.join(have)}")
    return ignore_on


def combine_decision(mc_keep: bool, flagged: Sequence[str], ignore_on: str) -> Tuple[bool, List[str]]:
    """(keep, ignored_by): who may ignore is set by `ignore_on`; ignored_by lists who did: "rule" (the MC
    decision rule) and, under --ignore-on DETECTOR or any, the names of detectors over their thresholds."""
    if ignore_on == "mc":
        return mc_keep, ([] if mc_keep else ["rule"])
    if ignore_on == "any":
        why = ([] if mc_keep else ["rule"]) + list(flagged)
        return not why, why
    hit = ignore_on in flagged
    return not hit, ([ignore_on] if hit else [])


def policy_reasons(policy: str, gate_ignores: bool, risk_keeps: bool) -> List[str]:
    """The reasons beyond the rule a policy adds: the OOD gate (gated, risk) and the risk threshold (risk)."""
    why = []
    if policy in ("gated", "risk") and gate_ignores:
        why.append("ood_gate")
    if policy == "risk" and not risk_keeps:
        why.append("risk")
    return why
