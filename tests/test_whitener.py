"""The Mahalanobis family's int8 whiteners (edge_quq.detectors.INT8_WHITENER_MIN_FEATURES and up):

- the native product (edge_quq/csrc/whitener.c, every variant this CPU runs: framekernels.q8_isas()) against its
  numpy reference detectors._project_q8_numpy, within framekernels.Q8_RTOL of sum_i |x_i W_ik| per coordinate
  (the NEON variant under qemu: tests/test_whitener_aarch64.py);
- the int8 detectors against the float32 ones on real features (ReLU random projections of Fashion-MNIST, F = 576):
  distances within INT8_DISTANCE_RTOL, AUROC against far-OOD sets within AUROC_TOL (mahalanobis 1e-3);
- storage: int8 whiteners survive the file and load checks, float files stay version 1 and score as before.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_quq import framekernels
from edge_quq.detector_store import check_arrays
from edge_quq.detectors import (INT8_WHITENER_MIN_FEATURES, DetectorSet, _int8_mahalanobis, _interleave,
                                _mahalanobis_family, _prepare_mahalanobis, _project_q8_numpy, dequantize_whitener,
                                fit_detectors, quantize_whitener)
from edge_quq.errors import BundleError
from edge_quq.head import HeadWeights

native = pytest.mark.skipif(not framekernels.q8_available(), reason="the C extension edge_quq._headkernel is not built")
# int8 against float32 distances (mahalanobis) on the real features below: median and largest relative error,
# measured 6e-4 and 6e-3 at F = 576
INT8_DISTANCE_RTOL = (2e-3, 2e-2)
# AUROC of int8 against float32. rel_mahalanobis is a difference of two distances of ~F each with an ID spread of ~1%
# of them; with its own int8 global whitener each side rounded apart and its scores moved by about one ID spread
# (AUROC 0.986 -> 0.997 inverted, 0.962 -> 0.967 noise). Its background is now a low-rank term on the same class
# projection (detectors._background), so the rounding mostly cancels: median shift 0.012 of the ID spread, AUROC
# 0.9851 -> 0.9857 and 0.9612 -> 0.9607, measured here.
AUROC_TOL = {"mahalanobis": 1e-3, "rel_mahalanobis": 2e-3}


def q8_case(f: int, s: int, seed: int, triangular: bool = True, zeros: float = 0.3, n: int = 3):
    """(x [n, f], q [f, s*f], scale [f, s], diag [s*f]) of an interleaved int8 pair like the fit's (or a full one)."""
    rng = np.random.default_rng([seed, f, s])
    parts = []
    for _ in range(s):
        w = rng.normal(size=(f, f)) * rng.uniform(0.1, 10, size=(f, 1))
        parts.append(quantize_whitener(np.tril(w) if triangular else w))
    q, scale, diag = (_interleave([p[i] for p in parts]) for i in range(3))
    x = rng.normal(size=(n, f)) * 3
    x[rng.random(x.shape) < zeros] = 0.0
    return x.astype(np.float32), q, scale.reshape(f, s), diag.reshape(-1)


def assert_q8_close(z: np.ndarray, x, q, scale, diag) -> None:
    ref = _project_q8_numpy(x, q, scale, diag)
    bound = np.abs(x).astype(np.float64) @ np.abs(_project_q8_numpy(np.eye(x.shape[1], dtype=np.float32), q, scale, diag))
    assert z.shape == ref.shape and z.dtype == np.float32
    np.testing.assert_array_less(np.abs(z - ref), framekernels.Q8_RTOL * bound + 1e-30)


@native
@pytest.mark.parametrize("f,s,triangular,n", [(1, 1, True, 1), (3, 2, True, 2), (16, 1, True, 5), (17, 2, True, 3),
                                              (33, 2, False, 4), (100, 1, False, 1), (576, 2, True, 3),
                                              (1280, 2, True, 1)])
