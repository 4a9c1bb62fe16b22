"""The decision policies of issue 14 on benchmark data: `paper`, max probability at the paper rule's
coverage, the paper rule behind one detector's gate or the combined gate (`gated`), and `risk` (`gated`, then
a Learn-then-Test threshold on the bundle's risk score), each calibrated on a seeded split of the clean set;
and the same policies as the bundle ships them (`shipped`: its own calibration data, gate.npz).

All the math is the runtime's: conformal p-values, their combination and the gate (edge_quq.conformal), the
risk table and LTT threshold (edge_quq.risk), the paper rule (edge_quq.decision). This module only makes
seeded calibration/test splits of held-out in-distribution data and counts. The gate's detector set is a
parameter (`gate_detectors`), so a bundle's chosen set can be passed in later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_quq.conformal import CalibrationScores, gate, gate_pvalues, sort_calibration
from edge_quq.decision import decide_many
from edge_quq.defaults import GATE_DEFAULTS
from edge_quq.errors import OptionError
from edge_quq.risk import CalibrationTable, keep_mask, ltt_threshold

# The product's own defaults (edge_quq/defaults.py), so `gated` here is what `edge-quq predict` does.
ALPHA = float(GATE_DEFAULTS["alpha"])  # type: ignore[arg-type]
COMBINE_RULE = str(GATE_DEFAULTS["combine"])
RISK_DELTA = float(GATE_DEFAULTS["delta"])  # type: ignore[arg-type]
RISK_TARGETS = (0.01, 0.02, 0.05)
CAL_FRACTION = 0.5       # share of the clean test set used as calibration data, the rest is the test split


@dataclass
class SetArrays:
    """Per-sample inputs of every policy for one image set."""

    det: Dict[str, np.ndarray]   # detector scores, higher = more out-of-distribution
    confidence: np.ndarray       # the risk policy's score, signed so that higher = more confident
    pred: np.ndarray             # MC-mean argmax
    rule_keep: np.ndarray        # the paper rule's keep
    rule_pred: np.ndarray        # the paper rule's label (-1 when ignored)
    features: np.ndarray         # backbone features (the drift monitor's scene feed)
    maxprob: np.ndarray          # MC-mean max probability (the max-prob baseline's score)

    def take(self, idx: np.ndarray) -> "SetArrays":
        return SetArrays({k: v[idx] for k, v in self.det.items()}, self.confidence[idx], self.pred[idx],
                         self.rule_keep[idx], self.rule_pred[idx], self.features[idx], self.maxprob[idx])

    def scores(self, names: Sequence[str]) -> np.ndarray:
        return np.column_stack([self.det[n] for n in names])

    def label(self) -> np.ndarray:
        """The label a prediction carries: the rule's when it keeps, else the MC-mean top class (what the
        bundle's calibration records count as right or wrong)."""
        return np.where(self.rule_keep, self.rule_pred, self.pred)


def set_arrays(run, t: int, z: float, threshold: float, mixed: str, activation: str = "softmax",
               risk_score: str = "max_prob") -> SetArrays:
    """SetArrays of a bench.suite.core.HeadRun at the bundle's decision defaults; `risk_score` is the
    bundle's (manifest gate.risk_score), computed by the runtime's edge_quq.scores."""
    from edge_quq.defaults import RISK_SCORE_SIGN
    from edge_quq.scores import compute_scores

    mean, std, _ = run.moments(t)
    rr = decide_many(mean, std, z, threshold, mixed)
    sc = compute_scores(mean, std, run.det_logits, run.expected_entropy(t, activation), activation)
    conf = RISK_SCORE_SIGN[risk_score] * np.asarray(sc[risk_score], np.float64)
    return SetArrays(dict(run.detector_scores), conf, np.argmax(mean, axis=1), rr.keep, rr.labels, run.features, mean.max(axis=1))


def usable_detectors(det: Dict[str, np.ndarray]) -> List[str]:
    """Detectors whose in-distribution scores are all finite and not constant (a p-value needs a ranking)."""
    return [n for n, s in det.items() if np.all(np.isfinite(s)) and np.ptp(s) > 0]


@dataclass
class Calibrated:
    """Everything the policies learn from one calibration split."""

    gates: Dict[str, Tuple[List[str], CalibrationScores, str]]  # policy -> (detectors, calibration, rule)
    maxprob_threshold: Optional[float]      # None: no max-prob row (the shipped policies)
    risk: Dict[str, Optional[float]]        # policy -> LTT threshold (None: target unreachable)
    risk_info: Dict[str, dict]
    combined: str                            # the name of the combined gate policy


