"""conformal.RowGate (one frame's gate in plain Python, what the predictor runs) against conformal_pvalues and
combine (the C kernel where built) and their numpy references: p-values and Bonferroni exactly; the harmonic
mean exactly against the C kernel (the same sums in the same order) and to 1e-14 against numpy's sum."""
from __future__ import annotations

import numpy as np
import pytest

from edge_quq import conformal
from edge_quq.conformal import RowGate, combine, combine_reference, conformal_pvalues, pvalues_reference, sort_calibration
from edge_quq.errors import InputError, OptionError


def _rows(rng: np.random.Generator, cal, n: int) -> np.ndarray:
    """Scores on, just beside and between the calibration values, and the infinities and NaN."""
    cols = []
    for c in cal.arrays:
        pool = np.concatenate([c, np.nextafter(c, np.inf), np.nextafter(c, -np.inf), [-np.inf, np.inf, np.nan, 0.0]])
        cols.append(rng.choice(pool, n))
    return np.column_stack(cols)


@pytest.mark.parametrize("sizes", [(1,), (7,), (300, 50), (5000, 5000, 17)])
def test_row_pvalues_match_the_kernel_and_the_reference_exactly(sizes):
    rng = np.random.default_rng(sum(sizes))
    raw = [rng.integers(0, 20, k).astype(float) if i % 2 == 0 else rng.normal(size=k) for i, k in enumerate(sizes)]
    cal = sort_calibration(raw)
    rows = _rows(rng, cal, 400)
    got = np.array([RowGate(cal).pvalues(r.tolist()) for r in rows])
    np.testing.assert_array_equal(got, pvalues_reference(rows, cal))
    np.testing.assert_array_equal(got, conformal_pvalues(rows, cal))


@pytest.mark.parametrize("rule", ["bonferroni", "hmp"])
@pytest.mark.parametrize("d", [1, 2, 3, 9])
def test_row_combine_matches_the_kernel_and_the_reference(rule, d):
    rng = np.random.default_rng(d)
    p = rng.random((400, d)) ** 3
    p[::7, 0] = 0.0
    p[1::11, -1] = 1.0
    p[2::13, d // 2] = np.nan
    p[3, :] = 1e-320
    p[4, :] = 1e-300
    gate = RowGate(sort_calibration([np.zeros(3)] * d), rule)
    got = np.array([gate.combine(r.tolist()) for r in p])
    assert all(type(gate.combine(r.tolist())) is float for r in p[:5])
    want = combine_reference(p, rule)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    if conformal.NATIVE is not None:
        np.testing.assert_array_equal(got, combine(p, rule))
    if rule == "bonferroni":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-14)


def test_row_gate_refuses_a_wrong_row_and_an_unknown_rule():
    cal = sort_calibration([np.arange(5.0), np.arange(3.0)])
    with pytest.raises(InputError, match=r"\[2\]"):
        RowGate(cal).pvalues([1.0])
    with pytest.raises(OptionError, match="unknown p-value combination rule"):
        RowGate(cal, "fisher")