def test_every_variant_matches_the_reference(f, s, triangular, n):
    x, q, scale, diag = q8_case(f, s, 0, triangular, n=n)
    m = framekernels.pack_q8(q, scale, diag)
    assert m.off[0] == 0 and m.off[-1] == m.q.size and (np.diff(m.off) % 16 == 0).all()
    assert framekernels.q8_isas()[-1] == "scalar"
    for isa in framekernels.q8_isas():
        assert_q8_close(framekernels.project_q8(x, m, isa), x, q, scale, diag)
    # all-zero rows (every row skipped: the diagonal term alone) and no rows at all
    zero = np.zeros((2, f), np.float32)
    assert (framekernels.project_q8(zero, m) == 0).all()
    assert framekernels.project_q8(zero[:0], m).shape == (0, s * f)


@native
def test_the_binding_refuses_bad_layouts():
    x, q, scale, diag = q8_case(20, 2, 1)
    m = framekernels.pack_q8(q, scale, diag)
    with pytest.raises(ValueError, match="isa"):
        framekernels.project_q8(x, m, "avx9")
    bad = m._replace(off=m.off.copy())
    bad.off[3] += 1
    with pytest.raises(ValueError, match="off"):
        framekernels.project_q8(x, bad)
    with pytest.raises(ValueError):
        framekernels.project_q8(x[:, :5], m)


def test_quantize_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(2)
    w = np.tril(rng.normal(size=(40, 40))) + np.diag(rng.uniform(5, 9, 40))
    w[7] = 0.0  # a zero row keeps a finite scale
    q, scale, diag = quantize_whitener(w)
    assert q.dtype == np.int8 and (np.diag(q) == 0).all() and (scale > 0).all() and np.isfinite(scale).all()
    err = np.abs(dequantize_whitener(q, scale, diag) - w)
    assert (err <= scale[:, None] * 0.5 + 1e-6 * np.abs(w)).all()
    assert np.allclose(np.diag(dequantize_whitener(q, scale, diag)), np.diag(w).astype(np.float32))


class _Head:
    num_classes = 10


@pytest.fixture(scope="module")
def fashion_features(fashion_mnist):
    """ReLU random-projection features (F = 576) of Fashion-MNIST: fit rows, ID test rows, two far-OOD sets."""
    x, y, xt, _ = fashion_mnist
    x = x.reshape(len(x), -1)[:8000].astype(np.float64) / 255
    xt = xt.reshape(len(xt), -1)[:2000].astype(np.float64) / 255
    rng = np.random.default_rng(0)
    f = INT8_WHITENER_MIN_FEATURES + 64
    proj = rng.normal(size=(784, f)) / np.sqrt(784)
    feat = lambda v: np.maximum(v @ proj - 0.1, 0.0)  # noqa: E731
    head = HeadWeights(kernels=((rng.normal(size=(f, 32)) * 0.05).astype(np.float32),
                                (rng.normal(size=(32, 10)) * 0.1).astype(np.float32)),
                       biases=(np.zeros(32, np.float32), np.zeros(10, np.float32)), rates=(0.2, 0.2), activation="softmax")
    ood = {"inverted": feat(1.0 - xt), "noise": feat(rng.random((2000, 784)))}
    return feat(x), y[:8000], feat(xt), ood, head


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))], np.r_[id_scores, ood_scores]))


