"""Drift alarm for streams: a conformal test martingale over the gate's p-values (pure numpy, no I/O).

The martingale (Vovk, Nouretdinov, Gammerman 2003, "Testing exchangeability on-line", ICML; the jumper
construction of Vovk, Petej, Nouretdinov, Ahlberg, Carlsson, Gammerman 2021, "Retrain or not retrain:
conformal test martingales for change-point detection", COPA/PMLR 152):
- K betting experts, each a calibrator f_k with integral_0^1 f_k(p) dp = 1. Family "power" (default):
  f_eps(p) = eps * p^(eps - 1) for eps on a grid in (0, 1]; eps = 1 is the expert that never bets.
  Family "simple": f_eps(p) = 1 + eps * (p - 1/2), eps in {-1, 0, 1} (Vovk et al.'s Simple Jumper; MAPIE's
  OnlineMartingaleTest uses it, and the tests compare against it).
- Start with capital 1/K per expert. Per fed p-value: each expert keeps 1 - J of its capital and the
  pooled J is shared equally (the "jump", which lets the mixture follow a change that comes after a long
  quiet stretch), then every expert's capital is multiplied by f_k(p). The total capital M is a test
  martingale when the p-values are independent U(0, 1); with J = 0 it is the discrete simple mixture.
- Ville's inequality: P(sup_t M_t >= 1/a) <= a over an unbounded horizon. The alarm level is
  2/delta_drift (half of delta_drift goes to the calibration margin below). Power experts are decreasing
  in p, so M stays a supermartingale for super-uniform p-values too (margined or Bonferroni-combined):
  the bound holds, conservatively. The "simple" family has an increasing expert and needs exactly
  uniform p-values.
martingale_path works on log capitals; DriftMonitor keeps each expert's share of the total (summing to 1)
and the log of the total, which is the same quantity in fewer operations per frame. Neither underflows
nor overflows on long streams.

What the p-values must be. Conformal p-values against one fixed calibration set of n scores are
independent given that set but not uniform given it: their law is off by up to sup|F_n - F|, and over
thousands of frames a martingale profits from that (measured: 7% false alarms at delta = 0.01 over 10 000
frames with n = 2000). drift_pvalues removes this: by the DKW inequality (Massart 1990), with probability
>= 1 - gamma over the calibration draw, sup|F_n - F| <= eps = sqrt(ln(2 / gamma) / (2 n)), and then
p + eps is super-uniform given the calibration set. drift_pvalues adds eps per detector (gamma = delta / 2
split over the D detectors) before combining, and DriftMonitor alarms at 2 / delta, so
P(false alarm) <= delta / 2 (unlucky calibration) + delta / 2 (Ville). Feed it ONE detector's p-value where
possible: the per-detector margin and the Bonferroni factor D add up (D = 3, n = 2000 floors p at 0.13,
and a far-OOD stream then needs ~25 frames instead of ~8).

Video is not exchangeable: one object in view for minutes gives the same p-value frame after frame, and a
martingale fed all of them grows without any shift. FeedRule decides which frames are fed (docs/decisions.md).

DriftMonitor's per-frame step (the bet, the scene test) runs in C when edge_quq._gatekernel is built, for the
same reason as the p-values (edge_quq.conformal); martingale_path and unit() are its reference, and the
monitor follows martingale_path in tests with and without the extension.

Alarm lifecycle (DriftMonitor): on a crossing of 2/delta the alarm is raised (since_frame = that frame)
and the martingale restarts from 1. Each later crossing restarts it again and keeps the alarm. The alarm clears
after `clear_after` consecutive fed frames without a crossing; the martingale then restarts once more.
Each restart is a fresh level-delta test: under the null, a false alarm starts with probability <= delta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from edge_quq.conformal import NATIVE, check_level, combine
from edge_quq.defaults import DRIFT_DEFAULTS
from edge_quq.errors import InputError, OptionError

FAMILIES: Tuple[str, ...] = ("power", "simple")
FEED_MODES: Tuple[str, ...] = ("scene", "interval")
_SCENE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what the C scene test reads as it is
_P_FLOOR = 1e-12  # p = 0 (an unscorable input) bets as this p rather than as infinity; raising p keeps validity


def expert_grid(family: str) -> np.ndarray:
    if family == "power":
        return np.linspace(0.05, 1.0, 20)
    if family == "simple":
        return np.array([-1.0, 0.0, 1.0])
    raise OptionError(f"unknown martingale family {family!r}; choose from {', '.join(FAMILIES)}")


def log_bets(pvalues: np.ndarray, eps: np.ndarray, family: str) -> np.ndarray:
    """log f_eps(p) for every p (any shape) and expert: shape [..., K]; NaN bets as p = 0."""
    p = np.clip(np.nan_to_num(np.asarray(pvalues, np.float64), nan=0.0), _P_FLOOR, 1.0)[..., None]
    if family == "power":
        return np.log(eps) + (eps - 1.0) * np.log(p)
    return np.log1p(eps * (p - 0.5))


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(a - m), axis=-1, keepdims=True)))[..., 0]


def _jump(log_cap: np.ndarray, jump: float) -> np.ndarray:
    """Each expert keeps 1 - J of its capital; the pooled J is shared equally."""
    if jump <= 0.0:
        return log_cap
    k = log_cap.shape[-1]
    pooled = math.log(jump / k) + _logsumexp(log_cap)[..., None]
    return np.logaddexp(math.log1p(-jump) + log_cap, pooled)


def martingale_path(pvalues: np.ndarray, family: str = "power", jump: float = 0.01) -> np.ndarray:
    """log10 of the martingale after each p-value: pvalues [..., T] (independent streams on leading axes)
    -> [..., T]. J = 0 is one vectorised cumulative sum; J > 0 steps through time (inherently sequential),
    vectorised over streams and experts."""
    p = np.asarray(pvalues, np.float64)
    eps = expert_grid(family)
    bets = log_bets(p, eps, family)  # [..., T, K]
    start = -math.log(eps.size)
    if jump <= 0.0:
        return _logsumexp(start + np.cumsum(bets, axis=-2)) / math.log(10.0)
    log_cap = np.full(p.shape[:-1] + (eps.size,), start)
    out = np.empty(p.shape)
    for t in range(p.shape[-1]):
        log_cap = _jump(log_cap, jump) + bets[..., t, :]
        out[..., t] = _logsumexp(log_cap)
    return out / math.log(10.0)


def calibration_margin(n_calibration: int, gamma: float) -> float:
    """DKW margin eps with P(sup|F_n - F| > eps) <= gamma for n calibration scores."""
    if int(n_calibration) < 1:
        raise InputError(f"calibration set must have at least one score, got {n_calibration}")
    return math.sqrt(math.log(2.0 / gamma) / (2.0 * int(n_calibration)))


def drift_pvalues(pvalues: np.ndarray, n_calibration: Sequence[int], delta: float,
                  rule: str = "bonferroni") -> np.ndarray:
    """p-values [N, D] of the gate's detectors -> [N] p-values fit for the martingale: each detector's p
    plus its DKW margin at gamma = delta / (2 D), capped at 1, then combined (valid given a calibration set
    in the 1 - delta/2 event; module docstring)."""
    p = np.asarray(pvalues, np.float64)
    p = p[:, None] if p.ndim == 1 else p
    if p.ndim != 2 or p.shape[1] != len(n_calibration):
        raise InputError(f"p-values must be [N, {len(n_calibration)}] (one column per detector), got {p.shape}")
    margined = np.minimum(p + _margins(tuple(map(int, n_calibration)), float(delta)), 1.0)
    return margined[:, 0] if p.shape[1] == 1 else combine(margined, rule)  # one detector: nothing to combine


@lru_cache(maxsize=64)
def _margins(sizes: Tuple[int, ...], delta: float) -> np.ndarray:
    """Per-detector DKW margins; cached, as a stream asks for the same ones on every frame."""
    gamma = check_level(delta, "drift delta") / (2.0 * len(sizes))
    out = np.array([calibration_margin(n, gamma) for n in sizes])
    out.flags.writeable = False
    return out


def alarm_level(delta: float) -> float:
    """log10 of the martingale level that raises the alarm: 2 / delta."""
    return math.log10(2.0 / check_level(delta, "drift delta"))


def first_alarm(log10_path: np.ndarray, delta: float) -> np.ndarray:
    """Index of the first crossing of the alarm level 2/delta along the last axis, -1 where there is none."""
    hit = np.asarray(log10_path) >= alarm_level(delta)
    return np.where(hit.any(axis=-1), np.argmax(hit, axis=-1), -1)


@dataclass(frozen=True)
class FeedRule:
    """Which frames feed the martingale.

    mode "scene" (default): a frame is fed when its L2-normalised feature is at least `scene_distance` away
    from each of the last `scene_memory` fed frames' (the first frame is always fed). A static scene then
    counts once however long it stays in view, and a jittering one (camera shake, a 1-pixel shift moves
    these features as much as a new object) at most once per appearance it cycles through. mode "interval":
    every frame is a candidate. Both feed at most one frame per `interval` frames. "interval" with
    interval=1 feeds every frame: only for exchangeable streams (shuffled test sets), never for video."""

    mode: str = str(DRIFT_DEFAULTS["feed"])
    scene_distance: float = float(DRIFT_DEFAULTS["scene_distance"])  # type: ignore[arg-type]
    scene_memory: int = int(DRIFT_DEFAULTS["scene_memory"])  # type: ignore[call-overload]
    interval: int = int(DRIFT_DEFAULTS["interval"])  # type: ignore[call-overload]

    def check(self) -> "FeedRule":
        if self.mode not in FEED_MODES:
            raise OptionError(f"unknown drift feed mode {self.mode!r}; choose from {', '.join(FEED_MODES)}")
        if not (self.scene_distance > 0.0 and math.isfinite(self.scene_distance)):
            raise OptionError(f"scene distance must be a finite number > 0, got {self.scene_distance}")
        if int(self.scene_memory) < 1 or int(self.interval) < 1:
            raise OptionError("drift scene memory and feed interval must be >= 1, "
                              f"got {self.scene_memory} and {self.interval}")
        return self


def unit(feature: np.ndarray) -> np.ndarray:
    f = np.asarray(feature, np.float64).ravel()
    return f / max(math.sqrt(float(f.dot(f))), 1e-12)


@dataclass
class DriftStatus:
    """What a result line carries ("drift" in the JSON) plus bookkeeping."""

    alarm: bool
    log10_martingale: float
    since_frame: Optional[int]
    fed: bool = False     # whether this frame fed the martingale
    frames: int = 0       # frames seen
    fed_frames: int = 0   # frames fed

    def to_json(self) -> Dict[str, object]:
        return {"alarm": self.alarm, "log10_martingale": round(self.log10_martingale, 4),
                "since_frame": self.since_frame}


@dataclass
class DriftMonitor:
    """Per-stream drift alarm, one p-value (and, for scene feeding, one feature vector) per frame; O(K)."""

    delta: float = float(DRIFT_DEFAULTS["delta"])  # type: ignore[arg-type]
    feed: FeedRule = field(default_factory=FeedRule)
    family: str = str(DRIFT_DEFAULTS["family"])
    jump: float = float(DRIFT_DEFAULTS["jump"])  # type: ignore[arg-type]
    clear_after: int = int(DRIFT_DEFAULTS["clear_after"])  # type: ignore[call-overload]
    # For observe(): which detector's p-value of a Prediction feeds the martingale, and its calibration size
    # (the DKW margin of drift_pvalues). for_predictor() sets both.
    detector: Optional[str] = None
    n_calibration: Optional[int] = None
    native: bool = NATIVE is not None  # the C step (module docstring); False runs the numpy one

    @classmethod
    def for_predictor(cls, predictor: Any, **settings: Any) -> Optional["DriftMonitor"]:
        """A monitor fed from `predictor`'s results through observe(): the gate's first detector (one
        detector, module docstring). None when the predictor computes no p-values (a bundle without
        calibration data, or policy paper)."""
        pol = predictor.policy
        if pol.cal is None or not pol.detectors:
            return None
        return cls(detector=pol.detectors[0], n_calibration=pol.cal.sizes[0], **settings)

    def observe(self, prediction: Any) -> DriftStatus:
        """update() from an edge_quq Prediction: its margined p-value of `detector`, its features."""
        pvals = prediction.ood_pvalues
        if self.detector is None or self.n_calibration is None or not pvals or self.detector not in pvals:
            raise InputError(f"drift monitor: the prediction carries no p-value of detector {self.detector!r} "
                             "(make the monitor with DriftMonitor.for_predictor and a gated/risk policy)")
        p = drift_pvalues(np.array([pvals[self.detector]]), [self.n_calibration], self.delta)[0]
        return self.update(float(p), prediction.features)

    def __post_init__(self) -> None:
        check_level(self.delta, "drift delta")
        self.feed.check()
        if not 0.0 <= self.jump < 1.0:
            raise OptionError(f"martingale jump must be in [0, 1), got {self.jump}")
        if int(self.clear_after) < 1:
            raise OptionError(f"drift clear_after must be >= 1 fed frame, got {self.clear_after}")
        self._eps = expert_grid(self.family)
        self._eps_m1 = self._eps - 1.0
        self._keep, self._pool = 1.0 - self.jump, self.jump / self._eps.size
        self._log_level = alarm_level(self.delta) * math.log(10.0)
        self._near_dot = 1.0 - 0.5 * self.feed.scene_distance ** 2
        self.native = bool(self.native) and NATIVE is not None
        self.reset()

    def reset(self) -> None:
        self._restart()
        self._frame = 0
        self._fed = 0
        self._last_fed_frame: Optional[int] = None
        self._memory: Optional[np.ndarray] = None  # [scene_memory, F] unit features of recent fed frames
        self._stored = 0
        self._alarm = False
        self._since: Optional[int] = None
        self._quiet = 0

    def _restart(self) -> None:
        # Capitals as shares of the total (summing to 1) plus the log of the total: the per-frame update is
        # then a handful of small array operations, and neither part can overflow.
        self._share = np.full(self._eps.size, 1.0 / self._eps.size)
        self._log_m = 0.0

    def _wants(self, feature: Optional[np.ndarray]) -> Tuple[bool, Optional[np.ndarray]]:
        if self._last_fed_frame is not None and self._frame - self._last_fed_frame < self.feed.interval:
            return False, None
        if self.feed.mode != "scene":
            return True, None
        if feature is None:
            raise InputError("drift feed mode 'scene' needs the frame's feature vector")
        size = feature.size if isinstance(feature, np.ndarray) else np.size(feature)
        if self._memory is None or self._memory.shape[1] != size:
            self._memory, self._stored = np.empty((int(self.feed.scene_memory), size)), 0
        rows = min(self._stored, self._memory.shape[0])
        # unit vectors: |a - b|^2 = 2 - 2 a.b, so "nearer than d to one of them" is one matrix-vector product
        if self.native and isinstance(feature, np.ndarray) and feature.dtype in _SCENE_DTYPES and feature.flags.c_contiguous:
            u = np.empty(size)
            return not NATIVE.scene(self._memory, rows, feature, u) > self._near_dot, u
        u = unit(feature)
        near = rows > 0 and float(np.maximum.reduce(self._memory[:rows].dot(u))) > self._near_dot
        return not near, u

    def _remember(self, u: np.ndarray) -> None:
        assert self._memory is not None
        self._memory[self._stored % self._memory.shape[0]] = u
        self._stored += 1

    def update(self, pvalue: float, feature: Optional[np.ndarray] = None) -> DriftStatus:
        """Account for one frame: feed it if the feed rule says so, then raise or clear the alarm."""
        frame = self._frame
        fed, u = self._wants(feature)
        if fed:
            self._last_fed_frame, self._fed = frame, self._fed + 1
            if u is not None:
                self._remember(u)
            self._bet(float(pvalue), frame)
        self._frame += 1
        return DriftStatus(self._alarm, self._log_m / math.log(10.0), self._since, fed, self._frame, self._fed)

    def _bet(self, pvalue: float, frame: int) -> None:
        p = min(max(pvalue, _P_FLOOR), 1.0) if pvalue == pvalue else _P_FLOOR  # NaN bets as p = 0
        if self.native:
            self._log_m += math.log(NATIVE.bet(self._share, self._eps, self._eps_m1, self._keep, self._pool, p,
                                               self.family == "power"))
            self._after_bet(frame)
            return
        if self.family == "power":
            bets = self._eps * np.exp(self._eps_m1 * math.log(p))
        else:
            bets = 1.0 + self._eps * (p - 0.5)
        cap = (self._keep * self._share + self._pool) * bets  # the jump, then the bets (shares sum to 1)
        total = float(np.add.reduce(cap))  # the ufunc: .sum()'s Python wrapper costs more than 20 additions
        self._log_m += math.log(total)
        self._share = cap / total
        self._after_bet(frame)

    def _after_bet(self, frame: int) -> None:
        if self._log_m >= self._log_level:
            if not self._alarm:
                self._alarm, self._since = True, frame
            self._quiet = 0
            self._restart()
        elif self._alarm:
            self._quiet += 1
            if self._quiet >= self.clear_after:
                self._alarm, self._since, self._quiet = False, None, 0
                self._restart()

    def status(self) -> DriftStatus:
        return DriftStatus(self._alarm, self._log_m / math.log(10.0), self._since, False, self._frame, self._fed)
