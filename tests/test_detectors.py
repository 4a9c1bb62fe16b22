"""OOD detectors: each score against a direct numpy implementation written here on small synthetic features,
the fit's determinism, the bundle's refusal of stale or mismatched detector files, fit-detectors and the
CLI's --ignore-on on the shipped samples (the embedded bundle carries detectors fitted on Fashion-MNIST)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_quq.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, load_bundle, sha256_file
from edge_quq.detector_store import DETECTORS_FILE, load_detectors
from edge_quq.detectors import DETECTOR_NAMES, DetectorSet, eval_logits, fit_detectors
from edge_quq.errors import BundleError, OptionError
from edge_quq.gradients import GradientSettings
from edge_quq.head import HeadWeights

SAMPLES = Path(DEFAULT_BUNDLE_DIR).parent / "samples"
F, H, C = 6, 9, 3


def make_head(rng, activation="sigmoid") -> HeadWeights:
    k0 = rng.normal(0, 0.6, (F, H)).astype(np.float32)
    b0 = rng.normal(0, 0.3, H).astype(np.float32)
    k1 = rng.normal(0, 0.6, (H, C)).astype(np.float32)
    b1 = rng.normal(0, 0.3, C).astype(np.float32)
    return HeadWeights((k0, k1), (b0, b1), (0.2, 0.4), activation)


def make_data(rng, n=400):
    centres = rng.normal(0, 2.0, (C, F))
    y = rng.integers(0, C, n)
    mix = rng.normal(0, 1, (F, F)) * 0.5 + np.eye(F)
    x = centres[y] + rng.normal(0, 1, (n, F)) @ mix
    return x, y


def forward64(head: HeadWeights, x: np.ndarray) -> np.ndarray:
    w0, w1 = (k.astype(np.float64) for k in head.kernels)
    b0, b1 = (b.astype(np.float64) for b in head.biases)
    return np.maximum(x @ w0 + b0, 0) @ w1 + b1


def softplus(z):
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0)


def split(n, holdout, seed):
    perm = np.random.default_rng(seed).permutation(n)
    k = max(int(round(holdout * n)), 1)
    return np.sort(perm[k:]), np.sort(perm[:k])  # fit, held out (the order fit_detectors draws them in)


@pytest.fixture(scope="module")
def synth():
    rng = np.random.default_rng(7)
    head = make_head(rng)
    x, y = make_data(rng)
    q = np.r_[make_data(rng, 50)[0], rng.normal(0, 6, (20, F))]  # ID-like and far points
    cfg = {"mahalanobis": {"ridge": 0.0}, "rel_mahalanobis": {"ridge": 0.0}, "knn": {"k": 3, "bank_size": 10_000},
           "vim": {"dim": 3}, "react": {"percentile": 80.0}}
    ds = fit_detectors(x, y, head, DETECTOR_NAMES, seed=3, tpr=0.9, holdout=0.2, config=cfg, dtypes=("float32",))
    fit, hold = split(len(x), 0.2, 3)
    return head, x, y, q, ds, fit, hold


def test_logit_detectors_match_numpy(synth):
    head, x, y, q, ds, fit, _ = synth
    z = forward64(head, q)
    np.testing.assert_allclose(ds.detectors["maxlogit"].score(q, head), -z.max(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.detectors["energy"].score(q, head), -softplus(z).sum(axis=1), rtol=1e-5, atol=1e-5)
    c = np.percentile(x[fit], 80.0)
    zc = forward64(head, np.minimum(q, c))
    np.testing.assert_allclose(ds.detectors["react"].score(q, head), -softplus(zc).sum(axis=1), rtol=1e-5, atol=1e-5)


def test_softmax_energy_is_negative_logsumexp():
    rng = np.random.default_rng(1)
    head = make_head(rng, "softmax")
    x, y = make_data(rng, 100)
    ds = fit_detectors(x, y, head, ["energy"], seed=0)
    z = forward64(head, x[:10])
    lse = np.log(np.sum(np.exp(z), axis=1))
    np.testing.assert_allclose(ds.detectors["energy"].score(x[:10], head), -lse, rtol=1e-5)


def test_mahalanobis_and_relative_match_numpy(synth):
    head, x, y, q, ds, fit, _ = synth
    xf, yf = x[fit], y[fit]
    mu = np.stack([xf[yf == c].mean(axis=0) for c in range(C)])
    cen = xf - mu[yf]
    prec = np.linalg.inv(cen.T @ cen / len(xf))
    d = np.stack([np.einsum("ij,jk,ik->i", q - mu[c], prec, q - mu[c]) for c in range(C)], axis=1)
    want = d.min(axis=1)
    np.testing.assert_allclose(ds.detectors["mahalanobis"].score(q, head), want, rtol=1e-4, atol=1e-3)
    mu0 = xf.mean(axis=0)
    prec0 = np.linalg.inv(np.cov(xf, rowvar=False, bias=True))
    d0 = np.einsum("ij,jk,ik->i", q - mu0, prec0, q - mu0)
    np.testing.assert_allclose(ds.detectors["rel_mahalanobis"].score(q, head), want - d0, rtol=1e-4, atol=1e-3)


def test_relative_background_is_the_low_rank_form_of_the_data_covariance():
    """rel_mahalanobis' background (detectors._background): the class whitener's coordinates plus an F x R term,
    R below the number of classes present, give the distance under the within-class covariance (with its ridge)
    plus the between-class scatter, which is the data's covariance: a class absent from the fit adds nothing."""
    rng = np.random.default_rng(11)
    f, c, n = 12, 5, 900
    y = rng.integers(0, c - 1, n)  # class c - 1 absent
    x = rng.normal(0, 2.0, (c, f))[y] + rng.normal(size=(n, f)) @ (rng.normal(size=(f, f)) * 0.4 + np.eye(f))
    head = HeadWeights((np.zeros((f, 4), np.float32), np.zeros((4, c), np.float32)),
                       (np.zeros(4, np.float32), np.zeros(c, np.float32)), (0.1, 0.1), "softmax")
    ds = fit_detectors(x, y, head, ["rel_mahalanobis"], seed=0, holdout=0.1, dtypes=("float32",))
    fit, _ = split(n, 0.1, 0)
    xf, yf = x[fit], y[fit]
    assert ds.detectors["rel_mahalanobis"].arrays["between_w"].shape == (f, c - 2)  # c - 1 present, one degree lost
    mu = np.stack([xf[yf == k].mean(axis=0) for k in range(c - 1)])
    within = (xf - mu[yf]).T @ (xf - mu[yf]) / len(xf)
    within += 1e-6 * np.trace(within) / f * np.eye(f)
    mu0 = xf.mean(axis=0)
    background = within + np.cov(xf, rowvar=False, bias=True) - (xf - mu[yf]).T @ (xf - mu[yf]) / len(xf)
    q = np.r_[x[:30], rng.normal(0, 8, (10, f))]
    d = np.stack([np.einsum("ij,jk,ik->i", q - m, np.linalg.inv(within), q - m) for m in mu], axis=1).min(axis=1)
    d0 = np.einsum("ij,jk,ik->i", q - mu0, np.linalg.inv(background), q - mu0)
    got = ds.detectors["rel_mahalanobis"].score(q, head)
    np.testing.assert_allclose(got, d - d0, rtol=1e-4, atol=1e-5 * np.abs(d).max())


