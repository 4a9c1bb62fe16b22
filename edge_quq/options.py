"""The one options object: the CLI, the config file and the API all build a PredictorOptions.

    from edge_quq import Predictor, PredictorOptions
    p = Predictor.from_bundle(options=PredictorOptions(sampler="numpy", seed=0))
    p = Predictor.from_bundle(seed=0)          # keyword arguments are the same fields

Unset decision settings (None) come from the bundle's manifest; the values the manifest lacks come from
edge_quq.defaults.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from edge_quq.defaults import (BACKENDS, CHANNEL_ORDERS, DEFAULT_DETECTOR_SELECTION, DEFAULT_IGNORE_ON, DEFAULT_MAX_PIXELS,
                               MAX_NUM_ITER, OVERLAP_CHOICES, POLICIES)
from edge_quq.errors import OptionError
from edge_quq.gradients import GradientSettings


@dataclass(frozen=True)
class PredictorOptions:
    bundle: Optional[Union[str, os.PathLike]] = None  # None: the embedded default bundle
    backend: str = "auto"
    threads: Optional[int] = None
    xnnpack: bool = True
    sampler: str = "auto"
    num_iter: Optional[int] = None
    threshold: Optional[float] = None
    z: Optional[float] = None
    confidence_level: Optional[float] = None
    mixed: Optional[str] = None
    seed: Optional[int] = None
    channel_order: str = "bgr"  # how 3-channel numpy arrays given to predict() are ordered
    gradient: Optional[GradientSettings] = field(default_factory=GradientSettings)
    ignore_on: str = DEFAULT_IGNORE_ON
    # Detectors computed per frame besides what the decision needs: gate (none), all, or names (docs/detectors.md).
    detectors: Union[str, Sequence[str]] = DEFAULT_DETECTOR_SELECTION
    max_pixels: int = DEFAULT_MAX_PIXELS  # images above this pixel count are refused before decoding
    # Decision policy (edge_quq.defaults.POLICIES); None: the manifest's (paper without calibration data).
    policy: Optional[str] = None
    ood_alpha: Optional[float] = None  # gate level; None: the manifest's
    delta: Optional[float] = None  # risk confidence; None: the manifest's
    target_error: Optional[float] = None  # risk: the error rate among kept predictions to certify
    overlap: str = "auto"  # detectors beside the head sampler on a second thread (edge_quq.defaults.OVERLAP_CHOICES)

    def replace(self, **changes: Any) -> "PredictorOptions":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown predictor option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def check(self) -> "PredictorOptions":
        """Refuse what can be refused without the bundle (the rest is checked against it)."""
        if self.backend not in BACKENDS:
            raise OptionError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise OptionError(f"channel_order must be 'bgr' or 'rgb', got {self.channel_order!r}")
        if self.num_iter is not None and not 2 <= self.num_iter <= MAX_NUM_ITER:
            raise OptionError(f"num_iter (T) must be at least 2 (to estimate a spread) and at most {MAX_NUM_ITER}, got {self.num_iter}")
        if self.max_pixels < 1:
            raise OptionError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"threads must be >= 1, got {self.threads}")
        if self.overlap not in OVERLAP_CHOICES:
            raise OptionError(f"overlap must be one of {', '.join(OVERLAP_CHOICES)}, got {self.overlap!r}")
        self.check_policy()
        from edge_quq.detectors import parse_selection

        parse_selection(self.detectors)
        return self

    def check_policy(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise OptionError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name, flag in (("ood_alpha", "--ood-alpha"), ("delta", "--delta"), ("target_error", "--target-error")):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 < float(v) < 1.0):
                raise OptionError(f"{flag} must be strictly between 0 and 1, got {v}")
        if self.target_error is not None and self.policy not in (None, "risk"):
            raise OptionError(f"--target-error applies to --policy risk only, not {self.policy}")

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> "PredictorOptions":
        """From click's parameter values (the model options of `predict` and `camera`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in values.items() if k in names}
        if "no_xnnpack" in values:
            kw["xnnpack"] = not values["no_xnnpack"]
        for key in ("ignore_on", "detectors"):
            if kw.get(key) is None:
                kw.pop(key, None)
        return cls(**kw)
