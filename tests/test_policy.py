"""The decision policies on the embedded bundle (issue 14): the default gate ignores real photographs and keeps
clean clothing, its false-ignore rate and the risk guarantee hold on real data, bad input is one line."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_quq.bundle import DEFAULT_BUNDLE_DIR, load_bundle, parse_manifest
from edge_quq.gate_store import load_gate
from edge_quq.risk import CalibrationTable, ltt_threshold

SAMPLES = Path(__file__).resolve().parents[1] / "edge_quq" / "data" / "samples"


def run(*args):
    return subprocess.run([sys.executable, "-m", "edge_quq", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))


def predict_json(*args):
    p = run("predict", *args, "--seed", "0", "--json")
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Real photographs that packages ship, written as files the way a user would pass them."""
    from edge_quq_export.datasets import package_photos

    out = tmp_path_factory.mktemp("photos")
    photos = package_photos()
    assert {"photos_skimage", "photos_matplotlib", "photos_sklearn"} <= set(photos)
    for src, imgs in photos.items():
        for i, img in enumerate(imgs):
            bgr = img if img.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(out / f"{src}_{i:02d}.png"), bgr)
    return out


def test_default_policy_ignores_real_photographs_and_keeps_the_clothing_samples(photo_dir):
    rows = predict_json(photo_dir)
    assert len(rows) >= 15
    for r in rows:
        assert r["policy"] == "gated" and r["decision"] == "ignore" and "ood_gate" in r["ignored_by"], r["source"]
        assert r["ood_p"] < r["settings"]["ood_alpha"]
    clothes = predict_json(*sorted(SAMPLES.glob("0*.png")))
    assert len(clothes) == 10
    for r in clothes:
        assert r["decision"] == "keep" and r["ignored_by"] == [] and r["ood_p"] >= 0.05, r["source"]


def test_paper_policy_is_todays_rule(photo_dir):
    rows = predict_json(photo_dir, "--policy", "paper")
    assert all(r["policy"] == "paper" and r["ood_p"] is None and "ood_gate" not in r["ignored_by"] for r in rows)
    assert all(set(r["ignored_by"]) <= {"rule"} and (r["decision"] == "ignore") == (r["ignored_by"] == ["rule"]) for r in rows)


@pytest.fixture(scope="module")
def clean_test_scores():
    """Gate p-values of 3000 held-out clean Fashion-MNIST test images (never calibration, never fit)."""
    from edge_quq.conformal import gate_pvalues
    from edge_quq.detector_store import load_detectors
    from edge_quq.head import load_head_weights
    from edge_quq_export.datasets import FASHION_MNIST_DIR, load_fashion_mnist, preprocess_array
    from edge_quq_export.detectors import backbone_features

    b = load_bundle()
    gate, dset, head = load_gate(b), load_detectors(b), load_head_weights(b)
    x, _ = load_fashion_mnist("test", FASHION_MNIST_DIR)
    x = x[np.random.default_rng(0).permutation(len(x))[:3000]]
    feats, _ = backbone_features(b, preprocess_array(x, b.input.shape, b.input.preprocess, "test"))
    sc = dset.score_all(feats, head)
    names = gate.spec.detectors
    return gate, gate_pvalues(np.stack([sc[n] for n in names], 1), gate.calibration(names), gate.spec.combine)


def test_gate_false_ignore_rate_on_clean_test_images(clean_test_scores):
    gate, p = clean_test_scores
    a, n = gate.spec.alpha, len(p)
    margin = 3.0 * math.sqrt(a * (1 - a) / n) + math.sqrt(a / gate.size)  # test binomial + calibration draw
    assert np.mean(p < a) <= a + margin


def test_risk_guarantee_on_the_bundles_calibration_data():
    """The stored calibration table as the population: calibration sets of half its size drawn from it, the
    threshold chosen on each, its true error rate read off the whole table. Over 200 draws the target is
    exceeded in at most delta (plus a binomial margin) of them."""
    g = load_gate(load_bundle())
    table = g.risk_table(g.spec.detectors, g.spec.alpha, g.spec.combine)
    conf, wrong = table.scores, table.wrong.astype(bool)
    target, delta, splits, violations = 0.03, g.spec.delta, 200, 0
    rng = np.random.default_rng(0)
    for _ in range(splits):
        draw = rng.integers(0, conf.size, conf.size // 2)
        thr = ltt_threshold(CalibrationTable.build(conf[draw], ~wrong[draw]), target, delta).threshold
        violations += wrong[conf > thr].mean() > target
    assert violations / splits <= delta + 3 * math.sqrt(delta * (1 - delta) / splits)


def test_risk_policy_records_its_threshold():
    rows = predict_json(*sorted(SAMPLES.glob("0*.png")), "--target-error", "0.03")
    assert {r["policy"] for r in rows} == {"risk"}
    thr = rows[0]["risk_threshold"]
    assert thr is not None and all(r["risk_threshold"] == thr for r in rows)
    for r in rows:
        if "risk" in r["ignored_by"]:
            assert r["decision"] == "ignore"


def _copy_bundle(tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def _edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))


