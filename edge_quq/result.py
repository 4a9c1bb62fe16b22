"""The one typed result that every output (table, JSON lines, MQTT, HTTP, video overlay) writes from."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±Infinity) replaced by None, recursively: JSON has no such
    numbers, and Python's json would write the non-standard tokens that strict parsers reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps for everything the product writes: non-finite numbers become null, and allow_nan=False
    makes any that slip past json_safe (a numpy float64 subclass is still a float) fail loudly, not silently."""
    kwargs.setdefault("separators", (",", ":"))
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


@dataclass
class Prediction:
    source: str  # file path, frame id, or "<array>"
    keep: bool
    rule: str  # which branch of the decision rule fired (edge_quq.decision.RULE_NAMES)
    label: Optional[str]  # the kept class name with the highest MC mean; None when ignored
    class_index: Optional[int]
    classes: List[int]  # every class the sample is kept as
    top_index: int  # argmax of the MC mean, kept or not (what a plain classifier would say)
    top_label: str
    mean: List[float]
    std: List[float]
    lower: List[float]
    upper: List[float]
    states: List[int]  # per class: 1 present, 0 absent, -1 uncertain
    deterministic: List[float]  # eval-mode (no dropout) probabilities
    scores: Dict[str, float]
    timings_ms: Dict[str, float]
    rss_bytes: int
    settings: Dict[str, Any] = field(default_factory=dict)
    # Every reason the sample was ignored (edge_quq.defaults.IGNORE_REASONS): "rule" (the MC decision rule),
    # "ood_gate", "risk", "drift"; under --ignore-on DETECTOR/any also detector names. Empty when kept. `flagged`: every detector over its fitted threshold, whatever ignore_on.
    ignored_by: List[str] = field(default_factory=list)
    flagged: List[str] = field(default_factory=list)
    # The decision policy (paper, gated, risk), the OOD gate's combined conformal p-value (None under paper)
    # and, under risk, the keep threshold on the confidence score (keep iff score > it).
    policy: str = "paper"
    ood_p: Optional[float] = None
    risk_threshold: Optional[float] = None
    # Stream hooks (edge_quq.drift.DriftMonitor.observe), not written to the JSON: each gate detector's
    # conformal p-value (None without calibration data or under paper) and the backbone feature vector.
    ood_pvalues: Optional[Dict[str, float]] = None
    features: Optional[Any] = field(default=None, repr=False, compare=False)

    @property
    def decision(self) -> str:
        return "keep" if self.keep else "ignore"

    def to_dict(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        def r(v: float) -> Optional[float]:
            # null, not NaN/Infinity: those are not JSON, and strict parsers reject the whole line.
            return round(float(v), 6) if math.isfinite(v) else None

        return {
            "source": self.source,
            "decision": self.decision,
            "rule": self.rule,
            "label": self.label,
            "class_index": self.class_index,
            "classes": list(self.classes),
            "top_label": self.top_label,
            "top_index": self.top_index,
            "mean": [r(v) for v in self.mean],
            "std": [r(v) for v in self.std],
            "lower": [r(v) for v in self.lower],
            "upper": [r(v) for v in self.upper],
            "states": list(self.states),
            "deterministic": [r(v) for v in self.deterministic],
            "scores": {k: r(v) for k, v in self.scores.items()},
            "timings_ms": {k: round(v, 4) if math.isfinite(v) else None for k, v in self.timings_ms.items()},
            "rss_mb": round(self.rss_bytes / 2**20, 2),
            "settings": json_safe(dict(self.settings)),
            "ignored_by": list(self.ignored_by),
            "flagged": list(self.flagged),
            "policy": self.policy,
            "ood_p": None if self.ood_p is None else r(self.ood_p),
            "risk_threshold": None if self.risk_threshold is None else r(self.risk_threshold),
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())


@dataclass
class Failure:
    """A per-input error inside a batch: reported, and the other inputs still get results."""

    source: str
    error: str

    def to_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "error": self.error}