def test_int8_detectors_agree_with_float_on_real_features(fashion_features):
    feats, labels, test, ood, head = fashion_features
    names = ["mahalanobis", "rel_mahalanobis"]
    q8 = fit_detectors(feats, labels, head, names)
    f32 = fit_detectors(feats, labels, head, names, dtypes=("float32",))
    assert [d.dtype for d in q8.detectors.values()] == ["int8", "int8"]
    rel_arrays = q8.detectors["rel_mahalanobis"].arrays
    assert rel_arrays["whitener"].dtype == np.int8 and "between_w" in rel_arrays and q8._mahalanobis_shared()
    assert [d.dtype for d in f32.detectors.values()] == ["float32", "float32"]
    a, b = q8.score_all(test, head), f32.score_all(test, head)
    rel = np.abs(a["mahalanobis"] - b["mahalanobis"]) / b["mahalanobis"]
    assert np.median(rel) <= INT8_DISTANCE_RTOL[0] and rel.max() <= INT8_DISTANCE_RTOL[1], (np.median(rel), rel.max())
    for kind, o in ood.items():
        ao, bo = q8.score_all(o, head), f32.score_all(o, head)
        for n in names:
            got, want = auroc(a[n], ao[n]), auroc(b[n], bo[n])
            assert abs(got - want) <= AUROC_TOL[n], (kind, n, got, want)
    # without the native product (or with), the int8 arrays score like their dequantised float32 whiteners
    arrs = q8.detectors["rel_mahalanobis"].arrays
    deq = {k: v for k, v in arrs.items() if not k.endswith(("_scale", "_diag"))}
    deq["whitener"] = dequantize_whitener(arrs["whitener"], arrs["whitener_scale"], arrs["whitener_diag"]).astype(np.float32)
    d8, r8 = _mahalanobis_family(arrs, test)
    df, rf = _mahalanobis_family(deq, test)
    scale = np.abs(d8) + 1.0
    assert np.max(np.abs(d8 - df) / scale) < 1e-4 and np.max(np.abs(r8 - rf) / scale) < 1e-4


def test_int8_whiteners_are_stored_and_checked(fashion_features):
    feats, labels, test, _, head = fashion_features
    ds = fit_detectors(feats[:3000], labels[:3000], head, ["mahalanobis", "rel_mahalanobis"])
    # 4: rel_mahalanobis' background is the low-rank term on the int8 class whitener, kept float32
    assert ds.file_version() == 4 and ds.detectors["mahalanobis"].nbytes() < feats.shape[1] ** 2 * 2
    stored = ds.to_arrays()
    assert stored["rel_mahalanobis/whitener"].dtype == np.int8 and "rel_mahalanobis/whitener.scale" not in stored
    assert stored["rel_mahalanobis/between_w"].dtype == np.float32 and stored["rel_mahalanobis/between_w"].shape[1] < 10
    back = DetectorSet.from_arrays(stored, "t")
    f = feats.shape[1]
    check_arrays(back, f, 10, "t")
    a, b = ds.score_all(test[:50], head), back.score_all(test[:50], head)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    for key, value, match in (("rel_mahalanobis/whitener_scale", None, "missing"),
                              ("rel_mahalanobis/between_w", np.zeros((f - 1, 3), np.float32), "between_w"),
                              ("mahalanobis/whitener_scale", np.zeros(f, np.float32), "<= 0"),
                              ("mahalanobis/whitener_diag", np.full(f, np.nan, np.float32), "non-finite")):
        bad = dict(stored)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        with pytest.raises(BundleError, match=match):
            check_arrays(DetectorSet.from_arrays(bad, "t"), f, 10, "t")


def test_small_whiteners_stay_float32_and_version_1(fashion_features):
    feats, labels, test, _, head = fashion_features
    small = feats[:, :96]
    h = HeadWeights(kernels=(head.kernels[0][:96], head.kernels[1]), biases=head.biases, rates=head.rates,
                    activation=head.activation)
    ds = fit_detectors(small[:2000], labels[:2000], h, ["mahalanobis", "rel_mahalanobis"])
    assert all(d.dtype != "int8" for d in ds.detectors.values()) and ds.file_version() == 4  # the low-rank background
    assert fit_detectors(small[:2000], labels[:2000], h, ["mahalanobis"]).file_version() == 1
    assert all(v.dtype != np.int8 for d in ds.detectors.values() for v in d.arrays.values())
    assert DetectorSet.from_arrays(ds.to_arrays(), "t").meta["version"] == 4
    # the int8 form at a small size is still exact Mahalanobis math under the dequantised whiteners
    arrs = _int8_mahalanobis(ds.detectors["rel_mahalanobis"].arrays, small[:2000], labels[:2000], 10)
    assert "q8" in _prepare_mahalanobis(arrs) or not framekernels.q8_available()


