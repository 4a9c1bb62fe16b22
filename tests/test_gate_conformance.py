"""The per-frame decision math in C (edge_quq._gatekernel) against its numpy reference.

Tolerances: p-values and Bonferroni are exact (the same comparisons and one division); the harmonic mean and
the martingale may differ in the last bits (summation order, libm's exp against numpy's), so 1e-14 relative
and 1e-9 on log10 of the martingale, the tolerance the monitor already meets against martingale_path.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_quq import conformal
from edge_quq.conformal import RowGate, combine, combine_reference, conformal_pvalues, pvalues_reference, sort_calibration
from edge_quq.drift import DriftMonitor, FeedRule
from edge_quq.errors import InputError, OptionError

needs_native = pytest.mark.skipif(conformal.NATIVE is None, reason="edge_quq._gatekernel is not built here")


def test_extension_is_built_where_a_compiler_exists():
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler here: the extension is optional and numpy does the work")
    assert conformal.NATIVE is not None, "edge_quq._gatekernel is not built although a C compiler exists"


def _scores_with_edges(rng: np.random.Generator, cal: list, n: int) -> np.ndarray:
    cols = [rng.choice(np.concatenate([c, c + 1e-12, [-np.inf, np.inf, np.nan]]), n) for c in cal]
    return np.column_stack(cols)


@needs_native
@pytest.mark.parametrize("sizes", [(1,), (7,), (300, 50), (5000, 5000, 17)])
@pytest.mark.parametrize("n", [0, 1, 513])
def test_pvalues_match_the_reference_exactly(sizes, n):
    rng = np.random.default_rng(len(sizes) * 1000 + n)
    raw = [rng.integers(0, 20, k).astype(float) if i % 2 == 0 else rng.normal(size=k) for i, k in enumerate(sizes)]
    cal = sort_calibration(raw)
    scores = _scores_with_edges(rng, list(cal.arrays), n)
    np.testing.assert_array_equal(conformal_pvalues(scores, cal), pvalues_reference(scores, cal))
    # a column slice is not C-contiguous: the C path must copy it, not misread it
    wide = np.column_stack([scores, scores])[:, : len(sizes)]
    np.testing.assert_array_equal(conformal_pvalues(wide, cal), pvalues_reference(scores, cal))


def _edge_pvalues(d: int) -> np.ndarray:
    """[400, d] p-values with zeros, ones, NaN and subnormals among them."""
    rng = np.random.default_rng(d)
    p = rng.random((400, d)) ** 3
    p[::7, 0] = 0.0
    p[1::11, -1] = 1.0
    p[2::13, d // 2] = np.nan
    p[3, :] = 1e-320
    p[4, :] = 1e-300
    return p


@needs_native
@pytest.mark.parametrize("rule", ["bonferroni", "hmp"])
@pytest.mark.parametrize("d", [1, 2, 3, 9])
def test_combine_matches_the_reference(rule, d):
    p = _edge_pvalues(d)
    got, want = combine(p, rule), combine_reference(p, rule)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    if rule == "bonferroni":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(combine(p[:, 0], rule), combine_reference(p[:, 0], rule))



# -- RowGate: one frame's gate in plain Python (what the predictor runs) against the kernel and the reference --

@pytest.mark.parametrize("sizes", [(1,), (7,), (300, 50), (5000, 5000, 17)])
def test_row_gate_pvalues_match_the_kernel_and_the_reference_exactly(sizes):
    rng = np.random.default_rng(sum(sizes))
    raw = [rng.integers(0, 20, k).astype(float) if i % 2 == 0 else rng.normal(size=k) for i, k in enumerate(sizes)]
    cal = sort_calibration(raw)
    pool = [np.concatenate([c, np.nextafter(c, np.inf), np.nextafter(c, -np.inf), [-np.inf, np.inf, np.nan, 0.0]])
            for c in cal.arrays]
    rows = np.column_stack([rng.choice(c, 400) for c in pool])
    got = np.array([RowGate(cal).pvalues(r.tolist()) for r in rows])
    np.testing.assert_array_equal(got, pvalues_reference(rows, cal))
    np.testing.assert_array_equal(got, conformal_pvalues(rows, cal))


@pytest.mark.parametrize("rule", ["bonferroni", "hmp"])
@pytest.mark.parametrize("d", [1, 2, 3, 9])
def test_row_gate_combine_matches_the_kernel_and_the_reference(rule, d):
    """Exact against the C kernel (the same sums in the same order) and, for Bonferroni, against numpy."""
    p = _edge_pvalues(d)
    gate = RowGate(sort_calibration([np.zeros(3)] * d), rule)
    got = [gate.combine(r) for r in p.tolist()]
    assert all(type(v) is float for v in got)
    want = combine_reference(p, rule)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    if conformal.NATIVE is not None:
        np.testing.assert_array_equal(got, combine(p, rule))
    if rule == "bonferroni":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("d", [1, 2, 3, 9])
def test_row_gate_calibrated_minp_matches_the_reference_exactly(d):
    """calibrated_minp has no C path: RowGate's bisect against combine's searchsorted, bit for bit, on
    p-values of real calibration ranks (ties included, where equal ranks must give equal floats) and on edge
    values (0, 1, NaN, subnormals)."""
    rng = np.random.default_rng(100 + d)
    raw = [rng.integers(0, 30, 500).astype(float) if i % 2 else rng.normal(size=500) for i in range(d)]
    cal = sort_calibration(raw)
    rows = np.concatenate([conformal_pvalues(_scores_with_edges(rng, list(cal.arrays), 400), cal), _edge_pvalues(d)])
    gate = RowGate(cal, "calibrated_minp")
    got = [gate.combine(r) for r in rows.tolist()]
    assert all(type(v) is float for v in got)
    np.testing.assert_array_equal(got, combine_reference(rows, "calibrated_minp", cal))
    np.testing.assert_array_equal(got, combine(rows, "calibrated_minp", cal))


@needs_native
@pytest.mark.parametrize("d", [1, 3])
def test_calibrated_minp_kernel_matches_the_reference_exactly(d):
    """_gatekernel.minp against combine_reference, bit for bit, on a column slice (not C-contiguous: the C
    path must copy it) with NaN rows; without the kernel combine is the reference."""
    rng = np.random.default_rng(200 + d)
    cal = sort_calibration([rng.integers(0, 9, 700).astype(float) for _ in range(d)])
    p = np.column_stack([_edge_pvalues(d), _edge_pvalues(d)])[:, :d]
    assert not p.flags.c_contiguous or d == 1
    np.testing.assert_array_equal(combine(p, "calibrated_minp", cal), combine_reference(p, "calibrated_minp", cal))


def test_row_gate_refuses_a_wrong_row_and_an_unknown_rule():
    cal = sort_calibration([np.arange(5.0), np.arange(3.0)])
    with pytest.raises(InputError, match=r"\[2\]"):
        RowGate(cal).pvalues([1.0])
    with pytest.raises(OptionError, match="unknown p-value combination rule"):
        RowGate(cal, "fisher")
    with pytest.raises(InputError, match="same calibration samples"):  # 5 and 3 scores: not one sample set
        RowGate(cal, "calibrated_minp")

def _run(monitor: DriftMonitor, p: np.ndarray, feats: np.ndarray) -> np.ndarray:
    out = []
    for x, f in zip(p, feats):
        s = monitor.update(float(x), f)
        out.append((s.log10_martingale, s.alarm, -1 if s.since_frame is None else s.since_frame, s.fed))
    return np.array(out, dtype=float)


@needs_native
@pytest.mark.parametrize("family", ["power", "simple"])
@pytest.mark.parametrize("mode", ["scene", "interval"])
def test_drift_monitor_steps_match_the_numpy_steps(family, mode):
    """A stream that stays, shifts (p-values fall) and returns, with repeated scenes: every frame's martingale,
    alarm and feed decision agree with and without the C step."""
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(300), rng.random(200) ** 6, rng.random(300)])
    p[50] = np.nan
    p[60] = 0.0
    scenes = rng.normal(size=(40, 96)).astype(np.float32)
    feats = scenes[rng.integers(0, 40, p.size)] + rng.normal(scale=0.01, size=(p.size, 96)).astype(np.float32)
    kw = dict(feed=FeedRule(mode=mode), family=family, clear_after=50)
    fast, slow = _run(DriftMonitor(native=True, **kw), p, feats), _run(DriftMonitor(native=False, **kw), p, feats)
    np.testing.assert_array_equal(fast[:, 1:], slow[:, 1:])
    np.testing.assert_allclose(fast[:, 0], slow[:, 0], atol=1e-9)
    assert slow[:, 1].any(), "the shifted stretch must raise the alarm, or this test compares nothing"
    # float64 features take the same path
    f64 = _run(DriftMonitor(native=True, **kw), p, feats.astype(np.float64))
    np.testing.assert_allclose(f64[:, 0], slow[:, 0], atol=1e-9)


def test_without_the_extension_everything_runs_on_numpy(monkeypatch):
    monkeypatch.setattr(conformal, "NATIVE", None)
    rng = np.random.default_rng(9)
    cal = sort_calibration([rng.normal(size=200), rng.normal(size=100)])
    scores = rng.normal(size=(50, 2))
    np.testing.assert_array_equal(conformal_pvalues(scores, cal), pvalues_reference(scores, cal))
    np.testing.assert_array_equal(combine(scores ** 2 % 1, "hmp"), combine_reference(scores ** 2 % 1, "hmp"))
