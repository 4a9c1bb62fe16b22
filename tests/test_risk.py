"""Selective classification with a guarantee (edge_quq.risk): binomial tail, Learn-then-Test threshold."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edge_quq.errors import OptionError
from edge_quq.risk import CalibrationTable, binom_cdf, hb_pvalue, keep_mask, ltt_threshold, min_kept, smallest_reachable_target, start_kept
from tests.gate_util import real_id_data


def test_binom_cdf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    n = rng.integers(1, 20000, 3000)
    k = (rng.random(3000) * n * 0.3).astype(np.int64)
    p = rng.choice([1e-4, 0.01, 0.02, 0.05, 0.2, 0.5, 0.9, 0.999], 3000)
    ours, ref = binom_cdf(k, n, p), stats.binom.cdf(k, n, p)
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-250)  # scipy underflows to 0 first
    edges = (np.array([-1, 0, 5, 5, 0, 3]), np.array([5, 5, 5, 4, 7, 7]), np.array([0.3, 0.3, 0.3, 0.3, 0.0, 1.0]))
    np.testing.assert_allclose(binom_cdf(*edges), stats.binom.cdf(*edges), atol=1e-15)


def test_hoeffding_bentkus_matches_mapie():
    methods = pytest.importorskip("mapie.risk_control.methods")
    kept = np.array([50, 200, 1000, 3000, 7])
    errors = np.array([0, 3, 12, 200, 1])
    for target in (0.02, 0.05, 0.1):
        theirs = methods.compute_hoeffding_bentkus_p_value(errors / kept, kept.astype(float), target)[:, 0]
        np.testing.assert_allclose(hb_pvalue(errors, kept, target), np.minimum(theirs, 1.0), rtol=1e-7)


def _synthetic(rng: np.random.Generator, n: int, a: float = 0.1):
    """Confidence c ~ U(0, 1), P(wrong | c) = a (1 - c)^2, so R(t) = P(wrong | c > t) = a (1 - t)^2 / 3."""
    c = rng.random(n)
    return c, rng.random(n) >= a * (1 - c) ** 2


def test_guarantee_holds_over_random_splits_on_synthetic_data():
    rng = np.random.default_rng(1)
    target, delta, splits, a = 0.02, 0.05, 300, 0.1
    violations, coverage, refused = 0, [], 0
    for _ in range(splits):
        c, ok = _synthetic(rng, 2000, a)
        try:
            chosen = ltt_threshold(CalibrationTable.build(c, ok), target, delta)
        except OptionError:  # an unlucky calibration set cannot certify the target: safe, and rare
            refused += 1
            continue
        t = max(chosen.threshold, 0.0)
        violations += a * (1 - t) ** 2 / 3 > target  # the true selective risk of the chosen threshold
        coverage.append(1 - t)
    margin = 4 * math.sqrt(delta * (1 - delta) / splits)
    assert violations / splits <= delta + margin
    assert refused / splits <= 0.02
    oracle = 1 - (1 - math.sqrt(3 * target / a))  # coverage at R(t) = target
    assert oracle * 0.7 < np.mean(coverage) <= oracle  # certified, yet not far below the oracle


def test_guarantee_holds_on_real_fashion_mnist():
    """The 4000 held-out images are the population: calibration sets are drawn from it with replacement
    (so exactly iid), and the true selective risk of a threshold is its error among kept over the pool."""
    data = real_id_data()
    conf, correct = data["confidence"], data["correct"]
    rng = np.random.default_rng(2)
    target, delta, splits = 0.03, 0.1, 200
    violations = 0
    for _ in range(splits):
        cal = rng.integers(0, conf.size, 2000)
        chosen = ltt_threshold(CalibrationTable.build(conf[cal], correct[cal]), target, delta)
        kept = keep_mask(conf, chosen.threshold)
        violations += (~correct[kept]).mean() > target
    assert violations / splits <= delta + 4 * math.sqrt(delta * (1 - delta) / splits)


def test_fixed_sequence_matches_mapie():
    fwer = pytest.importorskip("mapie.risk_control.fwer_control")
    from edge_quq.risk import binomial_pvalue

    rng = np.random.default_rng(3)
    c, ok = _synthetic(rng, 3000)
    table = CalibrationTable.build(c, ok)
    chosen = ltt_threshold(table, 0.02, 0.05)
    thresholds, kept, errors = table.candidates()
    start = int(np.searchsorted(kept, start_kept(0.02, 0.05)))
    p = binomial_pvalue(errors[start:], kept[start:], 0.02)
    rejected = fwer.control_fwer(p, 0.05, fwer_method="fixed_sequence")
    assert thresholds[start + rejected.max()] == chosen.threshold
    assert chosen.kept == int(np.sum(c > chosen.threshold))
    assert chosen.errors == int(np.sum(~ok[c > chosen.threshold]))


def test_unreachable_target_names_the_smallest_reachable_one():
    rng = np.random.default_rng(4)
    c, ok = _synthetic(rng, 1000, a=0.6)
    table = CalibrationTable.build(c, ok)
    best = smallest_reachable_target(table, 0.05)
    with pytest.raises(OptionError, match=rf"smallest reachable target is {best:.4f}"):
        ltt_threshold(table, 0.001, 0.05)
    assert ltt_threshold(table, best, 0.05).kept >= start_kept(best, 0.05) >= min_kept(best, 0.05)
    with pytest.raises(OptionError, match="no target below 1 is reachable"):
        ltt_threshold(CalibrationTable.build(np.ones(5), np.zeros(5, bool)), 0.5, 0.05)
    for bad in (0.0, 1.0, -0.2, 2.0):
        with pytest.raises(OptionError, match="target error"):
            ltt_threshold(table, bad, 0.05)
    with pytest.raises(OptionError, match="delta"):
        ltt_threshold(table, 0.1, 1.0)


def test_hb_bound_is_never_tighter_than_the_exact_binomial():
    rng = np.random.default_rng(5)
    c, ok = _synthetic(rng, 3000)
    table = CalibrationTable.build(c, ok)
    exact, hb = ltt_threshold(table, 0.02, 0.05), ltt_threshold(table, 0.02, 0.05, bound="hb")
    assert hb.threshold >= exact.threshold and hb.coverage <= exact.coverage


def test_clopper_pearson_bound_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from edge_quq.risk import binomial_upper_bound

    for k, m, level in [(0, 100, 0.01), (3, 500, 0.004), (50, 1000, 0.05), (0, 5, 0.5), (19, 1728, 0.0045)]:
        want = stats.beta.ppf(1 - level, k + 1, m - k)
        assert want <= binomial_upper_bound(k, m, level) <= want + 1e-9
    assert binomial_upper_bound(0, 0, 0.05) == 1.0


def test_sgr_guarantee_over_random_splits_and_refusal():
    from edge_quq.risk import sgr_threshold

    rng = np.random.default_rng(6)
    target, delta, splits, a = 0.03, 0.1, 120, 0.1  # SGR's search starts at half coverage: give it room
    violations = 0
    for _ in range(splits):
        c, ok = _synthetic(rng, 2000, a)
        t = max(sgr_threshold(CalibrationTable.build(c, ok), target, delta).threshold, 0.0)
        violations += a * (1 - t) ** 2 / 3 > target
    assert violations / splits <= delta + 4 * math.sqrt(delta * (1 - delta) / splits)
    with pytest.raises(OptionError, match="SGR"):
        sgr_threshold(CalibrationTable.build(*_synthetic(rng, 300, 0.9)), 0.001, 0.05)