def gate_sets(gate_detectors: Sequence[str], usable: Sequence[str], rule: str = COMBINE_RULE,
              candidates: Sequence[Sequence[str]] = ()) -> Dict[str, Tuple[List[str], str]]:
    """Policy name -> (detectors, combination rule): every usable detector alone, the combined gate `gated`,
    and any further candidate sets as `gated[a+b]` (for choosing a bundle's set)."""
    out = {f"gate:{n}": ([n], "bonferroni") for n in usable}
    out["gated"] = (list(gate_detectors), rule)
    for c in candidates:
        out[f"gated[{'+'.join(c)}]"] = (list(c), rule)
    return out


def calibrate(cal: SetArrays, correct: np.ndarray, gates: Dict[str, Tuple[List[str], str]],
              alpha: float = ALPHA, delta: float = RISK_DELTA, targets: Sequence[float] = RISK_TARGETS) -> Calibrated:
    """Fit every policy on calibration data: gate calibration scores, the max-prob threshold giving the
    paper rule's coverage, and LTT thresholds on the calibration samples the rule and the combined gate keep
    (as the bundle's risk table is built, edge_quq.gate_store). A calibration sample's own score is among its
    calibration scores, so its gate p-value is conservative by at most 1 / (n + 1)."""
    fitted = {name: (names, sort_calibration([cal.det[n] for n in names]), rule) for name, (names, rule) in gates.items()}
    cov = float(cal.rule_keep.mean())
    # keep iff MC-mean max probability > threshold, keeping the paper rule's share of the calibration set
    maxprob_thr = float(np.quantile(cal.maxprob, 1.0 - cov)) if cov < 1 else -np.inf
    names, cs, rule = fitted["gated"]
    passed = ~gate(gate_pvalues(cal.scores(names), cs, rule), alpha) & cal.rule_keep
    return _with_risk(Calibrated(fitted, maxprob_thr, {}, {}, "gated"),
                      CalibrationTable.build(cal.confidence[passed], correct[passed]), delta, targets)


def _with_risk(c: Calibrated, table: CalibrationTable, delta: float, targets: Sequence[float]) -> Calibrated:
    risk, info = {}, {}
    for t in targets:
        key = f"risk@{100 * t:g}%"
        try:
            r = ltt_threshold(table, t, delta)
            risk[key], info[key] = r.threshold, {"threshold": r.threshold, "calibration_coverage": round(r.coverage, 4),
                                                 "calibration_kept": r.kept, "calibration_errors": r.errors}
        except OptionError as e:
            risk[key], info[key] = None, {"unreachable": str(e)}
    return Calibrated(c.gates, c.maxprob_threshold, risk, info, c.combined)


def shipped(spec, loaded, delta: Optional[float] = None, targets: Sequence[float] = RISK_TARGETS) -> Calibrated:
    """The policies as the bundle ships them: its gate detectors, combination rule and alpha (manifest
    `gate`) against its own calibration data (gate.npz, edge_quq.gate_store.LoadedGate), and the risk
    thresholds LTT picks from its stored table, as `edge-quq predict --target-error` does."""
    names = list(spec.detectors)
    c = Calibrated({"gated": (names, loaded.calibration(names), spec.combine)}, None, {}, {}, "gated")
    return _with_risk(c, loaded.risk_table(names, spec.alpha, spec.combine), spec.delta if delta is None else delta, targets)


def gate_ignores(c: Calibrated, a: SetArrays, alpha: float = ALPHA) -> Dict[str, np.ndarray]:
    """Per gate policy: True where its gate alone ignores the sample."""
    return {name: gate(gate_pvalues(a.scores(names), cs, rule), alpha) for name, (names, cs, rule) in c.gates.items()}


def risk_keep(a: SetArrays, threshold: Optional[float], gate_ignored: np.ndarray) -> np.ndarray:
    """What `risk` keeps, as the predictor decides: the rule keeps, the gate passes and the risk score is
    above the threshold (None: the target is unreachable, nothing is kept)."""
    if threshold is None:
        return np.zeros(len(a.pred), bool)
    return a.rule_keep & ~gate_ignored & keep_mask(a.confidence, threshold)


