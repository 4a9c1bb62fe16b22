"""Evaluation metrics as pure numpy functions (the benchmark suite's and the tests' common ground).

Conventions follow OpenOOD v1.5 / pytorch-ood for OOD detection: out-of-distribution is the positive class
for AUROC and AUPR-out, in-distribution is positive for AUPR-in, and FPR@95 is the fraction of
in-distribution samples flagged at the threshold that catches 95% of the out-of-distribution ones. Scores
passed to the OOD functions must grow with "more OOD".
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np


def micro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Micro-averaged F1 over indicator matrices [N, C] (or label vectors [N], one label per sample)."""
    p = np.asarray(pred)
    t = np.asarray(true)
    if p.ndim == 1:
        return float(np.mean(p == t)) if p.size else float("nan")
    p = p.astype(bool)
    t = t.astype(bool)
    tp = np.sum(p & t)
    fp = np.sum(p & ~t)
    fn = np.sum(~p & t)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else float("nan")


def misclassified_pct(ignored: np.ndarray, plain_pred: np.ndarray, labels: np.ndarray) -> float:
    """The paper's Misclassified(%) = MI / I: of the ignored samples, the share the plain model gets wrong."""
    ig = np.asarray(ignored, bool)
    n = int(ig.sum())
    if n == 0:
        return float("nan")
    return float(100.0 * np.sum(np.asarray(plain_pred)[ig] != np.asarray(labels)[ig]) / n)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum over distinct thresholds (sklearn's AP)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each tie group
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / n_pos
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def fpr_at_tpr(scores_id: np.ndarray, scores_ood: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of in-distribution samples flagged at the threshold that flags `tpr` of the OOD ones."""
    ood = np.sort(np.asarray(scores_ood, np.float64))
    if ood.size == 0 or np.size(scores_id) == 0:
        return float("nan")
    # the largest threshold t with mean(ood >= t) >= tpr
    k = int(np.floor((1.0 - tpr) * len(ood) + 1e-9))
    thr = ood[k]
    return float(np.mean(np.asarray(scores_id, np.float64) >= thr))


def ood_metrics(scores_id: np.ndarray, scores_ood: np.ndarray) -> Dict[str, float]:
    s = np.r_[np.asarray(scores_id, np.float64), np.asarray(scores_ood, np.float64)]
    is_ood = np.r_[np.zeros(len(scores_id), bool), np.ones(len(scores_ood), bool)]
    return {
        "auroc": auroc(s, is_ood),
        "aupr_in": average_precision(-s, ~is_ood),
        "aupr_out": average_precision(s, is_ood),
        "fpr95": fpr_at_tpr(scores_id, scores_ood, 0.95),
    }


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with equal-width bins over (0, 1]; a confidence of 0 falls in the first."""
    c = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, np.float64)
    idx = np.clip(np.ceil(c * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(ok[m].mean() - c[m].mean())
    return float(total / len(c)) if len(c) else float("nan")


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Dict[str, np.ndarray]:
    c = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, np.float64)
    idx = np.clip(np.ceil(c * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, weights=ok, minlength=bins) / np.maximum(count, 1)
    conf = np.bincount(idx, weights=c, minlength=bins) / np.maximum(count, 1)
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "accuracy": acc, "confidence": conf}


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    p = np.asarray(probs, np.float64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), labels], eps, 1.0))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.asarray(probs, np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), labels] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Coverage k/N and selective risk (error rate among the k most confident), k = 1..N."""
    c = np.asarray(confidence, np.float64)
    wrong = 1.0 - np.asarray(correct, np.float64)
    order = np.argsort(-c, kind="mergesort")
    k = np.arange(1, len(c) + 1)
    return k / len(c), np.cumsum(wrong[order]) / k


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean selective risk over all coverages)."""
    _, risk = risk_coverage(confidence, correct)
    return float(np.mean(risk)) if len(risk) else float("nan")


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, reps: int = 1000, seed: int = 0, level: float = 0.95,
                 rng: Optional[np.random.Generator] = None) -> Tuple[float, float]:
    """Percentile bootstrap interval of stat(indices) over resampled index sets."""
    g = rng or np.random.default_rng(seed)
    vals = np.array([stat(g.integers(0, n, n)) for _ in range(reps)], np.float64)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1.0 - a))