def _no_gate(folder: Path) -> Path:
    def strip(m):
        m.pop("gate")
        m["files"].pop("gate.npz")
    _edit_manifest(folder, strip)
    return folder


@pytest.fixture(scope="module")
def bad_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    out = {"none": _no_gate(_copy_bundle(root / "none"))}
    out["checksum"] = _copy_bundle(root / "sum")
    raw = bytearray((out["checksum"] / "gate.npz").read_bytes())
    raw[100] ^= 0xFF  # same size, other content
    (out["checksum"] / "gate.npz").write_bytes(bytes(raw))
    for key, field in (("head", "head_sha256"), ("detectors", "detectors_sha256")):
        out[key] = _copy_bundle(root / key)
        _edit_manifest(out[key], lambda m, f=field: m["gate"]["fingerprints"].__setitem__(f, "0" * 64))
    return out


@pytest.mark.parametrize("args, needle", [
    (("--target-error", "0"), "--target-error must be strictly between 0 and 1"),
    (("--target-error", "1.5"), "--target-error must be strictly between 0 and 1"),
    (("--target-error", "0.0001"), "smallest reachable target"),
    (("--ood-alpha", "0"), "--ood-alpha must be strictly between 0 and 1"),
    (("--ood-alpha", "1"), "--ood-alpha must be strictly between 0 and 1"),
    (("--delta", "-0.1", "--target-error", "0.03"), "--delta must be strictly between 0 and 1"),
    (("--policy", "risk"), "needs --target-error"),
    (("--policy", "gated", "--bundle", "none"), "needs calibration data"),
    (("--policy", "risk", "--target-error", "0.03", "--bundle", "none"), "needs calibration data"),
    (("--bundle", "checksum"), "sha256"),
    (("--bundle", "head"), "made for another head"),
    (("--bundle", "detectors"), "made for another detectors"),
])
def test_bad_input_is_one_line_and_exit_2(bad_bundles, tmp_path, args, needle):
    args = tuple(str(bad_bundles[a]) if a in bad_bundles else a for a in args)
    out = tmp_path / "out.jsonl"
    p = subprocess.run(f"{sys.executable} -m edge_quq predict {SAMPLES / '00_t-shirt-top.png'} --json "
                       + " ".join(args) + f" > {out}", shell=True, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert out.read_text() == ""


def test_bundle_without_calibration_data_defaults_to_paper(bad_bundles):
    b = bad_bundles["none"]
    rows = predict_json(SAMPLES / "ood_checkerboard.png", "--bundle", b)
    assert rows[0]["policy"] == "paper" and rows[0]["ood_p"] is None
    info = run("info", b)
    assert info.returncode == 0
    lines = [ln for ln in info.stdout.splitlines() if ln.startswith("policy")]
    assert len(lines) == 1 and "no calibration data" in lines[0]


def test_info_shows_policy_and_validation():
    p = run("info")
    assert p.returncode == 0
    text = p.stdout
    gate = ", ".join(load_bundle().gate.detectors)
    assert f"gated (default); gate alpha 0.05 over {gate}" in text and "photos_skimage" in text


def test_gate_spec_roundtrip_is_exact():
    b = load_bundle()
    assert b.gate is not None
    again = parse_manifest(b.to_json(), b.path)
    assert again == b and again.to_json() == b.to_json()
    assert json.loads((b.path / "manifest.json").read_text())["gate"] == b.gate.to_json()


def test_exporter_gate_choice_keeps_the_far_ood_catch_then_makes_fewest_wrong_decisions():
    """select_gate on scores built so that the answer is known: `far` and `err` both catch every far-OOD
    sample, `far`'s in-distribution ignores hit right predictions, `err`'s hit wrong ones; `weak` makes the
    fewest wrong decisions of all but misses far-OOD, so it must never win."""
    from edge_quq_export.detectors import select_gate

    g = np.random.default_rng(3)
    n = 4000
    correct = g.random(n) > 0.1
    rule_keep = np.ones(n, bool)
    noise = g.normal(size=n)
    cal = {"far": noise, "err": np.where(correct, 0.0, 3.0) + 0.1 * noise, "weak": np.where(correct, 0.0, 5.0) + noise}
    ood = {"photos": {"far": np.full(200, 50.0), "err": np.full(200, 50.0), "weak": np.zeros(200)}}
    names, val = select_gate(cal, ood, 0.05, "bonferroni", 0, rule_keep, correct, max_size=2)
    assert names == ["err"], val
    assert val["chosen"]["photos"] == 1.0 and val["chosen"]["id_wrong_decisions"] < val["single_detectors"]["far"]["id_wrong_decisions"]
    assert {"id_ignored_with_rule", "id_error_kept", "id_wrong_decisions"} <= set(val["chosen"])


def test_exporter_validation_holds_generated_glyphs_the_fine_tune_never_saw():
    """The gate validation's `glyphs` set comes from the outlier-exposure generator with another seed: glyph-like
    inputs that no far-OOD set of formulas or photographs stands for, and none of them a training outlier."""
    pytest.importorskip("matplotlib")
    from edge_quq.preprocess import preprocess_image
    from edge_quq_export.detectors import ood_validation_sets, validation_glyphs
    from edge_quq_export.outlier_exposure import outlier_pool

    bundle = load_bundle()
    sets = ood_validation_sets(bundle, 0, count=20)
    raw = validation_glyphs(20, 0)
    # the set is these images, and none of them is among the fine-tune's outliers
    assert np.array_equal(sets["glyphs"], np.stack([preprocess_image(im, bundle.input.preprocess, "rgb") for im in raw]))
    trained = {img.tobytes() for img in outlier_pool(1000)}
    assert trained.isdisjoint(img.tobytes() for img in raw)


def _z_case(n: int = 6000, wrong: float = 0.1, seed: int = 5):
    """Two classes where the answer is known: a sample's interval (0.9 and 0.1 ± z·s) stays clear of the
    0.5 threshold, and the rule keeps it, exactly while z < 0.4 / s. Right samples have s = 0.1 (kept over
    the whole grid); wrong ones s = 0.4 / z_i, z_i uniform on (0.5, 2.2), so they leave as z grows."""
    g = np.random.default_rng(seed)
    bad = g.random(n) < wrong
    s = np.where(bad, 0.4 / g.uniform(0.5, 2.2, n), 0.1)
    mean = np.stack([np.full(n, 0.9), np.full(n, 0.1)], 1)
    return mean, np.stack([s, s], 1), np.where(bad, 1, 0), g.random(n) < 0.03


def test_default_z_is_the_smallest_certified_z_and_its_bounds_match_scipy():
    from scipy.stats import beta, binom

    from edge_quq_export.detectors import choose_default_z

    mean, std, y, gate = _z_case()
    z, rec = choose_default_z(mean, std, y, gate, 0.5, "ignore", 0.05, target=0.05, budget=0.2)
    rows = {r["z"]: r for r in rec["table"]}
    assert rec["certified"] and rec["z"] == z and rec["choice"] == "certified"
    for r in rows.values():  # the records are what a library computes from the same counts
        assert r["kept"] == int(np.count_nonzero(~gate & (0.4 / std[:, 0] > r["z"])))
        assert r["p_value"] == pytest.approx(binom.cdf(r["errors"], r["kept"], 0.05), rel=1e-9, abs=1e-300)
        assert r["upper_bound"] == pytest.approx(beta.ppf(0.95, r["errors"] + 1, r["kept"] - r["errors"]), abs=1e-4)
    above = [r for r in rows.values() if r["z"] >= z and r["ignored"] <= 0.2]
    assert above and all(r["p_value"] <= 0.05 for r in above)
    below = [r for r in rows.values() if r["z"] < z]
    assert below and max(below, key=lambda r: r["z"])["p_value"] > 0.05  # the sequence stopped there


def test_default_z_without_a_certificate_spends_the_ignore_budget_or_takes_the_narrowest():
    from edge_quq_export.detectors import choose_default_z

    mean, std, y, gate = _z_case()
    z, rec = choose_default_z(mean, std, y, gate, 0.5, "ignore", 0.05, target=0.001, budget=0.2)
    within = [r["z"] for r in rec["table"] if r["ignored"] <= 0.2]
    assert not rec["certified"] and z == max(within) and rec["choice"].startswith("not certified: widest")
    z, rec = choose_default_z(mean, std, y, gate, 0.5, "ignore", 0.05, budget=0.0)
    assert not rec["certified"] and z == min(r["z"] for r in rec["table"]) and "narrowest" in rec["choice"]


def test_shipped_bundle_default_z_was_certified_on_its_calibration_data():
    b = load_bundle()
    zc = b.gate.validation["default_z"]
    assert zc["certified"] and b.decision.z == zc["z"] and zc["samples"] == b.gate.calibration["samples"]
    row = next(r for r in zc["table"] if r["z"] == zc["z"])
    assert row["upper_bound"] <= zc["error_target"] and row["ignored"] <= zc["ignore_budget"]
    text = run("info").stdout
    assert f"z {zc['z']:g} chosen on the calibration data, certified" in text


def test_real_handwritten_digits_are_ignored_by_default():
    """scikit-learn's real handwritten digits through the default decision; no step of the export saw them.
    A floor below what was measured: the embedded bundle (outlier-exposure model) ignores 99.0% (full frame)
    and 99.9% (centred); the base model's bundle ignored 79% and 74% (bench/results/digits.md)."""
    from edge_quq.predictor import Predictor
    from edge_quq_export.datasets import DIGIT_LAYOUTS, real_handwritten_digits

    p = Predictor.from_bundle(seed=0)
    for layout in DIGIT_LAYOUTS:
        images, labels = real_handwritten_digits(layout)
        assert len(images) == len(labels) == 1797 and images[0].shape == (28, 28) and images[0].dtype == np.uint8
        assert set(labels.tolist()) == set(range(10))
        ignored = np.mean([r.decision == "ignore" for r in p.iter_predict(images, batch_size=256)])
        assert ignored > 0.97, (layout, ignored)
    centred, _ = real_handwritten_digits("centred")
    assert not centred[0][:4].any() and not centred[0][:, :4].any()  # MNIST's empty 4-pixel margin
