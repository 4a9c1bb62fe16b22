"""The per-frame native kernels (edge_quq/csrc/frame.c, edge_quq.framekernels) against their numpy references,
every kernel on random and edge-case inputs (ties, NaN, C = 1 and 1000, N = 1 and N > 1) within the tolerances
framekernels documents; and the install without the extension, whose predictor must give the same results
through the references."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_quq import framekernels
from edge_quq.decision import RULE_NAMES, _interval_rule, decide, decide_numpy
from edge_quq.detectors import _mahalanobis_numpy, _prepare_mahalanobis, _project
from edge_quq.scores import compute_scores, compute_scores_numpy, row_scores, score_row

ROOT = Path(__file__).resolve().parent.parent
native = pytest.mark.skipif(not framekernels.available(), reason="the C extension edge_quq._headkernel is not built")
SHAPES = [(1, 1), (1, 10), (7, 10), (1, 1000), (3, 1000), (50, 3)]  # (N, C)
CASES = ("random", "ties", "nan", "extreme")


def head_outputs(case: str, n: int, c: int, seed: int = 0):
    """(mean, std, float32 logits, expected_entropy) rows of one kind of input."""
    rng = np.random.default_rng([seed, n, c, CASES.index(case)])
    mean, std = rng.random((n, c)), rng.random((n, c)) * 0.3
    logits, ee = (rng.normal(size=(n, c)) * 4).astype(np.float32), rng.random(n)
    if case == "ties":  # equal means (argmax, max), equal logits; means on the threshold, bounds exactly on it
        mean[:, : (c + 1) // 2] = 0.5
        std[:, ::2] = 0.0
        std[:, 1::2] = 0.25
        mean[:, 1::4] = 0.625  # with z = 0.5: lower = 0.5, the threshold
        logits[:] = 1.5
    elif case == "nan":
        for a in (mean, std, logits):
            a[rng.random(a.shape) < 0.15] = np.nan
        ee[rng.random(n) < 0.3] = np.nan
    elif case == "extreme":  # the entropy's clipping, softplus/logsumexp far out, infinities
        mean = rng.choice([0.0, 1.0, 1e-300, 1.0 - 1e-16], size=(n, c))
        std = rng.choice([0.0, 1e-300, 10.0], size=(n, c))
        logits = rng.choice(np.array([-np.inf, -1e4, 0.0, 1e-30, 80.0, 1e4, np.inf], np.float32), size=(n, c))
    return mean, std, logits, ee


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, scale=None, what: str = "") -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok & np.isinf(want)], want[ok & np.isinf(want)]), what
    fin = ok & np.isfinite(want)
    bound = rtol * (np.maximum(1.0, np.abs(want)) if scale is None else scale)
    assert np.all(np.abs(got - want)[fin] <= np.broadcast_to(bound, want.shape)[fin]), (what, np.abs(got - want)[fin].max())


@native
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,c", SHAPES)
def test_kernels_match_their_numpy_references(case, n, c):
    mean, std, logits, ee = head_outputs(case, n, c)
    with np.errstate(all="ignore"):
        # moment scores: rows, a single [C] vector (numpy scalars out), float64 logits, every activation
        for act in ("sigmoid", "softmax", "linear"):
            for args in ((mean, std, logits, ee), (mean[0], std[0], logits[0], float(ee[0])),
                         (mean, std, logits.astype(np.float64), ee)):
                got, want = compute_scores(*args, act), compute_scores_numpy(*args, act)
                assert list(got) == list(want)
                for k in want:
                    assert type(got[k]) is type(want[k]), k
                    assert_close(got[k], want[k], framekernels.SCORE_RTOL, what=f"{act} {k}")
        # the interval rule: exact, both policies for the open case
        for z, thr, mixed in ((0.5, 0.5, "ignore"), (0.8, 0.5, "keep"), (0.0, 0.3, "ignore"), (2.0, 0.9, "keep")):
            (got, glo, ghi), (want, wlo, whi) = _interval_rule(mean, std, z, thr, mixed), decide_numpy(mean, std, z, thr, mixed)
            for name in ("keep", "code", "states", "indicators", "labels"):
                g, w = getattr(got, name), getattr(want, name)
                assert g.dtype == w.dtype and np.array_equal(g, w), (name, z, thr, mixed)
            assert np.array_equal(glo, wlo, equal_nan=True) and np.array_equal(ghi, whi, equal_nan=True)
        # one row, as a frame runs them: the kernels' row modes, and inputs they refuse (other dtypes, a
        # strided view) through the references
        for m, sd, lg in ((mean[0], std[0], logits[0]), (mean[0].astype(np.float32), std[0], logits[0].astype(np.float16)),
                          (np.repeat(mean[0], 2)[::2], std[0], logits[0])):
            for act in ("sigmoid", "softmax", "linear"):
                got = score_row(m, sd, lg, float(ee[0]), act)
                want = row_scores(compute_scores_numpy(m, sd, lg, float(ee[0]), act))
                assert list(got) == list(want) and all(type(v) is float for v in got.values())
                assert_close(list(got.values()), list(want.values()), framekernels.SCORE_RTOL, what=act)
            for z, thr, mixed in ((0.5, 0.5, "ignore"), (0.8, 0.5, "keep")):
                got, (want, wlo, whi) = decide(m, sd, z, thr, mixed), decide_numpy(m[None].astype(np.float64), sd[None], z, thr, mixed)
                assert (got.keep, got.rule, got.label) == (bool(want.keep[0]), RULE_NAMES[want.code[0]],
                                                            int(want.labels[0]) if want.keep[0] else None)
                assert got.classes == tuple(want.indicators[0].nonzero()[0].tolist())
                assert got.states.dtype == np.int8 and np.array_equal(got.states, want.states[0])
                assert np.array_equal(got.lower, wlo[0], equal_nan=True) and np.array_equal(got.upper, whi[0], equal_nan=True)


def mahalanobis_arrays(rng, f: int, c: int, case: str, rel: str):
    """Prepared Mahalanobis-family arrays as _prepare_mahalanobis makes them from a fitted detector's; rel: "" (the
    class distance only), "whitener0" (a global whitener, files before version 4) or "low_rank" (the background as a
    low-rank term on the class projection)."""
    w = np.tril(rng.normal(size=(f, f))) / np.sqrt(f)
    means = rng.normal(size=(c, f)) * 3
    if case == "ties":
        means[:] = means[0]  # every class at the same distance
    if c > 2:
        means[1] = np.nan  # a class absent from the fit data: never the nearest
    a = {"whitener": w, "means_w": means}
    if rel == "whitener0":
        a.update(whitener0=np.tril(rng.normal(size=(f, f))) / np.sqrt(f), mean0_w=rng.normal(size=(1, f)))
    if rel == "low_rank":
        a.update(between_w=rng.normal(size=(f, max(c - 1, 1))) * 0.5, mean0_w=rng.normal(size=(1, f)))
    return _prepare_mahalanobis(a)


@native
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("f", [1, 96])
def test_mahalanobis_kernel_matches_its_numpy_reference(case, n, c, f):
    rng = np.random.default_rng([n, c, f, CASES.index(case)])
    for rel in ("", "whitener0", "low_rank"):
        p = mahalanobis_arrays(rng, f, c, case, rel)
        x = (rng.normal(size=(n, f)) * (1e3 if case == "extreme" else 1.0)).astype(np.float32)
        if case == "nan":
            x[0, 0] = np.nan
        if case == "ties":
            x[:] = x[0]
        z = _project(p, x)
        got = framekernels.mahalanobis(z, p["center"], p["means2"], p["msq"], p.get("center0"), p.get("between"))
        want = _mahalanobis_numpy(p, z)
        zc = (z[:, 0::2] if rel == "whitener0" else z) - p["center"]
        scale = np.sum(zc.astype(np.float64) ** 2, axis=1) + np.max(p["msq"][np.isfinite(p["msq"])], initial=0.0)
        assert_close(got[0], want[0], framekernels.MAHALANOBIS_RTOL, scale, "mahalanobis")
        if rel == "whitener0":
            g = z[:, 1::2].astype(np.float64) - p["center0"]
            assert_close(got[1], want[1], framekernels.MAHALANOBIS_RTOL, scale + np.sum(g * g, axis=1), "rel")
        elif rel == "low_rank":  # |u|^2 inherits the rounding of each u_r, a sum of |zc_f k_fr| at most
            bound = np.abs(zc.astype(np.float64)) @ np.abs(p["between"][:-1]) + np.abs(p["between"][-1])
            assert_close(got[1], want[1], framekernels.MAHALANOBIS_RTOL, scale + np.sum(bound ** 2, axis=1), "low-rank rel")
        else:
            assert got[1] is None and want[1] is None
        for i in range(n):  # the one-row mode: the batched kernel's numbers, as floats
            one = framekernels.mahalanobis_row(z[i:i + 1], p["center"], p["means2"], p["msq"], p.get("center0"),
                                               p.get("between"))
            assert np.array_equal(one[0], got[0][i], equal_nan=True)
            assert one[1] is None if not rel else np.array_equal(one[1], got[1][i], equal_nan=True)


@native
def test_the_mahalanobis_binding_refuses_a_bad_background():
    """The low-rank background must be [F + 1, R] and excludes a global whitener's center0: one ValueError, and the
    row mode (which falls back to numpy on refusal) returns None."""
    rng = np.random.default_rng(3)
    p = mahalanobis_arrays(rng, 8, 4, "random", "low_rank")
    z = rng.normal(size=(2, 8)).astype(np.float32)
    for center0, between in ((p["center"], p["between"]), (None, p["between"][:-1].copy()),
                             (None, np.zeros(0, np.float32))):
        with pytest.raises(ValueError):
            framekernels.mahalanobis(z, p["center"], p["means2"], p["msq"], center0, between)
        assert framekernels.mahalanobis_row(z[:1], p["center"], p["means2"], p["msq"], center0, between) is None


FRAMES = """
import json, sys
from pathlib import Path
import numpy as np
if sys.argv[1] == "without":
    sys.modules["edge_quq._headkernel"] = None  # what an install without a C compiler has: no extension
