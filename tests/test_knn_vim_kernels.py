"""The kNN and ViM detectors' native kernels (edge_quq/csrc/rowdot.c: framekernels.knn_kth, vim_resid) against their
numpy references (detectors._knn_kth_numpy, _vim_resid_numpy), every variant of dots_isas() on this CPU (NEON under
qemu: tests/test_knn_vim_aarch64.py), int8 and float32 banks and null spaces, and the detectors scored through them
against the references: the same scores within the documented tolerance and the same decisions on real Fashion-MNIST
test images; an int8 null space through fit, storage and load. A float16 bank or null space (read as float16, widened
on load: framekernels.dots_f16_isas) gives bit-identical results to its float32 widening, every variant, and a
float16-stored kNN and ViM are held float16 when the best variant reads it, with the same scores as held float32.

Tolerance (framekernels' docstring): each float32 dot product agrees to DOT_RTOL of sum_j |x_j W_j|; the k-th
largest similarity and the residual norm inherit it (kth_tolerance, resid_tolerance below).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from edge_quq import framekernels
from edge_quq.detectors import (_dequantized_bank, _encode, _knn_kth_numpy, _vim_null_space, _vim_resid_numpy,
                                l2_normalise)

pytestmark = pytest.mark.skipif(not framekernels.dots_available(), reason="edge_quq._headkernel not built")
ISAS = framekernels.dots_isas() if framekernels.dots_available() else ()
F16_ISAS = framekernels.dots_f16_isas()
FASHION = Path("/usr/share/datasets/fashion-mnist")

# (N rows, F features, B bank rows, k): F not a multiple of 8 (the vector width) or 16, B not a multiple of the
# 4-row groups or of the 64-row chunks, k = 1 and k = B, more rows than one 32-row block, the shapes of the bundles
KNN_CASES = [(1, 1, 1, 1), (2, 7, 3, 3), (3, 13, 5, 1), (1, 96, 1024, 10), (5, 33, 67, 67), (40, 17, 130, 7),
             (2, 1280, 257, 10), (1, 2048, 64, 64)]
# (N, F, D): D = 1, D = F - 1, D not a multiple of 4 or of 64, F not a multiple of 8
VIM_CASES = [(1, 2, 1), (3, 9, 8), (2, 96, 48), (33, 25, 13), (1, 1283, 641), (2, 2048, 70)]


def relu_rows(rng: np.random.Generator, n: int, f: int) -> np.ndarray:
    """float32 rows like a backbone's: ReLU-sparse, the first one all zero (l2_normalise's floor)."""
    x = np.maximum(rng.normal(0.3, 1.0, (n, f)), 0.0).astype(np.float32)
    x[0] = 0.0
    return x


def knn_bank(rng: np.random.Generator, b: int, f: int, int8: bool) -> Tuple[np.ndarray, float]:
    """(bank, scale): unit rows of ReLU features, a duplicated row among them (tied similarities), stored int8 with
    one scale as files before version 4 hold it (the kernel's one-scale mode, which the aarch64 driver runs), or
    float32 (scale 1)."""
    bank = l2_normalise(np.abs(rng.normal(size=(b, f))) + rng.normal(size=(b, f)))
    bank[-1] = bank[0]
    if not int8:
        return bank.astype(np.float32), 1.0
    scale = float(np.max(np.abs(bank))) / 127.0
    return np.round(bank / scale).astype(np.int8), scale


def kth_tolerance(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """DOT_RTOL of max_b sum_j |xhat_j bank_bj| per row: the bound of every similarity, so of the k-th largest."""
    xh = np.abs(l2_normalise(x))
    return framekernels.DOT_RTOL * (xh @ np.abs(bank.astype(np.float64)).T).max(axis=1) + 1e-30


def resid_tolerance(x: np.ndarray, origin: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """DOT_RTOL of | |x - origin| @ |ns| |: the norm of the residual coordinates' bounds."""
    b = np.abs(x.astype(np.float64) - origin) @ np.abs(ns.astype(np.float64))
    return framekernels.DOT_RTOL * np.linalg.norm(b, axis=1) + 1e-30


def knn_case(i: int, n: int, f: int, b: int, int8: bool):
    rng = np.random.default_rng([i, int(int8)])
    x = relu_rows(rng, n, f)
    bank, scale = knn_bank(rng, b, f, int8)
    return x, bank, scale


def vim_case(i: int, n: int, f: int, d: int, int8: bool = False):
    """(rows, origin float32 [F], null space, its scales or None): an orthonormal float32 null space [F, D] (ViM's:
    eigenvectors), or, int8, that with its first column on one feature's axis (a feature the fit data never varied:
    the per-column scales' reason) stored as detectors._encode does, int8 [F, D] with float32 scales [D]; row 1 on the
    origin."""
    rng = np.random.default_rng([i, 7])
    x = relu_rows(rng, n, f)
    origin = rng.normal(0.0, 0.5, f).astype(np.float32)
    if n > 1:
        x[1] = origin
    ns = np.linalg.qr(rng.normal(size=(f, f)))[0][:, :d].astype(np.float32)
    if not int8:
        return x, origin, ns, None
    ns[:, 0] = 0.0
    ns[f // 2, 0] = 1.0
    enc = _encode("null_space", ns, "int8")
    return x, origin, enc["null_space"], enc["null_space.scale"]


def vim_arrays(origin: np.ndarray, ns: np.ndarray, scale) -> dict:
    """A ViM detector's arrays for _vim_resid_numpy (origin as a float64 row, its prepared form)."""
    a = {"origin": origin.astype(np.float64)[None], "null_space": ns}
    return a if scale is None else {**a, "null_space.scale": scale}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("case", range(len(KNN_CASES)))
def test_knn_kth_matches_the_numpy_reference(isa, int8, case):
    n, f, b, k = KNN_CASES[case]
    x, bank, scale = knn_case(case, n, f, b, int8)
    ref_bank = _dequantized_bank({"bank": bank, "bank.scale": np.array([scale])})
    want = _knn_kth_numpy(x, ref_bank, k)
    got = framekernels.knn_kth(x, bank, scale, k, isa)
    assert got.dtype == np.float32 and got.shape == (n,)
    tol = kth_tolerance(x, ref_bank)
    assert np.all(np.abs(got.astype(np.float64) - want) <= tol), (np.abs(got - want) / tol).max()
    assert got[0] == want[0] == 0.0  # the zero row: every similarity is 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", range(len(KNN_CASES)))
def test_a_bank_scaled_per_row_matches_the_numpy_reference(isa, case):
    """An int8 bank as detectors._encode stores it (version 4): one float32 scale per row, applied after each row's
    sum, within the same tolerance of the dequantised bank's similarities."""
    n, f, b, k = KNN_CASES[case]
    rng = np.random.default_rng([case, 2])
    x = relu_rows(rng, n, f)
    enc = _encode("bank", l2_normalise(np.abs(rng.normal(size=(b, f))) + rng.normal(size=(b, f))), "int8")
    bank, scale = enc["bank"], enc["bank.scale"]
    assert bank.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (b,)
    ref_bank = _dequantized_bank({"bank": bank, "bank.scale": scale})
    got, want = framekernels.knn_kth(x, bank, scale, k, isa), _knn_kth_numpy(x, ref_bank, k)
    assert np.all(np.abs(got.astype(np.float64) - want) <= kth_tolerance(x, ref_bank))
    best = framekernels.knn_kth(x, bank, scale, k)  # the row mode runs the best variant
    assert [framekernels.knn_kth_row(x[i:i + 1], bank, scale, k) for i in range(min(n, 3))] == best[:3].tolist()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("case", range(len(VIM_CASES)))
def test_vim_resid_matches_the_numpy_reference(isa, int8, case):
    n, f, d = VIM_CASES[case]
    x, origin, ns, scale = vim_case(case, n, f, d, int8)
    a = vim_arrays(origin, ns, scale)
    want = _vim_resid_numpy(a, x)
    got = framekernels.vim_resid(x, origin, np.ascontiguousarray(ns.T), scale, isa)
    assert got.dtype == np.float64 and got.shape == (n,)
    assert np.all(np.abs(got - want) <= resid_tolerance(x, origin, _vim_null_space(a)))
    if n > 1:
        assert got[1] == 0.0  # a row on the origin: x - origin is exactly zero in float32 too


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint64 if a.dtype == np.float64 else np.uint32)


def _f16_rows(a: np.ndarray) -> np.ndarray:
    """a as float16 with a subnormal, a signed zero and a value with the last mantissa bit set in it (the exact
    widening's edge cases)."""
    h = a.astype(np.float16)
    flat = h.reshape(-1)
    for i, v in enumerate((np.float16(6e-8), np.float16(-0.0), np.float16(1e-5), np.float16(-1.0009765625))):
        flat[(7 * i) % flat.size] = v
    return h


@pytest.mark.parametrize("isa", F16_ISAS)
@pytest.mark.parametrize("case", range(len(KNN_CASES)))
def test_a_float16_bank_gives_its_float32_widenings_results_to_the_bit(isa, case):
    n, f, b, k = KNN_CASES[case]
    x, bank, _ = knn_case(case, n, f, b, False)
    h = _f16_rows(bank)
    wide = h.astype(np.float32)
    got = framekernels.knn_kth(x, h, 1.0, k, isa)
    assert np.array_equal(_bits(got), _bits(framekernels.knn_kth(x, wide, 1.0, k, isa)))
    want = _knn_kth_numpy(x, wide, k)
    assert np.all(np.abs(got.astype(np.float64) - want) <= kth_tolerance(x, wide))
    if isa == F16_ISAS[0]:  # the one-row mode runs the best variant
        rows = [framekernels.knn_kth_row(x[i:i + 1], h, 1.0, k) for i in range(n)]
        assert np.array_equal(_bits(np.array(rows, np.float32)), _bits(got))


@pytest.mark.parametrize("isa", F16_ISAS)
@pytest.mark.parametrize("case", range(len(VIM_CASES)))
def test_a_float16_null_space_gives_its_float32_widenings_results_to_the_bit(isa, case):
    n, f, d = VIM_CASES[case]
    x, origin, ns, _ = vim_case(case, n, f, d)
    h_t = np.ascontiguousarray(_f16_rows(ns).T)
    wide = h_t.astype(np.float32)
    got = framekernels.vim_resid(x, origin, h_t, None, isa)
    assert np.array_equal(_bits(got), _bits(framekernels.vim_resid(x, origin, wide, None, isa)))
    a = vim_arrays(origin, np.ascontiguousarray(wide.T), None)
    assert np.all(np.abs(got - _vim_resid_numpy(a, x)) <= resid_tolerance(x, origin, _vim_null_space(a)))
    if isa == F16_ISAS[0]:
        rows = [framekernels.vim_resid_row(x[i:i + 1], origin, h_t) for i in range(n)]
        assert np.array_equal(_bits(np.array(rows)), _bits(got))


def test_a_float16_w_is_refused_with_a_scale_or_in_another_shape():
    x, origin, ns, _ = vim_case(1, 2, 16, 4)
    h_t = np.ascontiguousarray(ns.T.astype(np.float16))
    assert framekernels.vim_resid_row(x[:1], origin, h_t, np.ones(4, np.float32)) is None
    assert framekernels.vim_resid_row(x[:1], origin, np.ascontiguousarray(h_t[:, :5])) is None
    with pytest.raises(ValueError):
        framekernels.knn_kth(x, h_t[:, :5], 1.0, 1)


def test_the_float16_variants_are_the_dot_variants_with_f16c_on_x86():
    import platform

    assert set(F16_ISAS) <= set(ISAS) and F16_ISAS[-1:] == ("scalar",)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx2_fma" in ISAS and platform.machine() in ("x86_64", "AMD64"):
        assert ("avx2_fma" in F16_ISAS) == (" f16c" in flags)
    assert framekernels.dots_f16() == (F16_ISAS[:1] == ISAS[:1])


def test_an_int8_null_space_is_scaled_per_column():
    _, _, q, scale = vim_case(0, 1, 96, 48, True)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (48,)
    assert np.all(np.abs(q).max(axis=0) == 127) and scale[0] == np.float32(1.0 / 127)  # the axis column: exact
    assert scale[1:].max() < 0.5 / 127  # the spread columns keep their own finer steps


def test_the_variants_are_project_q8s_and_scalar_is_last():
    assert ISAS == framekernels.q8_isas() and ISAS[-1] == "scalar"


def test_one_row_modes_give_the_batch_results():
    x, bank, scale = knn_case(0, 3, 1280, 100, True)
    batch = framekernels.knn_kth(x, bank, scale, 10)
    assert [framekernels.knn_kth_row(x[i:i + 1], bank, scale, 10) for i in range(3)] == batch.tolist()
    for int8 in (False, True):
        x, origin, ns, scale = vim_case(0, 3, 96, 48, int8)
        ns_t = np.ascontiguousarray(ns.T)
        batch = framekernels.vim_resid(x, origin, ns_t, scale)
        assert [framekernels.vim_resid_row(x[i:i + 1], origin, ns_t, scale) for i in range(3)] == batch.tolist()


def test_the_kernels_refuse_what_they_cannot_take():
    x, bank, scale = knn_case(1, 2, 16, 8, True)
    assert framekernels.knn_kth_row(x[:1].astype(np.float64), bank, scale, 3) is None
    assert framekernels.knn_kth_row(x, bank, scale, 3) is None  # two rows need an output array
    for k in (0, 9):
        with pytest.raises(ValueError):
            framekernels.knn_kth(x, bank, scale, k)
    with pytest.raises(ValueError):
        framekernels.knn_kth(x, bank[:, :5], scale, 3)
    with pytest.raises(ValueError):
        framekernels.knn_kth(x, bank.astype(np.int16), scale, 3)
    with pytest.raises(ValueError):
        framekernels.knn_kth(x, bank, scale, 3, "no_such_isa")
    rows = np.full(len(bank), scale, np.float32)
    for b, s in ((bank, rows[:-1]), (bank, rows.astype(np.float64)), (bank.astype(np.float32) * scale, rows)):
        with pytest.raises(ValueError):  # a scale per row: float32, one per row, with an int8 bank only
            framekernels.knn_kth(x, b, s, 3)
    assert framekernels.knn_kth(x, bank, np.float32(scale), 3).tolist() == framekernels.knn_kth(x, bank, scale, 3).tolist()
    x, origin, ns, _ = vim_case(1, 2, 16, 4)
    with pytest.raises(ValueError):
        framekernels.vim_resid(x, origin, np.ascontiguousarray(ns))  # [F, D] untransposed: F does not match
    assert framekernels.vim_resid_row(x[:1], origin.astype(np.float64), np.ascontiguousarray(ns.T)) is None
    _, _, q, scale = vim_case(1, 2, 16, 4, True)
    q_t = np.ascontiguousarray(q.T)
    for bad in ((q_t, None), (q_t, scale[:3]), (q_t, scale.astype(np.float64)), (np.ascontiguousarray(ns.T), scale),
                (q_t.astype(np.int16), scale)):
        assert framekernels.vim_resid_row(x[:1], origin, *bad) is None  # scales with an int8 null space, only there
    assert framekernels.knn_kth(x[:0], bank, scale, 3).shape == (0,)


# -- the detectors through the kernels -------------------------------------------------------------------------------
def _fashion_test_images(n: int) -> List[np.ndarray]:
    path = FASHION / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")
    with gzip.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return list(raw[np.random.default_rng(0).choice(len(raw), n, replace=False)])


@pytest.fixture(scope="module")
def predictions():
    """The default bundle's predictions of 300 Fashion-MNIST test images with and without the kNN/ViM kernels."""
    from edge_quq.predictor import Predictor

    images = _fashion_test_images(300)
    out = {}
    for native in (True, False):
        mp = pytest.MonkeyPatch()
        mp.setattr(framekernels, "_DOTS_AVAILABLE", native)
        try:
            p = Predictor.from_bundle(sampler="numpy", seed=0)
            assert {"knn", "vim"} <= set(p.detector_names)
            out[native] = [p.predict(im) for im in images]
        finally:
            mp.undo()
    return out


def test_the_default_bundles_decisions_do_not_move(predictions):
    got, want = predictions[True], predictions[False]
    moved = [i for i, (g, w) in enumerate(zip(got, want))
             if (g.keep, g.rule, g.label, g.flagged, g.ignored_by) != (w.keep, w.rule, w.label, w.flagged, w.ignored_by)]
    assert not moved
    gd, wd = [r.to_dict() for r in got], [r.to_dict() for r in want]
    for d in gd + wd:
        for k in ("timings_ms", "rss_mb", "scores", "ood_p"):  # the gate's p-values are rank-based: compared
            d.pop(k, None)
    assert gd == wd
    assert {r.keep for r in want} == {True, False} and any(r.flagged for r in want)


def test_the_default_bundles_scores_agree_within_the_tolerance(predictions):
    for g, w in zip(predictions[True], predictions[False]):
        assert set(g.scores) == set(w.scores)
        for k in ("knn", "vim"):
            # knn = sqrt(2 - 2 kth): its square moves by 2x the k-th similarity's (<= DOT_RTOL for unit rows);
            # vim = alpha * resid + energy, resid <= |x - origin| with its own tolerance relative to that
            a, b = (g.scores[k] ** 2, w.scores[k] ** 2) if k == "knn" else (g.scores[k], w.scores[k])
            assert abs(a - b) <= 2 * framekernels.DOT_RTOL * max(1.0, abs(b)), (k, a, b)


def test_an_int8_bank_stays_int8_and_is_stored_as_it_was():
    from edge_quq.bundle import load_bundle
    from edge_quq.detector_store import load_detectors
    from edge_quq.head import read_npz

    bundle = load_bundle(None)
    ds = load_detectors(bundle)
    knn = ds.detectors["knn"]
    stored = read_npz(bundle.path / "detectors.npz", "detectors")
    assert knn.arrays["bank"].dtype == np.int8 and knn.arrays["bank.scale"].dtype == np.float64
    assert knn.memory_bytes() == stored["knn/bank"].size + 8
    again = ds.to_arrays()
    for k in ("knn/bank", "knn/bank.scale"):
        assert again[k].dtype == stored[k].dtype and np.array_equal(again[k], stored[k])
    # the lowest version that holds the file: 3 with an int8 ViM null space, 2 with int8 whiteners, else 1
    int8 = {k for k, v in stored.items() if v.dtype == np.int8}
    assert ds.file_version() == (3 if "vim/null_space" in int8 else 2 if any("whitener" in k for k in int8) else 1)


def test_without_the_kernels_an_int8_bank_is_dequantised_once(monkeypatch):
    from edge_quq.bundle import load_bundle
    from edge_quq.detector_store import load_detectors

    monkeypatch.setattr(framekernels, "_DOTS_AVAILABLE", False)
    knn = load_detectors(load_bundle(None)).detectors["knn"]
    a = knn._scoring_arrays()
    assert a["bank"].dtype == np.float32 and knn._scoring_arrays()["bank"] is a["bank"]
    assert np.array_equal(a["bank"], knn.arrays["bank"].astype(np.float32) * np.float32(knn.arrays["bank.scale"][0]))


def test_a_bank_in_any_layout_scores_alike():
    from edge_quq.detectors import _score_knn

    x, bank, scale = knn_case(2, 3, 24, 40, False)
    want = _score_knn({"bank": bank}, {"k": 5}, x, None)
    for b in (np.asfortranarray(bank), bank.astype(np.float64), bank.astype(np.float16).astype(np.float32)[::1]):
        assert np.allclose(_score_knn({"bank": b}, {"k": 5}, x, None), want, rtol=0, atol=1e-3)
    assert np.array_equal(_score_knn({"bank": np.asfortranarray(bank)}, {"k": 5}, x, None), want)


# -- an int8 null space through fit, storage and load ----------------------------------------------------------------
@pytest.fixture(scope="module")
def fashion_vim(fashion_mnist):
    """kNN and ViM fitted with the default storage choice, and ViM float32 only, on ReLU random-projection features of
    Fashion-MNIST (tests/test_whitener.py's, F = 576; 8000 rows, so that the 800 held out resolve the check's 0.2%):
    (fitted set, float32 ViM, 300 test rows, head)."""
    from edge_quq.detectors import fit_detectors
    from edge_quq.head import HeadWeights

    x, y, xt, _ = fashion_mnist
    rng = np.random.default_rng(0)
    f = 576
    proj = rng.normal(size=(784, f)) / np.sqrt(784)
    feat = lambda v: np.maximum(v.reshape(len(v), -1).astype(np.float64) / 255 @ proj - 0.1, 0.0)  # noqa: E731
    head = HeadWeights(kernels=((rng.normal(size=(f, 32)) * 0.05).astype(np.float32),
                                (rng.normal(size=(32, 10)) * 0.1).astype(np.float32)),
                       biases=(np.zeros(32, np.float32), np.zeros(10, np.float32)), rates=(0.2, 0.2), activation="softmax")
    feats = feat(x[:8000])
    ds = fit_detectors(feats, y[:8000], head, ["knn", "vim"])
    f32 = fit_detectors(feats, y[:8000], head, ["vim"], dtypes=("float32",))
    return ds, f32, feat(xt[:300]).astype(np.float32), head


def test_an_int8_null_space_is_stored_loaded_and_held_int8(fashion_vim):
    from edge_quq.detector_store import check_arrays
    from edge_quq.detectors import DetectorSet

    ds, _, test, head = fashion_vim
    # 4: the kNN bank beside it is int8 with a scale per row (3 would be the null space alone)
    assert ds.detectors["vim"].dtype == "int8" and ds.detectors["knn"].dtype == "int8" and ds.file_version() == 4
    stored = ds.to_arrays()
    assert stored["knn/bank.scale"].dtype == np.float32 and stored["knn/bank.scale"].shape == (len(stored["knn/bank"]),)
    f, d = stored["vim/null_space"].shape
    assert stored["vim/null_space"].dtype == np.int8 and stored["vim/null_space"].flags.c_contiguous
    assert stored["vim/null_space.scale"].dtype == np.float32 and stored["vim/null_space.scale"].shape == (d,)
    assert stored["vim/origin"].dtype == np.float32 and "vim/origin.scale" not in stored
    back = DetectorSet.from_arrays(stored, "t")
    check_arrays(back, f, 10, "t")
    assert back.meta["version"] == 4
    vim = back.detectors["vim"]
    assert vim.arrays["null_space"].dtype == np.int8 and vim.memory_bytes() == f * d + 4 * d + 4 * f + 8
    ns_t = vim._scoring_arrays()["ns_t"]
    assert ns_t.dtype == np.int8 and ns_t.shape == (d, f) and np.shares_memory(ns_t, vim.arrays["null_space"])
    a, b = ds.score_all(test, head), back.score_all(test, head)
    assert all(np.array_equal(a[n], b[n]) for n in a)  # the same stored values, the same kernel


def test_an_int8_null_space_scores_like_its_reference_and_the_float_fit(fashion_vim, monkeypatch):
    from edge_quq.detectors import DetectorSet, _score_vim

    ds, f32, test, head = fashion_vim
    stored = ds.to_arrays()
    native = DetectorSet.from_arrays(stored, "t").detectors["vim"]
    monkeypatch.setattr(framekernels, "_DOTS_AVAILABLE", False)
    numpy = DetectorSet.from_arrays(stored, "t").detectors["vim"]
    assert numpy._scoring_arrays()["null_space"].dtype == np.float64  # dequantised once, not per frame
    a = numpy.arrays
    tol = a["alpha"].item(0) * resid_tolerance(test, a["origin"], _vim_null_space(a))
    assert np.all(np.abs(native.score(test, head) - numpy.score(test, head)) <= tol)
    # Against the float32 fit: within the storage check's 10% of the score's spread on unseen rows too, and well
    # inside what rounding each entry on its own gives (quantize_null_space's reason).
    want = f32.detectors["vim"].score(test, head)
    spread = np.std(want)
    shift = np.max(np.abs(native.score(test, head) - want)) / spread
    fa = f32.detectors["vim"].arrays
    rounded = _score_vim({**fa, **_encode("null_space", fa["null_space"], "int8")}, {}, test, head)
    assert shift <= 0.1 and shift < np.max(np.abs(rounded - want)) / spread / 3


@pytest.mark.parametrize("scale, message", [(None, "is not 288 finite numbers"), (np.zeros(288, np.float32), "not > 0"),
                                            (np.ones(1, np.float32), "is not 288 finite numbers"),
                                            (np.full(288, np.inf, np.float32), "is not 288 finite numbers")])
def test_an_int8_null_space_without_its_scales_is_refused(fashion_vim, scale, message):
    from edge_quq.detectors import DetectorSet
    from edge_quq.errors import BundleError

    stored = dict(fashion_vim[0].to_arrays())
    del stored["vim/null_space.scale"]
    if scale is not None:
        stored["vim/null_space.scale"] = scale
    with pytest.raises(BundleError, match=message):
        DetectorSet.from_arrays(stored, "t")


# -- a float16-stored kNN bank and ViM null space, held float16 ------------------------------------------------------
@pytest.fixture(scope="module")
def fashion_f16(fashion_vim):
    """The stored arrays of kNN and ViM fitted float16 on fashion_vim's features, and its test rows and head."""
    from edge_quq.detectors import fit_detectors

    _, _, test, head = fashion_vim
    rng = np.random.default_rng(1)
    feats = np.maximum(rng.normal(0.2, 1.0, (1400, test.shape[1])), 0.0)
    labels = rng.integers(0, 10, 1400)
    ds = fit_detectors(feats, labels, head, ["knn", "vim"], dtypes=("float16",), tolerance=1.0)
    assert {d.dtype for d in ds.detectors.values()} == {"float16"}
    return ds.to_arrays(), test, head


def test_a_float16_bank_and_null_space_are_held_float16_and_score_as_float32_did(fashion_f16, monkeypatch):
    from edge_quq.detectors import DetectorSet

    stored, test, head = fashion_f16
    assert stored["knn/bank"].dtype == stored["vim/null_space"].dtype == np.float16
    held = DetectorSet.from_arrays(stored, "t")
    monkeypatch.setattr(framekernels, "_DOTS_F16", False)  # today's path: widened to float32 at load
    wide = DetectorSet.from_arrays(stored, "t")
    monkeypatch.undo()
    f16 = np.float16 if framekernels.dots_f16() else np.float32
    for name, key in (("knn", "bank"), ("vim", "null_space")):
        h, w = held.detectors[name], wide.detectors[name]
        assert h.arrays[key].dtype == f16 and w.arrays[key].dtype == np.float32
        assert np.array_equal(h.arrays[key], w.arrays[key])
        assert h.memory_bytes() == sum(v.nbytes for v in h.arrays.values())
        assert w.memory_bytes() - h.memory_bytes() == (stored[f"{name}/{key}"].size * 2 if f16 == np.float16 else 0)
    if f16 == np.float16:  # the kernel reads the null space's rows as held: no float32 copy
        vim = held.detectors["vim"]
        assert np.shares_memory(vim._scoring_arrays()["ns_t"], vim.arrays["null_space"])
    a, b = held.score_all(test, head), wide.score_all(test, head)
    assert set(a) == {"knn", "vim"} and all(np.array_equal(_bits(a[n]), _bits(b[n])) for n in a)
    for i in range(3):
        row = test[i:i + 1]
        for n in ("knn", "vim"):
            assert held.detectors[n].score(row, head).tolist() == wide.detectors[n].score(row, head).tolist()
    again = held.to_arrays()
    for k in ("knn/bank", "vim/null_space"):  # stored as it was, row-major
        assert again[k].dtype == np.float16 and again[k].flags.c_contiguous and np.array_equal(again[k], stored[k])


@pytest.mark.parametrize("kernel", ["float32 only", "none"])
def test_a_float16_bank_held_float16_is_widened_once_where_the_kernel_cannot_read_it(fashion_f16, monkeypatch, kernel):
    from edge_quq.detectors import DetectorSet, FittedDetector

    stored, test, head = fashion_f16
    held = DetectorSet.from_arrays(stored, "t")
    want = held.score_all(test, head)
    monkeypatch.setattr(framekernels, "_DOTS_F16" if kernel == "float32 only" else "_DOTS_AVAILABLE", False)
    # the arrays as held float16 by the load above, in fresh detectors (no prepared arrays yet)
    again = DetectorSet({n: FittedDetector(n, d.config, d.arrays, d.threshold, d.tpr, d.dtype)
                         for n, d in held.detectors.items()}, held.meta)
    knn = again.detectors["knn"]
    prepared = knn._scoring_arrays()["bank"]
    assert prepared.dtype == np.float32 and knn._scoring_arrays()["bank"] is prepared
    got = again.score_all(test, head)
    if kernel == "float32 only":  # the float32 kernel on the widened values: the same bits
        assert all(np.array_equal(_bits(got[n]), _bits(want[n])) for n in want)
    else:
        a = again.detectors["vim"].arrays
        assert np.all(np.abs(got["vim"] - want["vim"]) <= a["alpha"].item(0) * resid_tolerance(
            test, a["origin"], np.asarray(a["null_space"], np.float64)))
        assert np.allclose(got["knn"] ** 2, want["knn"] ** 2, rtol=0, atol=2 * framekernels.DOT_RTOL)


def test_on_an_x86_cpu_without_f16c_a_float16_bank_is_held_float32_and_scores_alike(fashion_f16, tmp_path):
    """This Python under qemu-x86_64-static with F16C off: the best variant (avx2_fma) cannot read float16, so the
    load widens the bank and null space to float32 (today's path), with the same kNN scores and ViM residuals to the
    bit (ViM's energy term comes from the head's logits, whose BLAS kernel differs under emulation)."""
    import pickle
    import platform
    import shutil
    import subprocess
    import sys

    from edge_quq.detectors import DetectorSet

    qemu = shutil.which("qemu-x86_64-static")
    if not qemu or platform.machine() != "x86_64" or "avx2_fma" not in ISAS:
        pytest.skip("needs an x86_64 host with avx2_fma and qemu-x86_64-static")
    stored, test, head = fashion_f16
    np.savez(tmp_path / "in.npz", test=test, **{k.replace("/", "|"): v for k, v in stored.items()})
    script = f"""
import numpy as np
from edge_quq import framekernels
import pickle
from edge_quq.detectors import DetectorSet
z = np.load({str(tmp_path / "in.npz")!r})
ds = DetectorSet.from_arrays({{k.replace("|", "/"): z[k] for k in z.files if k != "test"}}, "t")
head = pickle.loads(open({str(tmp_path / "head.pkl")!r}, "rb").read())
s = ds.score_all(z["test"], head)
a = ds.detectors["vim"]._scoring_arrays()
s["resid"] = framekernels.vim_resid(z["test"], a["origin"], a["ns_t"], a["ns_scale"])
np.savez({str(tmp_path / "out.npz")!r}, f16=np.array(framekernels.dots_f16()), bank=np.array(str(ds.detectors["knn"].arrays["bank"].dtype)),
         ns=np.array(str(ds.detectors["vim"].arrays["null_space"].dtype)), **s)
"""
    (tmp_path / "head.pkl").write_bytes(pickle.dumps(head))
    res = subprocess.run([qemu, "-cpu", "max,-f16c", sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    assert not out["f16"] and str(out["bank"]) == str(out["ns"]) == "float32"
    held = DetectorSet.from_arrays(stored, "t")
    assert np.array_equal(_bits(out["knn"]), _bits(held.score_all(test, head)["knn"]))
    a = held.detectors["vim"]._scoring_arrays()
    assert a["ns_t"].dtype == (np.float16 if framekernels.dots_f16() else np.float32) and a["ns_scale"] is None
    assert np.array_equal(_bits(out["resid"]), _bits(framekernels.vim_resid(test, a["origin"], a["ns_t"])))
