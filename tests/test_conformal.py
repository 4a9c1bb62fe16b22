"""The OOD gate's math (edge_quq.conformal): p-values, combination rules, the false-ignore guarantee."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edge_quq.conformal import check_level, combine, conformal_pvalues, gate, gate_pvalues, hmp_factor, sort_calibration
from edge_quq.errors import InputError, OptionError
from tests.gate_util import real_id_data


def _margin(alpha: float, trials: int) -> float:
    """Four binomial standard deviations: a bound exceeded by chance about once in 30 000 runs."""
    return 4.0 * math.sqrt(alpha * (1 - alpha) / trials)


def test_pvalues_match_a_direct_loop_with_ties_and_nan():
    rng = np.random.default_rng(0)
    cal = [rng.integers(0, 20, 300).astype(float), rng.normal(size=50)]
    scores = np.column_stack([rng.integers(-2, 23, 400).astype(float), rng.normal(size=400) * 2])
    scores[5, 1] = np.nan
    p = conformal_pvalues(scores, sort_calibration(cal))
    for i in range(scores.shape[0]):
        for d in range(2):
            s = scores[i, d]
            want = 0.0 if np.isnan(s) else (1 + sum(c >= s for c in cal[d])) / (len(cal[d]) + 1)
            assert p[i, d] == pytest.approx(want, abs=1e-15)


def test_smoothed_pvalues_match_mapie():
    martingales = pytest.importorskip("mapie.exchangeability_testing.martingales")
    rng = np.random.default_rng(1)
    cal = rng.integers(0, 10, 200).astype(float)  # ties, where smoothing matters
    scores = rng.integers(-1, 12, 300).astype(float)
    ours = conformal_pvalues(scores[:, None], sort_calibration([cal]), smooth=True, rng=np.random.default_rng(7))[:, 0]
    omt = martingales.OnlineMartingaleTest(random_state=0)
    omt.rng = np.random.default_rng(7)  # the same uniform draws, in the same order
    theirs = np.array([omt.compute_p_value(s, cal) for s in scores])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    plain = conformal_pvalues(scores[:, None], sort_calibration([cal]))[:, 0]
    assert np.all(ours <= plain + 1e-15)


def test_pvalues_are_super_uniform_and_gate_false_ignore_is_at_most_alpha():
    """Exchangeable synthetic data over 400 random calibration/test splits."""
    rng = np.random.default_rng(2)
    splits, n_cal, n_test = 400, 200, 50
    pooled, rates = [], []
    for _ in range(splits):
        data = rng.standard_t(3, size=(n_cal + n_test, 3)) @ np.array([[1, .8, 0], [0, .6, .5], [0, 0, 1.]])
        cal = sort_calibration(data[:n_cal].T)
        p = conformal_pvalues(data[n_cal:], cal)
        pooled.append(p)
        rates.append([gate(combine(p, rule, cal), 0.05).mean() for rule in ("bonferroni", "hmp", "calibrated_minp")])
    pooled = np.concatenate(pooled)
    trials = pooled.shape[0]
    for t in (0.01, 0.05, 0.1, 0.3, 0.5, 0.9):
        assert np.all((pooled <= t).mean(axis=0) <= t + _margin(t, trials))
    assert np.all(np.mean(rates, axis=0) <= 0.05 + _margin(0.05, trials))
    # the smoothed variant is uniform, not only super-uniform
    # (marginally over calibration draws: given one calibration set, p-values are only close to uniform)
    ps = np.concatenate([conformal_pvalues(rng.normal(size=(1, 1)), sort_calibration([rng.normal(size=9)]),
                                           smooth=True, rng=rng)[:, 0] for _ in range(4000)])
    for t in (0.05, 0.25, 0.5, 0.75):
        assert abs((ps <= t).mean() - t) <= _margin(t, ps.size)


def test_combination_rules_are_valid_under_strong_dependence():
    rng = np.random.default_rng(3)
    u = rng.random(200000)
    dependent = {
        "identical": np.column_stack([u, u, u, u]),
        "independent": rng.random((200000, 4)),
        "antithetic": np.column_stack([u, 1 - u, u, 1 - u]),
        "shifted": np.column_stack([u, (u + 0.25) % 1, (u + 0.5) % 1, (u + 0.75) % 1]),
    }
    for name, p in dependent.items():
        for rule in ("bonferroni", "hmp"):
            c = combine(p, rule)
            for a in (0.01, 0.05, 0.2):
                assert (c <= a).mean() <= a + _margin(a, p.shape[0]), (name, rule, a)


def _exact_minp(cal_rows: np.ndarray, test_row: np.ndarray) -> float:
    """The full-conformal p-value of the smallest rank, by its definition: rank all n + 1 points under each
    detector (#{j : s_dj >= s_di}), take each point's smallest rank, count points at or below the test's."""
    pts = np.vstack([cal_rows, test_row])
    ranks = (pts[None, :, :] >= pts[:, None, :]).sum(axis=1)  # [i, d]: #{j : s_jd >= s_id}
    c = ranks.min(axis=1)
    return float(np.sum(c <= c[-1]) / len(pts))


def test_calibrated_minp_is_its_definition_and_never_below_the_exact_full_conformal_value():
    rng = np.random.default_rng(11)
    for d, ties in ((1, False), (2, False), (3, True), (4, True)):
        cal_rows = rng.normal(size=(60, d)) @ rng.normal(size=(d, d))
        test = rng.normal(size=(80, d)) @ rng.normal(size=(d, d)) * 1.5
        if ties:
            cal_rows, test = np.round(cal_rows), np.round(test)
        cal = sort_calibration(cal_rows.T)
        got = gate_pvalues(test, cal, "calibrated_minp")
        n = len(cal_rows)
        own = ((cal_rows[None, :, :] >= cal_rows[:, None, :]).sum(axis=1) / (n + 1)).min(axis=1)  # m_i
        for i, row in enumerate(test):
            low = ((1 + (cal_rows >= row).sum(axis=0)) / (n + 1)).min()
            assert got[i] == pytest.approx((1 + np.sum(own <= low + 1e-12)) / (n + 1), abs=1e-15)
            assert got[i] >= _exact_minp(cal_rows, row) - 1e-12
        # within one calibration step of Bonferroni, or below it
        assert np.all(got <= gate_pvalues(test, cal, "bonferroni") + 1.0 / (n + 1) + 1e-12)


def test_calibrated_minp_holds_alpha_where_bonferroni_pays_for_dependence():
    """Identical, near-identical and antithetic detectors: calibrated_minp's false-ignore stays at most alpha
    and, unlike Bonferroni's, reaches it when the detectors agree."""
    rng = np.random.default_rng(12)
    splits, n_cal, n_test, alpha = 300, 300, 100, 0.05
    shapes = {"identical": lambda z: np.column_stack([z, z, z]),
              "near-identical": lambda z: np.column_stack([z, z + 0.05 * rng.normal(size=z.shape), z]),
              "antithetic": lambda z: np.column_stack([z, -z])}
    for name, make in shapes.items():
        rates = {"calibrated_minp": [], "bonferroni": []}
        for _ in range(splits):
            data = make(rng.standard_t(3, size=n_cal + n_test))
            cal = sort_calibration(data[:n_cal].T)
            for rule in rates:
                rates[rule].append(gate(gate_pvalues(data[n_cal:], cal, rule), alpha).mean())
        trials = splits * n_test
        mine, bonf = np.mean(rates["calibrated_minp"]), np.mean(rates["bonferroni"])
        assert mine <= alpha + _margin(alpha, trials), name
        if name != "antithetic":  # agreeing detectors: the whole alpha is spent, Bonferroni spends alpha / D
            assert mine > 0.85 * alpha and bonf < 0.6 * alpha, (name, mine, bonf)


def test_combine_formulas():
    p = np.array([[0.01, 0.5, 1.0], [0.2, 0.3, 0.4], [0.0, 0.5, 0.5], [0.9, 0.9, 0.9]])
    np.testing.assert_allclose(combine(p, "bonferroni"), np.minimum(3 * p.min(axis=1), 1))
    hm = 3 / np.sum(1 / np.where(p == 0, 1e-300, p), axis=1)
    np.testing.assert_allclose(combine(p, "hmp"), np.minimum(math.e * math.log(3) * hm, 1), atol=1e-12)
    assert hmp_factor(1) == 1 and hmp_factor(2) == 2 and hmp_factor(8) == pytest.approx(math.e * math.log(8))
    assert all(hmp_factor(d) < d for d in range(3, 50))
    np.testing.assert_allclose(combine(np.array([0.03, 0.7]), "hmp"), [0.03, 0.7])  # one detector: p itself


def test_bad_input_is_one_clear_error():
    cal = sort_calibration([np.arange(10.0)])
    with pytest.raises(OptionError, match="ood alpha"):
        gate(np.array([0.1]), 1.0)
    with pytest.raises(OptionError, match="combination rule"):
        combine(np.ones((2, 2)), "fisher")
    with pytest.raises(InputError, match="calibrated_minp rule needs"):
        combine(np.ones((2, 1)), "calibrated_minp")  # no calibration given
    with pytest.raises(InputError, match="calibrated_minp rule needs"):
        combine(np.ones((2, 2)), "calibrated_minp", cal)  # calibration of another number of detectors
    with pytest.raises(InputError, match=r"\[N, 1\]"):
        conformal_pvalues(np.ones((3, 2)), cal)
    with pytest.raises(InputError, match="finite"):
        sort_calibration([np.array([1.0, np.nan])])
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(OptionError):
            check_level(bad, "delta")


def test_gate_on_real_fashion_mnist_features_keeps_its_false_ignore_bound():
    """The default bundle's detectors on held-out Fashion-MNIST test images, 200 random splits."""
    data = real_id_data()
    names = ("mahalanobis", "knn", "energy")
    scores = np.column_stack([data["score_" + n] for n in names])
    rng = np.random.default_rng(4)
    alpha, n_cal = 0.05, 2000
    rates = {"bonferroni": [], "hmp": [], "calibrated_minp": []}
    for _ in range(200):
        perm = rng.permutation(scores.shape[0])
        cal = sort_calibration(scores[perm[:n_cal]].T)
        for rule in rates:
            rates[rule].append(gate(gate_pvalues(scores[perm[n_cal:]], cal, rule), alpha).mean())
    trials = 200 * (scores.shape[0] - n_cal)
    for rule, r in rates.items():
        assert np.mean(r) <= alpha + _margin(alpha, trials), rule
        assert np.mean(r) > 0.2 * alpha  # the gate is not vacuous on real data either
