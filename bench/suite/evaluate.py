"""The suite's evaluations as functions of per-sample arrays (no I/O): paper tables, selective prediction,
OOD detection, calibration. Each returns plain JSON-ready dicts."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from edge_quq import metrics
from bench.suite.core import HeadRun, onehot, prediction_of, score_dict, score_predictions
from edge_quq.decision import decide_many

Z_GRID = (0.7, 0.8, 0.9)
T_GRID = (20, 30, 50)


def _r(v: float, nd: int = 4) -> Optional[float]:
    return None if v is None or not np.isfinite(v) else round(float(v), nd)


def kept_f1(ind: np.ndarray, true_ind: np.ndarray, keep: np.ndarray) -> float:
    return metrics.micro_f1(ind[keep], true_ind[keep]) if keep.any() else float("nan")


def risk_at_k(unc: np.ndarray, wrong: np.ndarray, k: int) -> float:
    """Error rate among the k samples a score trusts most (lowest uncertainty, stable order)."""
    if k <= 0:
        return float("nan")
    order = np.argsort(unc, kind="mergesort")
    return float(wrong[order[:k]].mean())


# --- Tables III-V: the z x T grid on the clean test set ---------------------------------------------------------

def grid_tables(run: HeadRun, y: np.ndarray, threshold: float, mixed: str, reps: int, seed: int, activation: str) -> List[dict]:
    c = run.probs.shape[2]
    true_ind = onehot(y, c)
    plain_pred = np.argmax(run.det_probs, axis=1)
    n = len(y)
    rows = []
    for t in T_GRID:
        mean, std, _ = run.moments(t)
        scores = score_dict(run, t, activation)
        preds = score_predictions(run, t)
        for z in Z_GRID:
            rr = decide_many(mean, std, z, threshold, mixed)
            keep = rr.keep
            wrong_rule = (rr.labels != y)
            k = int(keep.sum())
            g = np.random.default_rng([seed, int(t), int(round(z * 100))])
            # paired bootstrap: the same resampled indices for F1, #ignored and the rule-vs-max-prob difference
            unc_b = scores["max_prob_plain"]
            wrong_b = preds["plain"] != y
            thr_b = np.sort(unc_b, kind="mergesort")[k - 1] if k else -np.inf
            f1s, igs, diffs = [], [], []
            for _ in range(reps):
                idx = g.integers(0, n, n)
                kp = keep[idx]
                f1s.append(kept_f1(rr.indicators[idx], true_ind[idx], kp))
                igs.append(int((~kp).sum()))
                kb = unc_b[idx] <= thr_b
                if kp.any() and kb.any():
                    diffs.append(wrong_rule[idx][kp].mean() - wrong_b[idx][kb].mean())
            q = lambda v: [_r(np.nanquantile(v, 0.025)), _r(np.nanquantile(v, 0.975))] if len(v) else [None, None]
            ig = ~keep
            row = {
                "z": z, "T": t, "n": n,
                "micro_f1_kept": _r(kept_f1(rr.indicators, true_ind, keep)), "micro_f1_kept_ci95": q(np.array(f1s, float)),
                "ignored": int(ig.sum()), "ignored_ci95": [int(v) if v is not None else None for v in q(np.array(igs, float))],
                "coverage": _r(k / n),
                "misclassified_pct": _r(metrics.misclassified_pct(ig, plain_pred, y), 2),
                "mis_ignored": int(np.sum(plain_pred[ig] != y[ig])),
                "selective_risk_rule": _r(wrong_rule[keep].mean() if k else float("nan")),
                "risk_at_same_coverage": {s: _r(risk_at_k(scores[s], preds[prediction_of(s)] != y, k)) for s in scores},
                "rule_minus_maxprob_plain_ci95": q(np.array(diffs, float)),
            }
            rows.append(row)
    return rows


# --- corruptions (Tables VI-XIII) ---------------------------------------------------------------------------------

def corruption_cell(run: HeadRun, y: np.ndarray, z: float, t: int, threshold: float, mixed: str) -> dict:
    c = run.probs.shape[2]
    mean, std, _ = run.moments(t)
    rr = decide_many(mean, std, z, threshold, mixed)
    true_ind = onehot(y, c)
    plain_pred = np.argmax(run.det_probs, axis=1)
    plain_ind = run.det_probs > threshold
    ig = ~rr.keep
    return {
        "n": int(len(y)),
        "f1_plain": _r(metrics.micro_f1(plain_ind, true_ind)),
        "acc_plain": _r(float(np.mean(plain_pred == y))),
        "f1_uq": _r(kept_f1(rr.indicators, true_ind, rr.keep)),
        "acc_uq_kept": _r(float(np.mean(rr.labels[rr.keep] == y[rr.keep])) if rr.keep.any() else float("nan")),
        "ignored": int(ig.sum()),
        "ignore_rate": _r(float(ig.mean())),
        "misclassified_pct": _r(metrics.misclassified_pct(ig, plain_pred, y), 2),
    }


# --- selective prediction ---------------------------------------------------------------------------------------

def selective(run: HeadRun, y: np.ndarray, t: int, threshold: float, mixed: str, activation: str,
              z_sweep: Sequence[float] = tuple(np.round(np.arange(0.0, 10.01, 0.25), 2))) -> dict:
    scores = score_dict(run, t, activation)
    preds = score_predictions(run, t)
    out = {"T": t, "aurc": {}, "accuracy_full_coverage": {}, "curves": {}, "rule_sweep": []}
    for name, unc in scores.items():
        correct = preds[prediction_of(name)] == y
        out["aurc"][name] = _r(metrics.aurc(-unc, correct), 5)
        out["accuracy_full_coverage"][name] = _r(float(correct.mean()))
        cov, risk = metrics.risk_coverage(-unc, correct)
        pick = np.unique(np.linspace(0, len(cov) - 1, 200).astype(int))
        out["curves"][name] = {"coverage": [_r(v) for v in cov[pick]], "risk": [_r(v) for v in risk[pick]]}
    mean, std, _ = run.moments(t)
    base_wrong = preds["plain"] != y
    for z in z_sweep:
        rr = decide_many(mean, std, float(z), threshold, mixed)
        k = int(rr.keep.sum())
        out["rule_sweep"].append({
            "z": float(z), "coverage": _r(k / len(y)),
            "risk": _r(float(np.mean(rr.labels[rr.keep] != y[rr.keep])) if k else float("nan")),
            "risk_max_prob_plain": _r(risk_at_k(scores["max_prob_plain"], base_wrong, k)),
            "risk_max_prob_mc": _r(risk_at_k(scores["max_prob_mc"], preds["mc"] != y, k)),
        })
    return out


# --- OOD --------------------------------------------------------------------------------------------------------

def ood_table(id_scores: Dict[str, np.ndarray], ood_scores: Dict[str, np.ndarray]) -> Dict[str, dict]:
    return {name: {k: _r(v) for k, v in metrics.ood_metrics(id_scores[name], ood_scores[name]).items()} for name in id_scores}


# --- calibration -------------------------------------------------------------------------------------------------

def calibration(probs: Dict[str, np.ndarray], y: np.ndarray, bins: int = 15) -> dict:
    """Per probability source: ECE of the head's own confidence (max output, as the head states it), and
    ECE / NLL / Brier of the outputs normalised to sum to 1 (a sigmoid head's outputs need not)."""
    out = {}
    for name, p in probs.items():
        p = np.asarray(p, np.float64)
        pred = np.argmax(p, axis=1)
        correct = pred == y
        conf = p.max(axis=1)
        pn = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        rb = metrics.reliability_bins(conf, correct, bins)
        out[name] = {
            "ece_max_output": _r(metrics.ece(conf, correct, bins)),
            "ece_normalised": _r(metrics.ece(pn.max(axis=1), correct, bins)),
            "nll_normalised": _r(metrics.nll(pn, y)),
            "brier_normalised": _r(metrics.brier(pn, y)),
            "accuracy": _r(float(correct.mean())),
            "mean_confidence": _r(float(conf.mean())),
            "reliability": {"count": rb["count"].tolist(), "accuracy": [_r(v) for v in rb["accuracy"]],
                            "confidence": [_r(v) for v in rb["confidence"]]},
        }
    return out