from edge_quq import framekernels
from edge_quq.predictor import Predictor
assert framekernels.available() == (sys.argv[1] == "with")
p = Predictor.from_bundle(sampler="numpy", seed=0)
images = sorted(str(f) for f in (Path(p.bundle.path).parent / "samples").glob("*.png"))
rng = np.random.default_rng(0)
images += [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(20)]
out = []
for r in p.predict_many(images):
    d = r.to_dict()
    d.pop("timings_ms"), d.pop("rss_mb")
    d["scores"], d["ood_p"] = r.scores, r.ood_p
    out.append(d)
print(json.dumps(out))
"""


def frames(which: str) -> list:
    res = subprocess.run([sys.executable, "-c", FRAMES, which], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@native
def test_without_the_extension_the_predictor_gives_the_same_results():
    """The default bundle's frames through the references only (the extension unimportable, as on an install
    without a C compiler) against the same frames through the kernels: the same decisions, and scores within
    the kernels' tolerances."""
    got, want = frames("with"), frames("without")
    assert len(got) == len(want) == 32
    assert {d["decision"] for d in want} == {"keep", "ignore"}
    for g, w in zip(got, want):
        gs, ws = g.pop("scores"), w.pop("scores")
        assert g == w
        assert list(gs) == list(ws)
        for k in ws:
            rtol = (framekernels.MAHALANOBIS_RTOL if "mahalanobis" in k else framekernels.DOT_RTOL if k in ("knn", "vim")
                    else framekernels.SCORE_RTOL)  # knn, vim: float32 dot products (tests/test_knn_vim_kernels.py)
            # the kernel's tolerance is relative to the distances' scale (framekernels' docstring); the
            # relative score is a difference of two distances, so its scale is at least the class distance
            scale = max(1.0, abs(ws[k]), abs(ws.get("mahalanobis", 0.0)) if k == "rel_mahalanobis" else 0.0)
            assert abs(gs[k] - ws[k]) <= rtol * scale, k