def test_the_default_bundle_is_untouched():
    from edge_quq.bundle import load_bundle
    from edge_quq.detector_store import load_detectors

    b = load_bundle(None)
    ds = load_detectors(b)
    # F = 96 is below INT8_WHITENER_MIN_FEATURES: no int8 whitener; version 3 only for its int8 ViM null space
    assert all(v.dtype != np.int8 for n in ("mahalanobis", "rel_mahalanobis") for v in ds.detectors[n].arrays.values())
    want = 3 if ds.detectors["vim"].arrays["null_space"].dtype == np.int8 else 1
    assert b.manifest["detectors"]["version"] == ds.meta["version"] == ds.file_version() == want


def test_every_detector_fits_at_int8_whitener_sizes(fashion_features):
    """fit_detectors with all eight at F >= INT8_WHITENER_MIN_FEATURES (bench_e2e attaches them so): only the
    Mahalanobis pair may take int8 whiteners; ViM, prepared once per detector like them, has none to quantise."""
    feats, labels, test, _, head = fashion_features
    ds = fit_detectors(feats[:2000], labels[:2000], head)
    assert ds.detectors["mahalanobis"].dtype == ds.detectors["rel_mahalanobis"].dtype == "int8"
    vim = ds.detectors["vim"].arrays  # int8 or not, never as a whitener: its null space with a scale per column
    assert not {"whitener", "whitener0"} & set(vim)
    assert ds.detectors["vim"].dtype != "int8" or vim["null_space.scale"].shape == (vim["null_space"].shape[1],)
    scores = ds.score_all(test[:50], head)
    assert all(np.isfinite(v).all() and v.shape == (50,) for v in scores.values())


def test_version_2_files_with_a_global_whitener_still_score(fashion_features):
    """Files fitted before the low-rank background (version 2 and 3) hold rel_mahalanobis' global whitener
    "whitener0", int8 beside the class one: they load, pass the checks, pack both into one interleaved product,
    and score as the float64 formula under the dequantised whiteners."""
    feats, labels, test, _, head = fashion_features
    ds = fit_detectors(feats[:3000], labels[:3000], head, ["rel_mahalanobis"])
    arrs = dict(ds.detectors["rel_mahalanobis"].arrays)
    del arrs["between_w"]
    from edge_quq.detectors import _whitener
    q, scale, diag = quantize_whitener(_whitener(np.cov(feats[:3000], rowvar=False, bias=True), 1e-6))
    w0 = dequantize_whitener(q, scale, diag)
    arrs.update(whitener0=q, whitener0_scale=scale, whitener0_diag=diag, mean0_w=feats[:3000].mean(0, keepdims=True) @ w0)
    ds.detectors["rel_mahalanobis"].arrays = arrs
    assert ds.file_version() == 2
    back = DetectorSet.from_arrays(ds.to_arrays(), "t")
    check_arrays(back, feats.shape[1], 10, "t")
    p = _prepare_mahalanobis(back.detectors["rel_mahalanobis"].arrays)
    assert "center0" in p and "between" not in p and ("q8" not in p or p["q8"].q.size > feats.shape[1] ** 2 // 2)
    x = test[:40].astype(np.float64)
    w = dequantize_whitener(arrs["whitener"], arrs["whitener_scale"], arrs["whitener_diag"])
    diff = (x @ w)[:, None, :] - arrs["means_w"][None].astype(np.float64)
    d = np.nanmin(np.where(np.isnan(diff).any(-1), np.inf, np.einsum("ncf,ncf->nc", diff, diff)), axis=1)
    g = x @ w0 - arrs["mean0_w"].astype(np.float64)
    want = d - np.einsum("nf,nf->n", g, g)
    got = back.detectors["rel_mahalanobis"].score(test[:40], head)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(d).max())
