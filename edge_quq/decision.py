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
from typing import Optional, Tuple

import numpy as np

from edge_quq.defaults import DECISION_DEFAULTS, MIXED_POLICIES
from edge_quq.errors import OptionError

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
    lower = mean - z * std
    upper = mean + z * std
    states = np.full(np.shape(mean), UNCERTAIN, dtype=np.int8)
    states[lower > threshold] = PRESENT
    states[upper < threshold] = ABSENT
    return states


def decide_states(states: np.ndarray, mixed: str = "ignore") -> Tuple[np.ndarray, np.ndarray]:
    """Vectorised rule over the last axis: (keep [N] bool, rule code [N] int8).

    Rule codes: 0 confident, 1 none_present, 2 benefit_of_doubt, 3 uncertain, 4 mixed_ignore, 5 mixed_keep.
    """
    if mixed not in MIXED_POLICIES:
        raise OptionError(f"mixed policy must be one of {', '.join(MIXED_POLICIES)}, got {mixed!r}")
    s = np.atleast_2d(states)
    n_pos = np.sum(s == PRESENT, axis=-1)
    n_unc = np.sum(s == UNCERTAIN, axis=-1)
    code = np.empty(s.shape[:-1], dtype=np.int8)
    code[(n_unc == 0) & (n_pos > 0)] = 0
    code[(n_unc == 0) & (n_pos == 0)] = 1
    code[(n_unc == 1) & (n_pos == 0)] = 2
    code[(n_unc > 1) & (n_pos == 0)] = 3
    code[(n_unc > 0) & (n_pos > 0)] = 5 if mixed == "keep" else 4
    keep = np.isin(code, (0, 2, 5))
    return keep, code


RULE_NAMES = ("confident", "none_present", "benefit_of_doubt", "uncertain", "mixed_ignore", "mixed_keep")


@dataclass(frozen=True)
class Decision:
    keep: bool
    rule: str
    states: np.ndarray  # [C] int8: 1 / 0 / -1
    classes: Tuple[int, ...]  # the classes the sample is kept as (empty when ignored)
    label: Optional[int]  # the kept class with the highest MC mean, None when ignored
    lower: np.ndarray
    upper: np.ndarray


def decide(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed: str = "ignore") -> Decision:
    """The full rule for one sample's per-class MC mean and std."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    states = interval_states(mean, std, z, threshold)
    keep_arr, code_arr = decide_states(states[None, :], mixed)
    keep, code = bool(keep_arr[0]), int(code_arr[0])
    if not keep:
        classes: Tuple[int, ...] = ()
    elif code == 2:
        classes = tuple(int(i) for i in np.flatnonzero(states == UNCERTAIN))
    else:
        classes = tuple(int(i) for i in np.flatnonzero(states == PRESENT))
    label = max(classes, key=lambda i: mean[i]) if classes else None
    return Decision(
        keep=keep,
        rule=RULE_NAMES[code],
        states=states,
        classes=classes,
        label=label,
        lower=mean - z * std,
        upper=mean + z * std,
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