def decide(c: Calibrated, a: SetArrays, alpha: float = ALPHA) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Policy -> (keep [N], predicted label [N]) on one image set."""
    ign = gate_ignores(c, a, alpha)
    out = {"paper": (a.rule_keep, a.rule_pred)}
    if c.maxprob_threshold is not None:
        out["maxprob@paper-coverage"] = (keep_mask(a.maxprob, c.maxprob_threshold), a.pred)
    for name in c.gates:
        out[name] = (a.rule_keep & ~ign[name], a.rule_pred)
    for name, thr in c.risk.items():
        out[name] = (risk_keep(a, thr, ign[c.combined]), a.rule_pred)
    return out


def rates(keep: np.ndarray, pred: np.ndarray, y: Optional[np.ndarray]) -> dict:
    k = int(keep.sum())
    err = None if y is None or k == 0 else round(float(np.mean(pred[keep] != y[keep])), 4)
    return {"ignore_rate": round(1.0 - k / max(len(keep), 1), 4), "error_kept": err, "kept": k, "n": int(len(keep))}


def bootstrap_table(decided: Dict[str, Tuple[np.ndarray, np.ndarray]], y: np.ndarray, reps: int, seed: int) -> Dict[str, dict]:
    """Coverage and error among kept with 95% percentile bootstrap intervals over test samples (the same
    resampled indices for every policy; the calibrated thresholds stay fixed)."""
    rng = np.random.default_rng([seed, 14])
    idx = rng.integers(0, len(y), (reps, len(y)))
    out = {}
    for name, (keep, pred) in decided.items():
        wrong = (pred != y).astype(np.float64)
        kb = keep[idx]
        nk = kb.sum(axis=1)
        cov_b = nk / len(y)
        with np.errstate(invalid="ignore", divide="ignore"):
            err_b = (wrong[idx] * kb).sum(axis=1) / nk
        r = rates(keep, pred, y)
        q = lambda v: [round(float(np.nanquantile(v, 0.025)), 4), round(float(np.nanquantile(v, 0.975)), 4)] if np.isfinite(v).any() else [None, None]
        out[name] = {"coverage": round(1 - r["ignore_rate"], 4), "coverage_ci95": q(cov_b), "error_kept": r["error_kept"],
                     "error_kept_ci95": q(err_b), "kept": r["kept"], "n": int(len(y))}
    return out


def split(n: int, seed, fraction: float = CAL_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[:k]), np.sort(perm[k:])


def binomial_limit(m: int, alpha: float, level: float = 0.95) -> float:
    """The rate a Binomial(m, alpha) count stays at or below with probability `level` (exact, the
    runtime's binomial tail): alpha plus its binomial margin for m test samples."""
    from edge_quq.risk import binom_cdf

    ks = np.arange(m + 1)
    cdf = binom_cdf(ks, np.full(ks.shape, m), np.full(ks.shape, alpha))
    return float(ks[np.searchsorted(cdf, level)]) / m


def exceeds_binomial(errors: int, kept: int, target: float, level: float = 0.05) -> bool:
    """Whether `errors` among `kept` test samples is beyond the target's one-sided binomial margin:
    P(Binomial(kept, target) >= errors) < level, i.e. the test half itself shows the risk above the target."""
    from edge_quq.risk import binom_cdf

    if kept == 0 or errors == 0:
        return False
    tail = 1.0 - float(binom_cdf(np.array([errors - 1]), np.array([kept]), np.array([target]))[0])
    return tail < level


def split_check(a: SetArrays, y: np.ndarray, gates: Dict[str, Tuple[List[str], str]], n_splits: int, seed: int,
                alpha: float = ALPHA, delta: float = RISK_DELTA, targets: Sequence[float] = RISK_TARGETS) -> dict:
    """Over n_splits random calibration/test splits of the clean set: each gate's in-distribution
    false-ignore rate against alpha plus its binomial margin, and how often each risk target was violated
    (error among kept test samples above the target, and above it by more than the test half's binomial
    margin; a split whose calibration cannot certify the target keeps nothing and counts as not violated,
    reported as unreachable)."""
    correct = a.label() == y
    n_cal = int(round(len(y) * CAL_FRACTION))
    m = len(y) - n_cal
    limit = binomial_limit(m, alpha)
    # the rate given one calibration draw also moves, by about sqrt(alpha (1 - alpha) / n_cal)
    limit_cal = alpha + 1.6449 * np.sqrt(alpha * (1 - alpha) * (1 / m + 1 / n_cal))
    g_rates: Dict[str, List[float]] = {k: [] for k in gates}
    r_err: Dict[str, List[float]] = {f"risk@{100 * t:g}%": [] for t in targets}
    r_cov: Dict[str, List[float]] = {k: [] for k in r_err}
    r_sig: Dict[str, int] = {k: 0 for k in r_err}
    unreachable = {k: 0 for k in r_err}
    tgt = dict(zip(r_err, targets))
    for s in range(n_splits):
        ci, ti = split(len(y), [seed, 100, s])
        c = calibrate(a.take(ci), correct[ci], gates, alpha, delta, targets)
        t = a.take(ti)
        ign = gate_ignores(c, t, alpha)
        for k in gates:
            g_rates[k].append(float(ign[k].mean()))
        for k, thr in c.risk.items():
            if thr is None:
                unreachable[k] += 1
                continue
            keep = risk_keep(t, thr, ign[c.combined])
            r_cov[k].append(float(keep.mean()))
            errors = int(np.sum(~correct[ti][keep]))
            r_err[k].append(errors / keep.sum() if keep.any() else 0.0)
            r_sig[k] += int(exceeds_binomial(errors, int(keep.sum()), tgt[k]))
    gate_out = {k: {"mean_rate": round(float(np.mean(v)), 4), "max_rate": round(float(np.max(v)), 4),
                    "exceed_binomial": round(float(np.mean(np.array(v) > limit)), 4),
                    "exceed_binomial_and_calibration": round(float(np.mean(np.array(v) > limit_cal)), 4)} for k, v in g_rates.items()}
    risk_out = {}
    for k, t in zip(r_err, targets):
        e = np.array(r_err[k])
        risk_out[k] = {"target": t, "violation_rate": round(float(np.sum(e > t)) / n_splits, 4),
                       "violation_beyond_binomial_margin": round(r_sig[k] / n_splits, 4), "unreachable_splits": unreachable[k],
                       "mean_error_kept": round(float(e.mean()), 4) if e.size else None,
                       "mean_coverage": round(float(np.mean(r_cov[k])), 4) if e.size else None,
                       "min_coverage": round(float(np.min(r_cov[k])), 4) if e.size else None}
    return {"splits": n_splits, "n_calibration": n_cal, "n_test": m, "alpha": alpha, "delta": delta,
            "alpha_binomial_limit": round(limit, 4), "alpha_binomial_and_calibration_limit": round(float(limit_cal), 4),
            "gate": gate_out, "risk": risk_out}


def population_check(a: SetArrays, y: np.ndarray, names: Sequence[str], rule: str, resamples: int, seed: int,
                     n_cal: int = 5000, alpha: float = ALPHA, delta: float = RISK_DELTA,
                     targets: Sequence[float] = RISK_TARGETS) -> dict:
    """The risk guarantee checked where its premise holds exactly: the clean set is the population, each
    calibration set is `n_cal` i.i.d. draws from it (with replacement), and the error among kept is computed
    on the whole population, so no test-sample noise enters. LTT promises that the population risk of the
    chosen threshold exceeds the target in at most delta of the draws."""
    correct = a.label() == y
    cols = a.scores(names)
    rng = np.random.default_rng([seed, 101])
    viol = {t: 0 for t in targets}
    cover: Dict[float, List[float]] = {t: [] for t in targets}
    for _ in range(resamples):
        ci = rng.integers(0, len(y), n_cal)
        ign = gate(gate_pvalues(cols, sort_calibration([cols[ci, j] for j in range(cols.shape[1])]), rule), alpha)
        use = ci[~ign[ci] & a.rule_keep[ci]]
        table = CalibrationTable.build(a.confidence[use], correct[use])
        for t in targets:
            try:
                keep = risk_keep(a, ltt_threshold(table, t, delta).threshold, ign)
            except OptionError:
                keep = np.zeros(len(y), bool)
            viol[t] += int(keep.any() and np.mean(~correct[keep]) > t)
            cover[t].append(float(keep.mean()))
    return {"resamples": resamples, "n_calibration": n_cal,
            "risk": {f"risk@{100 * t:g}%": {"target": t, "violation_rate": round(viol[t] / resamples, 4),
                                            "violation_ci95": [round(v, 4) for v in _wilson(viol[t], resamples)],
                                            "mean_coverage": round(float(np.mean(cover[t])), 4)} for t in targets}}


def _wilson(k: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    p = k / n
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def shift_rates(c: Calibrated, a: SetArrays, y: Optional[np.ndarray], alpha: float = ALPHA) -> Dict[str, dict]:
    """Ignore rate and error among kept for every policy on one (shifted or OOD) set; y None: no labels."""
    return {k: rates(keep, pred, y) for k, (keep, pred) in decide(c, a, alpha).items()}
