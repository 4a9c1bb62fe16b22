"""Metric functions against hand-computed values and scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from edge_quq import metrics as M


def test_micro_f1_by_hand_and_sklearn():
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # tp=2, fp=1, fn=1 -> 4/6
    assert M.micro_f1(pred, true) == pytest.approx(4 / 6)
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 2, (200, 5)), rng.integers(0, 2, (200, 5))
    assert M.micro_f1(p, t) == pytest.approx(f1_score(t, p, average="micro"))
    a, b = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    assert M.micro_f1(a, b) == pytest.approx(f1_score(b, a, average="micro"))


def test_misclassified_pct_by_hand():
    ignored = np.array([1, 1, 0, 1, 0], bool)
    plain = np.array([0, 1, 2, 3, 4])
    labels = np.array([0, 2, 2, 1, 4])
    assert M.misclassified_pct(ignored, plain, labels) == pytest.approx(100 * 2 / 3)
    assert np.isnan(M.misclassified_pct(np.zeros(5, bool), plain, labels))


def test_auroc_by_hand_and_sklearn_with_ties():
    assert M.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    rng = np.random.default_rng(1)
    s = rng.integers(0, 10, 500).astype(float)
    y = rng.integers(0, 2, 500)
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_average_precision_matches_sklearn():
    assert M.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(2)
    for _ in range(5):
        s = np.round(rng.random(300), 2)
        y = rng.integers(0, 2, 300)
        assert M.average_precision(s, y) == pytest.approx(average_precision_score(y, s))


def test_fpr95_by_hand_and_against_roc_curve():
    ood = np.arange(1, 101, dtype=float)  # thresholds: catching 95 of them needs t <= 6
    idd = np.array([0.0, 5.0, 6.0, 7.0, 50.0])
    assert M.fpr_at_tpr(idd, ood) == pytest.approx(3 / 5)
    rng = np.random.default_rng(3)
    i, o = rng.normal(0, 1, 1000), rng.normal(1.5, 1, 700)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(1000), np.ones(700)], np.r_[i, o])
    assert M.fpr_at_tpr(i, o) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-9)


def test_ood_metrics_directions():
    m = M.ood_metrics(np.array([0.0, 0.1, 0.2]), np.array([0.9, 1.0]))
    assert m["auroc"] == 1.0 and m["aupr_in"] == 1.0 and m["aupr_out"] == 1.0 and m["fpr95"] == 0.0


def test_ece_by_hand():
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 0, 1, 1])
    # bin of 0.95: acc 0.5 vs 0.95 -> 0.45*2; bin of 0.55: acc 1 vs 0.55 -> 0.45*2; total 1.8/4
    assert M.ece(conf, correct) == pytest.approx(0.45)
    assert M.ece(np.array([0.0, 1.0]), np.array([0, 1])) == pytest.approx(0.0)


def test_nll_brier_by_hand():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    y = np.array([0, 1])
    assert M.nll(p, y) == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2)
    assert M.brier(p, y) == pytest.approx((0.5 + (0.81 + 0.81)) / 2)


def test_aurc_by_hand():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 0, 1, 0])
    # risks at k=1..4: 0, 1/2, 1/3, 2/4
    assert M.aurc(conf, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    cov, risk = M.risk_coverage(conf, correct)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]


def test_bootstrap_ci_brackets_the_mean():
    x = np.random.default_rng(4).normal(5, 1, 400)
    lo, hi = M.bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), reps=300)
    assert lo < x.mean() < hi and hi - lo < 0.5