def test_the_storage_check_allows_the_thresholds_own_flip_on_top_of_its_tolerance():
    from edge_quq.detectors import _decisions_kept

    ref = np.arange(10.0)
    thr = 8.0  # a held-out score, as fit_threshold picks it
    own = ref.copy()
    own[8] += 1e-9  # only the threshold's own sample crosses
    assert _decisions_kept(own, ref, thr, 0.0)
    another = own.copy()
    another[7] = 8.5  # one more decision moves
    assert not _decisions_kept(another, ref, thr, 0.0) and _decisions_kept(another, ref, thr, 0.1)


def test_knn_matches_numpy(synth):
    head, x, y, q, ds, fit, _ = synth
    bank = x[fit] / np.linalg.norm(x[fit], axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dist = np.linalg.norm(qn[:, None, :] - bank[None, :, :], axis=2)
    want = np.sort(dist, axis=1)[:, 2]  # k = 3
    np.testing.assert_allclose(ds.detectors["knn"].score(q, head), want, rtol=1e-4, atol=1e-4)


def test_knn_bank_is_a_seeded_subsample():
    rng = np.random.default_rng(2)
    head = make_head(rng)
    x, y = make_data(rng, 300)
    a = fit_detectors(x, y, head, ["knn"], seed=5, config={"knn": {"k": 2, "bank_size": 50}})
    b = fit_detectors(x, y, head, ["knn"], seed=6, config={"knn": {"k": 2, "bank_size": 50}})
    assert a.detectors["knn"].arrays["bank"].shape == (50, F)
    assert not np.array_equal(a.detectors["knn"].arrays["bank"], b.detectors["knn"].arrays["bank"])
    with pytest.raises(OptionError):
        fit_detectors(x, y, head, ["knn"], config={"knn": {"k": 60, "bank_size": 50}})


def test_vim_matches_numpy(synth):
    head, x, y, q, ds, fit, _ = synth
    w0 = head.kernels[0].astype(np.float64)
    b0 = head.biases[0].astype(np.float64)
    u = np.linalg.lstsq(w0.T, -b0, rcond=None)[0]  # where the first layer's pre-activation is (closest to) zero
    xc = x[fit] - u
    evals, evecs = np.linalg.eigh(xc.T @ xc / len(xc))
    ns = evecs[:, np.argsort(evals)[::-1][3:]]
    r_fit = np.linalg.norm(xc @ ns, axis=1)
    alpha = softplus(forward64(head, x[fit])).sum(axis=1).mean() / r_fit.mean()
    want = alpha * np.linalg.norm((q - u) @ ns, axis=1) - softplus(forward64(head, q)).sum(axis=1)
    np.testing.assert_allclose(ds.detectors["vim"].score(q, head), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("names", [DETECTOR_NAMES, ("mahalanobis", "rel_mahalanobis"), ("rel_mahalanobis",), ("vim",),
                                   ("maxlogit", "knn"), ("mahalanobis", "react", "gradient")])
def test_row_scorer_gives_score_all_of_one_row_exactly(synth, names):
    head, x, y, q, ds, fit, _ = synth
    sub = ds.subset(names)
    score = sub.row_scorer(head)
    for row in np.asarray(q[:12], np.float32):
        want = {n: float(v[0]) for n, v in sub.score_all(row[None], head).items()}
        got = score(row[None])
        assert list(got) == list(want) and all(type(v) is float for v in got.values())
        assert got == want


@pytest.mark.parametrize("names", [DETECTOR_NAMES, ("rel_mahalanobis", "knn", "vim"), ("vim",), ("maxlogit", "energy")])
def test_row_scorer_halves_give_its_scores_and_the_first_needs_no_logits(synth, names):
    head, x, y, q, ds, fit, _ = synth
    sub = ds.subset(names)
    score = sub.row_scorer(head)
    for row in np.asarray(q[:6], np.float32):
        lg = eval_logits(head, row[None])
        early = score.without_logits(row[None])
        # the first half scores every detector that needs no logits (ViM: its residual only)
        assert set(early) == {n for n in names if n not in ("maxlogit", "energy")}
        assert score.with_logits(row[None], early, lg) == score(row[None], lg) == score(row[None])
    assert score.needs_logits == any(n in ("maxlogit", "energy", "vim") for n in names)


def test_gradient_detector_matches_finite_differences(synth):
    head, x, y, q, ds, _, _ = synth
    # d log p_k / d theta for every parameter by central differences of a float64 forward pass
    params = [k.astype(np.float64) for k in head.kernels] + [b.astype(np.float64) for b in head.biases]

    def logp(ps, v):
        z = np.maximum(v @ ps[0] + ps[2], 0) @ ps[1] + ps[3]
        return -softplus(-z)  # log sigmoid

    def score(v):
        p = 1 / (1 + np.exp(-forward64(head, v[None])[0]))
        wk = np.sqrt(p) / np.sqrt(p).sum()
        norms = np.zeros((2, C))
        for li, (wi, bi) in enumerate(((0, 2), (1, 3))):
            g = np.zeros((C, params[wi].size + params[bi].size))
            col = 0
            for pi in (wi, bi):
                for j in range(params[pi].size):
                    up = [a.copy() for a in params]
                    dn = [a.copy() for a in params]
                    up[pi].flat[j] += 1e-6
                    dn[pi].flat[j] -= 1e-6
                    g[:, col] = (logp(up, v) - logp(dn, v)) / 2e-6
                    col += 1
            norms[li] = np.linalg.norm(g, axis=1)
        om = np.array([1.0, 2.0]) / 3.0  # layer base 2
        return float(om @ (norms @ wk))

    got = ds.detectors["gradient"].score(q[:4], head)
    np.testing.assert_allclose(got, [score(v) for v in q[:4]], rtol=1e-4)


def test_thresholds_keep_the_target_share_of_held_out_id(synth):
    head, x, y, q, ds, fit, hold = synth
    for n, d in ds.detectors.items():
        s = d.score(x[hold], head)
        assert np.mean(s <= d.threshold) >= 0.9, n
        assert d.tpr == 0.9
    # far points (large norm, random directions) are flagged by Mahalanobis (KNN works on normalised features,
    # blind to the norm by design; ViM adds the energy of a random head, which large inputs push either way)
    far = q[-20:]
    for n in ("mahalanobis",):
        assert ds.detectors[n].flag(ds.detectors[n].score(far, head)).mean() > 0.8, n


def test_fit_is_deterministic_for_a_seed_and_survives_storage():
    rng = np.random.default_rng(11)
    head = make_head(rng)
    x, y = make_data(rng, 500)
    a = fit_detectors(x, y, head, DETECTOR_NAMES, seed=4)
    b = fit_detectors(x, y, head, DETECTOR_NAMES, seed=4)
    aa, bb = a.to_arrays(), b.to_arrays()
    assert sorted(aa) == sorted(bb)
    for k in aa:
        np.testing.assert_array_equal(aa[k], bb[k], err_msg=k)
    c = fit_detectors(x, y, head, DETECTOR_NAMES, seed=5)
    assert any(a.detectors[n].threshold != c.detectors[n].threshold for n in ("knn", "mahalanobis"))
    back = DetectorSet.from_arrays(aa, "mem")
    assert back.names == list(DETECTOR_NAMES)
    for n in DETECTOR_NAMES:
        np.testing.assert_allclose(back.detectors[n].score(x[:20], head), a.detectors[n].score(x[:20], head), rtol=1e-6, atol=1e-6)
        assert back.detectors[n].threshold == a.detectors[n].threshold


def test_fit_rejects_bad_input():
    rng = np.random.default_rng(0)
    head = make_head(rng)
    x, y = make_data(rng, 100)
    with pytest.raises(OptionError, match="features must be"):
        fit_detectors(x[:, :3], y, head, ["energy"])
    with pytest.raises(OptionError, match="labels must be"):
        fit_detectors(x, y + 5, head, ["energy"])
    with pytest.raises(OptionError, match="unknown detector"):
        fit_detectors(x, y, head, ["odin"])


# --- the bundle ---------------------------------------------------------------------------------------------

def copy_default(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def rewrite_manifest(root: Path, fn) -> None:
    m = json.loads((root / MANIFEST_NAME).read_text())
    fn(m)
    (root / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


def rechecksum(root: Path, name: str) -> None:
    def fix(m):
        m["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    rewrite_manifest(root, fix)


def test_default_bundle_has_detectors():
    b = load_bundle()
    ds = load_detectors(b)
    assert ds is not None and ds.names == list(DETECTOR_NAMES)
    assert all(d.threshold is not None for d in ds.detectors.values())
    assert b.files[DETECTORS_FILE]["bytes"] < 200 * 1024


def test_stale_backbone_is_refused(tmp_path):
    root = copy_default(tmp_path)
    # a re-exported backbone: different bytes, correctly checksummed, detectors left behind
    with open(root / "backbone_int8.onnx", "ab") as f:
        f.write(b"\0")
    rechecksum(root, "backbone_int8.onnx")
    b = load_bundle(root)
    with pytest.raises(BundleError, match="fitted for another onnx backbone.*stale"):
        load_detectors(b)


def test_detectors_copied_from_another_bundle_are_refused(tmp_path):
    root = copy_default(tmp_path)
    with np.load(root / DETECTORS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["backbone_sha256"]["tflite"] = "0" * 64
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(root / DETECTORS_FILE, **arrays)
    rechecksum(root, DETECTORS_FILE)
    with pytest.raises(BundleError, match="another tflite backbone.*file record"):
        load_detectors(load_bundle(root))


def test_mismatched_feature_size_and_newer_version_are_refused(tmp_path):
    root = copy_default(tmp_path)
    rewrite_manifest(root, lambda m: m["detectors"].update(feature_size=128))
    with pytest.raises(BundleError, match="fitted for 128 features"):
        load_detectors(load_bundle(root))
    rewrite_manifest(root, lambda m: m["detectors"].update(feature_size=64, version=99))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_detectors(load_bundle(root))


def test_tampered_detectors_file_is_refused(tmp_path):
    root = copy_default(tmp_path)
    with open(root / DETECTORS_FILE, "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="detectors.npz"):
        load_bundle(root)
    rewrite_manifest(root, lambda m: m["files"].pop(DETECTORS_FILE))
    with pytest.raises(BundleError, match="no checksum entry"):
        load_detectors(load_bundle(root))


# --- commands -----------------------------------------------------------------------------------------------

def run(*args, check_code=None):
    p = subprocess.run([sys.executable, "-m", "edge_quq", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    if check_code is not None:
        assert p.returncode == check_code, (p.returncode, p.stdout, p.stderr)
    return p


def predict_json(*args):
    p = run("predict", *sorted(str(f) for f in SAMPLES.glob("*.png")), "--seed", "0", "--json", "--policy", "paper", *args, check_code=0)
    return {Path(d["source"]).name: d for d in map(json.loads, p.stdout.splitlines())}


def test_ignore_on_choices_on_the_shipped_samples():
    classes = [f.name for f in SAMPLES.glob("0*.png")]
    mc = predict_json("--detectors", "all")  # every detector's score, as diagnostics
    oods = ("ood_rings16.png", "ood_checkerboard.png")
    for o in oods:
        assert "mahalanobis" in mc[o]["flagged"]
    for d in mc.values():
        assert set(DETECTOR_NAMES) <= set(d["scores"]) and d["settings"]["ignore_on"] == "mc"

    maha = predict_json("--ignore-on", "mahalanobis")
    for o in oods:
        assert maha[o]["decision"] == "ignore" and "mahalanobis" in maha[o]["ignored_by"]
        assert set(maha[o]["ignored_by"]) <= {"rule", "mahalanobis"}
    assert all(maha[c]["decision"] == "keep" and maha[c]["ignored_by"] == [] for c in classes)

    anyr = predict_json("--ignore-on", "any")
    for o in oods:
        assert anyr[o]["decision"] == "ignore" and len(set(anyr[o]["ignored_by"]) - {"rule"}) > 1
    # `any` is the union of eight thresholds that each flag 5% of held-out clothing: one of ten may go
    kept = [c for c in classes if anyr[c]["decision"] == "keep"]
    assert len(kept) >= 9 and all(anyr[c]["ignored_by"] != ["rule"] for c in classes)
    # the scores themselves do not depend on ignore_on
    assert anyr["ood_rings16.png"]["scores"]["knn"] == mc["ood_rings16.png"]["scores"]["knn"]


def test_ignore_on_table_and_errors(tmp_path):
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--ignore-on", "vim", check_code=0)
    assert "ignored by" in p.stdout and "vim" in p.stdout
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--ignore-on", "odin", check_code=2)
    assert p.stderr.strip().splitlines()[-1].startswith("error: --ignore-on 'odin'")
    root = copy_default(tmp_path)
    # without its detectors, the calibration data made with them goes too (else: refused as stale)
    rewrite_manifest(root, lambda m: (m.pop("detectors"), m["files"].pop(DETECTORS_FILE), m.pop("gate"), m["files"].pop("gate.npz")))
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--bundle", str(root), "--ignore-on", "knn", check_code=2)
    assert "no fitted detectors" in p.stderr
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--bundle", str(root), "--json", check_code=0)
    assert "knn" not in json.loads(p.stdout)["scores"]


def test_fit_detectors_command_adds_them_and_refuses_bad_options(tmp_path):
    from edge_quq_export.datasets import load_fashion_mnist

    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Fashion-MNIST missing")
    root = copy_default(tmp_path)
    rewrite_manifest(root, lambda m: (m.pop("detectors"), m["files"].pop(DETECTORS_FILE)))
    (root / DETECTORS_FILE).unlink()
    before = (root / MANIFEST_NAME).read_text()
    x, y = load_fashion_mnist("train")
    np.savez(tmp_path / "fit.npz", x=x[:600], y=y[:600])
    p = run("fit-detectors", str(root), "--data", str(tmp_path / "fit.npz"), "--detectors", "odin")
    assert p.returncode == 2 and p.stderr.startswith("error: unknown detector odin")
    assert (root / MANIFEST_NAME).read_text() == before and not (root / DETECTORS_FILE).exists()
    p = run("fit-detectors", str(root), "--data", str(tmp_path / "fit.npz"), "--detectors", "mahalanobis,knn",
            "--param", "knn.bank_size=100", "--tpr", "0.9", "--z", "0.9", check_code=0)
    assert "mahalanobis" in p.stdout and "knn" in p.stdout
    assert load_bundle(root).decision.z == 0.9 and "default_z" not in load_bundle(root).gate.validation  # given, not chosen
    ds = load_detectors(load_bundle(root))
    f = load_bundle(root).head.feature_size
    assert ds.names == ["mahalanobis", "knn"] and ds.detectors["knn"].arrays["bank"].shape == (100, f)
    assert ds.meta["fit"]["labels"] == "labels" and ds.detectors["knn"].tpr == 0.9
    out = predict_json("--bundle", str(root), "--ignore-on", "knn")
    assert "vim" not in out["ood_rings16.png"]["scores"] and "knn" in out["ood_rings16.png"]["scores"]


def test_export_fits_detectors_on_the_tiny_model(tmp_path, tiny_model_path, tiny_data_files):
    from edge_quq.detector_store import fitted_for

    calib, test = tiny_data_files
    out = tmp_path / "b"
    p = run("export", str(tiny_model_path), "--calibration", str(calib), "--out", str(out), "--detectors", "knn,vim")
    assert p.returncode == 2 and "--detectors needs --fit-data" in p.stderr and not out.exists()
    p = run("export", str(tiny_model_path), "--calibration", str(calib), "--out", str(out), "--test-data", str(test),
            "--classes", "a,b,c,d,e,f,g,h,i,j", "--detectors", "mahalanobis,vim", "--fit-data", str(test), check_code=0)
    assert "OOD detectors mahalanobis, vim fitted" in p.stdout
    b = load_bundle(out)
    ds = load_detectors(b)
    assert ds.names == ["mahalanobis", "vim"] and ds.meta["backbone_sha256"] == fitted_for(b)["backbone_sha256"]
    # 1000 images: a seeded 20% held out for the gate's calibration, 10% of the rest for the thresholds
    assert ds.meta["fit"]["labels"] == "labels" and ds.meta["fit_samples"] == 720
    zc = b.gate.validation["default_z"]  # no --z: chosen on the 200 calibration samples
    assert b.decision.z == zc["z"] and zc["samples"] == 200 and len(zc["table"]) == 16
    assert b.gate is not None and b.gate.calibration["samples"] == 200 and "default policy gated" in p.stdout


def test_ignore_on_is_a_service_config_key_and_reaches_the_predictor(tmp_path):
    import click
    from click.testing import CliRunner

    from edge_quq.cli import build_predictor, model_options
    from edge_quq.config import config_option

    @click.command(name="camera")
    @config_option
    @model_options
    def cam(**kw):
        # --ignore-on is a model option like the others: it reaches the predictor through PredictorOptions
        assert "ignore_on" in kw
        p = build_predictor(**kw)
        click.echo(p.ignore_on)

    cfg = tmp_path / "config"
    cfg.write_text('ignore-on = "knn"\n')
    assert CliRunner().invoke(cam, ["--config", str(cfg)]).output.strip() == "knn"
    assert CliRunner().invoke(cam, ["--config", str(cfg), "--ignore-on", "any"]).output.strip() == "any"
    assert CliRunner().invoke(cam, []).output.strip() == "mc"


def test_detector_scores_ignore_the_temperature():
    from dataclasses import replace

    rng = np.random.default_rng(3)
    head = make_head(rng)
    x, y = make_data(rng, 200)
    ds = fit_detectors(x, y, head, DETECTOR_NAMES, seed=0)
    hot = replace(head, temperature=2.5)
    for n, d in ds.detectors.items():
        np.testing.assert_allclose(d.score(x[:5], hot), d.score(x[:5], head), err_msg=n)


def test_camera_gets_ignore_on_through_the_shared_model_options(tmp_path):
    for f in SAMPLES.glob("*.png"):
        shutil.copy(f, tmp_path / f.name)
    p = run("camera", "--source", str(tmp_path), "--ignore-on", "mahalanobis", "--policy", "paper", "--jsonl", "-", "--frames", "12", check_code=0)
    rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert len(rows) == 12  # the folder's images in name order: ten classes, checkerboard, rings
    assert [r["decision"] for r in rows] == ["keep"] * 10 + ["ignore", "ignore"]
    assert rows[-1]["ignored_by"] == ["mahalanobis"] and rows[-2]["ignored_by"] == ["mahalanobis"]


# --- which detectors a frame computes (--detectors) -----------------------------------------------------------

MOMENT_SCORES = {"max_prob", "predictive_entropy", "mutual_information", "mean_variance", "energy"}


def test_by_default_a_frame_computes_only_what_the_decision_needs():
    from edge_quq.predictor import Predictor

    img = str(SAMPLES / "ood_rings16.png")
    gated = Predictor.from_bundle(seed=0)
    gate = list(gated.policy.detectors)  # the embedded bundle's, chosen by the exporter's validation
    assert gate and set(gate) < set(DETECTOR_NAMES)
    r = gated.predict(img)
    assert r.settings["detectors"] == gate == r.settings["gate_detectors"]
    assert set(r.scores) == MOMENT_SCORES | set(gate) and r.ood_p is not None
    assert r.flagged and set(r.flagged) <= set(gate)
    assert "ood_gate" in r.ignored_by  # a far-OOD image: the gate ignores it whatever the rule says
    paper = Predictor.from_bundle(seed=0, policy="paper").predict(img)
    assert paper.settings["detectors"] == [] and set(paper.scores) == MOMENT_SCORES and paper.flagged == []
    full = Predictor.from_bundle(seed=0, detectors="all").predict(img)
    assert full.settings["detectors"] == list(DETECTOR_NAMES) and set(DETECTOR_NAMES) <= set(full.scores)
    # diagnostics do not move the decision
    assert (full.decision, full.ignored_by) == (r.decision, r.ignored_by)
    assert full.ood_p == pytest.approx(r.ood_p)
    assert all(full.scores[n] == pytest.approx(r.scores[n], rel=1e-5) for n in gate)
    assert set(full.flagged) > set(r.flagged)


def test_detector_names_add_to_what_the_decision_needs():
    from edge_quq.predictor import Predictor

    some = Predictor.from_bundle(seed=0, detectors="gate,vim,knn", ignore_on="react")
    want = {"react", "knn", "vim", *some.policy.detectors}
    assert some.detector_names == tuple(n for n in DETECTOR_NAMES if n in want)  # the order of DETECTOR_NAMES
    r = some.predict(str(SAMPLES / "00_t-shirt-top.png"))
    assert set(r.scores) == MOMENT_SCORES | want
    anyp = Predictor.from_bundle(seed=0, policy="paper", ignore_on="any")
    assert set(anyp.detector_names) == set(anyp.detectors.with_threshold())
    grad = Predictor.from_bundle(seed=0, policy="paper", detectors="gradient")
    assert set(grad.predict(str(SAMPLES / "00_t-shirt-top.png")).scores) == MOMENT_SCORES | {"gradient"}


@pytest.mark.parametrize("value, message", [
    ("bogus", "unknown detector bogus"), ("knn,odin", "unknown detector odin"), (",", "(none given)"),
    ("all,knn", "unknown detector all"),
])
def test_detectors_option_refuses_bad_names_with_one_line(value, message):
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--detectors", value, check_code=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --detectors") and message in lines[0], p.stderr
    assert p.stdout == ""


def test_detectors_option_on_a_bundle_without_detectors(tmp_path):
    root = copy_default(tmp_path)
    rewrite_manifest(root, lambda m: (m.pop("detectors"), m["files"].pop(DETECTORS_FILE), m.pop("gate"), m["files"].pop("gate.npz")))
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--bundle", str(root), "--detectors", "knn", check_code=2)
    assert p.stderr.strip().splitlines() == ["error: --detectors knn: not a detector of this bundle (it has gradient); use gate, all or those"]
    p = run("predict", str(SAMPLES / "ood_rings16.png"), "--bundle", str(root), "--detectors", "all", "--json", check_code=0)
    d = json.loads(p.stdout.splitlines()[0])
    assert d["settings"]["detectors"] == ["gradient"] and set(d["scores"]) == MOMENT_SCORES | {"gradient"}


def test_float32_mahalanobis_keeps_the_gate_p_values_of_the_float64_formula():
    """The Mahalanobis family scores in float32 from one prepared projection (docs/detectors.md). Against the
    float64 formula on the default bundle's own Fashion-MNIST test features (never used to fit it): scores
    agree to 1e-5 relative, and a gate p-value moves only by the calibration scores that lie between the two
    scores (each is one rank, 1 / (n + 1)), with the same gate decision at the bundle's alpha."""
    from edge_quq.conformal import conformal_pvalues
    from tests.gate_util import _predictor, real_id_data

    pred = _predictor()
    feats = real_id_data()["features"].astype(np.float64)
    want, got = {}, {}
    for name in ("mahalanobis", "rel_mahalanobis"):
        a = {k: v.astype(np.float64) for k, v in pred.detectors.detectors[name].arrays.items()}
        diff = (feats @ a["whitener"])[:, None, :] - a["means_w"][None]
        w = np.nanmin(np.where(np.isnan(diff).any(-1), np.inf, np.einsum("ncf,ncf->nc", diff, diff)), axis=1)
        if name == "rel_mahalanobis":
            g = feats @ a["whitener0"] - a["mean0_w"]
            w = w - np.einsum("nf,nf->n", g, g)
        want[name], got[name] = w, pred.detectors.detectors[name].score(feats, pred.head)
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    from edge_quq.conformal import combine
    from edge_quq.gate_store import load_gate

    # a gate of the pair, against the bundle's calibration scores of the pair (gate.npz holds every detector's):
    # the shipped gate may hold no Mahalanobis detector, and the property is the pair's own
    family = ("mahalanobis", "rel_mahalanobis")
    cal = load_gate(pred.bundle).calibration(family)
    want_p = conformal_pvalues(np.stack([want[n] for n in family], 1), cal)
    got_p = conformal_pvalues(np.stack([got[n] for n in family], 1), cal)
    for j, n in enumerate(family):
        lo, hi = np.minimum(got[n], want[n]), np.maximum(got[n], want[n])
        between = np.searchsorted(cal.arrays[j], hi, side="right") - np.searchsorted(cal.arrays[j], lo, side="left")
        assert np.all(np.abs(got_p[:, j] - want_p[:, j]) * cal.plus_one[j] <= between + 1e-9)
        assert np.mean(between > 1) < 0.01  # float32 rarely lands between two calibration ranks
    pol = pred.policy
    assert np.array_equal(combine(got_p, pol.combine, cal) < pol.alpha, combine(want_p, pol.combine, cal) < pol.alpha)


def test_detectors_option_takes_a_list_in_python():
    from edge_quq.predictor import Predictor

    p = Predictor.from_bundle(seed=0, policy="paper", detectors=["vim", "knn"])
    assert p.detector_names == ("knn", "vim")
    with pytest.raises(OptionError, match="unknown detector odin"):
        Predictor.from_bundle(seed=0, detectors=["odin"])


def test_blocked_triangular_mahalanobis_matches_the_float64_formula():
    """At F >= _BLOCKED_MIN_ROWS the Mahalanobis family projects by the whitener's nonzero row blocks
    (lower-triangular Cholesky factor: about half the bytes). Scores agree with the float64 formula to 1e-5
    relative, as the one-matmul path does, and the blocks hold at most 0.6 of the matrix."""
    from edge_quq.detectors import _BLOCKED_MIN_ROWS, _mahalanobis_family, _prepare_mahalanobis, _whitener

    rng = np.random.default_rng(7)
    f, c = _BLOCKED_MIN_ROWS + 37, 5
    x = rng.normal(size=(3 * f, f)) @ rng.normal(0, 0.2, (f, f)) + rng.normal(size=f)
    a = {"whitener": _whitener(np.cov(x, rowvar=False), 1e-6)}
    a["means_w"] = x[rng.choice(len(x), c)] @ a["whitener"]
    a["whitener0"] = _whitener(np.cov(x[::2], rowvar=False), 1e-6)
    a["mean0_w"] = x.mean(axis=0, keepdims=True) @ a["whitener0"]
    a32 = {k: v.astype(np.float32) for k, v in a.items()}
    w = {k: v.astype(np.float64) for k, v in a32.items()}
    q = np.maximum(rng.normal(size=(6, f)) @ rng.normal(0, 0.2, (f, f)), 0.0)
    diff = (q @ w["whitener"])[:, None, :] - w["means_w"][None]
    want = np.einsum("ncf,ncf->nc", diff, diff).min(axis=1)
    g = q @ w["whitener0"] - w["mean0_w"]
    want_rel = want - np.einsum("nf,nf->n", g, g)
    for arrays, rel in (({k: a32[k] for k in ("whitener", "means_w")}, None), (a32, want_rel)):
        p = _prepare_mahalanobis(arrays)
        assert p["blocks"] and sum(b[3].size for b in p["blocks"]) <= 0.6 * f * f * (2 if rel is not None else 1)
        d, r = _mahalanobis_family(p, q)
        np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        if rel is not None:
            np.testing.assert_allclose(r, rel, rtol=1e-5, atol=1e-5 * np.abs(rel).max())
