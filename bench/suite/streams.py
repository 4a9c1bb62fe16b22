"""The drift alarm on benchmark streams: frames to alarm on corrupted streams and false alarms on clean ones.

Each frame's p-value is the runtime's: one detector's conformal p-value (edge_quq.conformal) with the DKW
calibration margin (edge_quq.drift.drift_pvalues), fed to edge_quq.drift.DriftMonitor at its defaults
(scene feed on the frame's backbone feature, jumper power martingale, alarm at 2 / delta_drift). A stream
is a seeded random order of an image set: distinct images one after another, as a camera panning over
many objects would see them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from edge_quq.conformal import CalibrationScores, conformal_pvalues, sort_calibration
from edge_quq.drift import DRIFT_DEFAULTS, DriftMonitor, drift_pvalues

DRIFT_DELTA = float(DRIFT_DEFAULTS["delta"])  # type: ignore[arg-type]
DRIFT_CAL = 2000  # calibration scores of the drift detector (docs/decisions.md measured at n = 2000)


@dataclass
class DriftSetup:
    detector: str
    cal: CalibrationScores
    delta: float = DRIFT_DELTA

    @classmethod
    def fit(cls, detector: str, cal_scores: np.ndarray, delta: float = DRIFT_DELTA) -> "DriftSetup":
        return cls(detector, sort_calibration([cal_scores]), delta)

    def pvalues(self, det: Dict[str, np.ndarray]) -> np.ndarray:
        """Per-frame p-values fit for the martingale, for the frames of one stream."""
        return drift_pvalues(conformal_pvalues(det[self.detector], self.cal), list(self.cal.sizes), self.delta)


def run_stream(p: np.ndarray, feats: np.ndarray, delta: float) -> dict:
    """Feed one stream to a fresh DriftMonitor; the frame count at the first alarm (None: none) and how many
    frames were fed."""
    mon = DriftMonitor(delta=delta)
    st = None
    for i in range(len(p)):
        st = mon.update(float(p[i]), feats[i])
        if st.alarm:
            return {"alarm_frame": i + 1, "fed": st.fed_frames}
    return {"alarm_frame": None, "fed": st.fed_frames if st is not None else 0}


def _quantile(v: List[Optional[int]], q: float) -> Optional[int]:
    """Empirical quantile counting 'no alarm' as later than every alarm; None when it falls on one."""
    s = sorted(np.inf if x is None else x for x in v)
    x = s[max(0, int(np.ceil(q * len(s))) - 1)]
    return None if not np.isfinite(x) else int(x)


def frames_to_alarm(setup: DriftSetup, det: Dict[str, np.ndarray], feats: np.ndarray, seeds: int, max_frames: int, seed) -> dict:
    """Median and p90 of frames to alarm over `seeds` random orders of a shifted set (at most max_frames)."""
    p = setup.pvalues(det)
    frames = []
    for s in range(seeds):
        order = np.random.default_rng([*seed, s]).permutation(len(p))[:max_frames]
        frames.append(run_stream(p[order], feats[order], setup.delta)["alarm_frame"])
    return {"median": _quantile(frames, 0.5), "p90": _quantile(frames, 0.9), "alarmed": round(sum(f is not None for f in frames) / seeds, 3),
            "max_frames": int(min(max_frames, len(p)))}


def false_alarms(det: Dict[str, np.ndarray], feats: np.ndarray, detector: str, frames: int, seeds: int, seed: int,
                 n_cal: int = DRIFT_CAL, delta: float = DRIFT_DELTA) -> dict:
    """Clean streams of `frames` frames: per seed a fresh calibration draw of n_cal images, the stream a
    random order of the other images (cycled in a new order when the stream is longer than the pool)."""
    n = len(feats)
    n_cal = min(n_cal, n // 5)
    alarms, fed = [], []
    for s in range(seeds):
        rng = np.random.default_rng([seed, 200, s])
        perm = rng.permutation(n)
        setup = DriftSetup.fit(detector, det[detector][perm[:n_cal]], delta)
        pool = perm[n_cal:]
        order = np.concatenate([rng.permutation(pool) for _ in range(-(-frames // len(pool)))])[:frames]
        p = setup.pvalues({detector: det[detector][order]})
        r = run_stream(p, feats[order], delta)
        alarms.append(r["alarm_frame"])
        fed.append(r["fed"])
    return {"detector": detector, "frames": frames, "seeds": seeds, "n_calibration": n_cal, "pool": n - n_cal, "delta": delta,
            "seeds_with_alarm": int(sum(a is not None for a in alarms)),
            "no_alarm_rate": round(sum(a is None for a in alarms) / seeds, 4),
            "alarm_frames": [a for a in alarms if a is not None], "mean_fed_fraction": round(float(np.mean(fed)) / frames, 4)}
