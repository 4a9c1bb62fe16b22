"""Calibration: fake-quant PTQ simulation, temperature fit, temperature in the manifest and in every sampler,
and the report command end to end on the tiny model."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_quq.bundle import load_bundle, set_calibration
from edge_quq.calibration import binary_nll, calibration_summary, fit_temperature, softmax_nll
from edge_quq.errors import BundleError, OptionError
from edge_quq.head import HeadWeights, load_head_weights, softmax


# --- fake quantization ------------------------------------------------------------------------------------

def test_weight_quantization_by_hand():
    from edge_quq_export.fakequant import quantize_weights_per_channel

    w = np.array([[0.5, -1.0], [0.2, 0.3]], np.float32)  # [in, out]: channels are columns
    # 4 bits: qmax 7. Column 0: scale 0.5/7, 0.2 -> 2.8 -> 3. Column 1: scale 1/7, 0.3 -> 2.1 -> 2.
    want = np.array([[0.5, -1.0], [3 * 0.5 / 7, 2 / 7]], np.float32)
    np.testing.assert_allclose(quantize_weights_per_channel(w, 4), want, rtol=1e-6)
    # 2 bits: qmax 1, every weight becomes 0 or +-max of its channel.
    np.testing.assert_allclose(quantize_weights_per_channel(w, 2), [[0.5, -1.0], [0.0, 0.0]], rtol=1e-6)
    # an all-zero channel stays zero (no division by a zero scale)
    np.testing.assert_array_equal(quantize_weights_per_channel(np.zeros((3, 2), np.float32), 8), 0.0)


def test_activation_quantization_by_hand():
    from edge_quq_export.fakequant import activation_qparams, fake_quant_activation

    scale, zp = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255.0) and zp == 64  # round(255 / 4 = 63.75)
    out = fake_quant_activation(np.array([1.0, 5.0, -2.0, 0.0]), scale, zp)
    # 1.0 -> round(63.75) + 64 = 128 -> 64 steps; 5.0 clips at 255; -2.0 clips at 0; 0 is exact.
    np.testing.assert_allclose(out, [64 * 4 / 255, 191 * 4 / 255, -64 * 4 / 255, 0.0], rtol=1e-6)
    # a range that excludes 0 is widened to contain it, so that zero padding stays exact
    assert activation_qparams(2.0, 4.0) == (pytest.approx(4.0 / 255.0), 0)


@pytest.fixture(scope="module")
def small_dense_model():
    pytest.importorskip("tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, name="d0")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    out = keras.layers.Dense(2, activation="sigmoid", name="out")(h)
    m = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    bn = m.get_layer("bn")
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(0, 0.3, 4), rng.normal(0, 0.5, 4), rng.uniform(0.5, 2, 4)])
    return m


def test_fake_quant_model_matches_numpy_by_hand(small_dense_model):
    from edge_quq_export.fakequant import FakeQuantModel, activation_qparams, fake_quant_activation, quantize_weights_per_channel

    m = small_dense_model
    rng = np.random.default_rng(2)
    xc = rng.normal(size=(64, 3)).astype(np.float32)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    fq = FakeQuantModel(m)
    d = fq.describe()
    assert d["folded_batchnorm"] == {"bn": "d0"} and d["output_activation"] == "sigmoid"
    assert d["quantized_tensors"] == ["input", "relu", "out"]  # d0 and bn fuse into relu; dropout passes through

    # float path reproduces the model (the sigmoid split off)
    fq.set_activation_ranges(xc)
    zf = fq.logits(x, None, quantize_activations=False)
    np.testing.assert_allclose(1 / (1 + np.exp(-zf)), m.predict(x, verbose=0), atol=1e-5)

    # numpy reference: fold BN, quantize weights to 5 bits, 8-bit activations on calibrated ranges
    (k0, b0), (g, beta, mu, var), (k1, b1) = (m.get_layer(n).get_weights() for n in ("d0", "bn", "out"))
    s = g / np.sqrt(var + m.get_layer("bn").epsilon)
    kf, bf = k0 * s, (b0 - mu) * s + beta

    def ref(inp, bits, ranges):
        def aq(v, r):
            sc, zp = activation_qparams(*r)
            return fake_quant_activation(v, sc, zp)

        a = aq(inp, ranges[0])
        h = aq(np.maximum(a @ quantize_weights_per_channel(kf, bits) + bf, 0), ranges[1])
        return aq(h @ quantize_weights_per_channel(k1, bits) + b1, ranges[2])

    hc = np.maximum(xc @ kf + bf, 0)
    zc = hc @ k1 + b1
    ranges = [(xc.min(), xc.max()), (hc.min(), hc.max()), (zc.min(), zc.max())]
    np.testing.assert_allclose(fq.logits(x, 5), ref(x, 5, ranges), atol=1e-5)
    # the source model is untouched
    np.testing.assert_allclose(m.get_layer("d0").get_weights()[0], k0)


def test_fake_quant_folds_depthwise_and_conv_bn_and_splits_softmax():
    pytest.importorskip("tensorflow")
    import keras

    from edge_quq_export.fakequant import FakeQuantModel

    keras.utils.set_random_seed(2)
    inp = keras.Input((6, 6, 2))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, padding="same", name="dw")(inp)
    h = keras.layers.BatchNormalization(name="bn_dw")(h)
    h = keras.layers.ReLU(name="r0")(h)
    h = keras.layers.Conv2D(3, 1, name="pw")(h)
    h = keras.layers.BatchNormalization(name="bn_pw")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(h)
    m = keras.Model(inp, out)
    rng = np.random.default_rng(4)
    for name, c in (("bn_dw", 4), ("bn_pw", 3)):  # non-trivial statistics, different per channel
        m.get_layer(name).set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c), rng.uniform(0.3, 3, c)])
    x = rng.normal(size=(16, 6, 6, 2)).astype(np.float32)
    fq = FakeQuantModel(m)
    d = fq.describe()
    assert d["folded_batchnorm"] == {"bn_dw": "dw", "bn_pw": "pw"} and d["output_activation"] == "softmax"
    assert d["quantized_tensors"] == ["input", "r0", "bn_pw", "gap", "out"]
    fq.set_activation_ranges(x)
    # folding alone (float weights, no activation quantization) reproduces the model
    z = fq.logits(x, None, quantize_activations=False)
    np.testing.assert_allclose(softmax(z.astype(np.float64)), m.predict(x, verbose=0), atol=1e-5)
    # 8-bit weights and activations stay close; 2-bit weights do not
    p8 = softmax(fq.logits(x, 8).astype(np.float64))
    assert np.abs(p8 - m.predict(x, verbose=0)).max() < 0.05
    assert np.abs(softmax(fq.logits(x, 2).astype(np.float64)) - p8).max() > np.abs(p8 - m.predict(x, verbose=0)).max()


# --- temperature fit --------------------------------------------------------------------------------------

def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, c, t0 = 20000, 6, 2.0
    z = rng.normal(0, 2.5, (n, c))
    p = softmax(z)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)  # y ~ Categorical(p): z is calibrated
    # softmax head: the model reports z * t0 (overconfident) -> T = t0
    assert fit_temperature(z * t0, y, "softmax") == pytest.approx(t0, rel=0.05)
    # sigmoid head: per-class logits logit(p_c) are calibrated for "class c is the label"; reported x 1/t1
    s = np.log(p) - np.log1p(-p)
    t1 = 0.5
    assert fit_temperature(s * t1, y, "sigmoid") == pytest.approx(t1, rel=0.05)
    # the fitted T minimises the objective
    t = fit_temperature(s * t1, y, "sigmoid")
    assert binary_nll(s * t1, y, t) <= min(binary_nll(s * t1, y, t * 1.05), binary_nll(s * t1, y, t / 1.05))
    assert softmax_nll(z, y, 1.0) < softmax_nll(z * t0, y, 1.0)
    summ = calibration_summary(z * t0, y, "softmax", 1.0)
    assert summ["ece"] > calibration_summary(z * t0, y, "softmax", t0)["ece"]
    with pytest.raises(OptionError, match="labels"):
        fit_temperature(z, np.full(n, 9), "softmax")
    with pytest.raises(OptionError, match="sigmoid or softmax"):
        fit_temperature(z, y, "linear")


# --- the manifest field -------------------------------------------------------------------------------------

@pytest.fixture()
def bundle_copy(tmp_path, tiny_bundle) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _write_calibration(folder: Path, value) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["calibration"] = value
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("value, needle", [
    ({"temperature": -1.0}, "must be a finite number > 0, got -1.0"),
    ({"temperature": 0}, "must be a finite number > 0, got 0"),
    ({"temperature": "hot"}, "got 'hot'"),
    ({"temperature": True}, "got True"),
    ({"temperature": float("nan")}, "got nan"),
    ([1.5], "calibration must be an object"),
])
def test_bad_temperature_is_refused_with_one_line(bundle_copy, value, needle):
    _write_calibration(bundle_copy, value)
    with pytest.raises(BundleError, match="calibration") as e:
        load_bundle(bundle_copy)
    assert needle in str(e.value) and "\n" not in str(e.value) and "manifest.json" in str(e.value)


def test_temperature_field_is_optional_and_settable(bundle_copy):
    assert load_bundle(bundle_copy).temperature == 1.0  # old bundles: no field, T = 1
    b = set_calibration(bundle_copy, {"temperature": 1.5, "note": "x"})
    assert b.temperature == 1.5 and load_head_weights(b).temperature == 1.5
    with pytest.raises(BundleError, match="finite number > 0"):
        set_calibration(bundle_copy, {"temperature": -2})
    assert load_bundle(bundle_copy).temperature == 1.5  # a refused value is never written
    assert set_calibration(bundle_copy, None).temperature == 1.0


def test_set_temperature_command(bundle_copy, tiny_data_files, capsys):
    from edge_quq_export.calibration import main

    assert main(["set-temperature", str(bundle_copy), "--value", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "calibration.temperature must be a finite number > 0" in err and "\n" not in err
    assert main(["set-temperature", str(bundle_copy)]) == 2
    assert "exactly one of" in capsys.readouterr().err
    _, test = tiny_data_files
    assert main(["set-temperature", str(bundle_copy), "--fit-data", str(test), "--samples", "400"]) == 0
    out = capsys.readouterr().out
    cal = load_bundle(bundle_copy).manifest["calibration"]
    assert 0.05 < cal["temperature"] < 20 and cal["samples"] == 400 and "ECE" in out
    assert cal["heldout"]["nll_after"] <= cal["heldout"]["nll_before"] + 1e-9


def test_set_temperature_on_a_gated_bundle_says_the_risk_table_is_stale(tmp_path, capsys):
    import shutil

    from edge_quq.bundle import DEFAULT_BUNDLE_DIR
    from edge_quq_export.calibration import main

    root = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, root)
    assert main(["set-temperature", str(root), "--value", "1.3"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "re-run fit-detectors" in err and err.count("\n") == 1
    assert load_bundle(root).temperature == 1.3 and load_bundle(root).gate is not None


# --- every sampler applies it the same way ----------------------------------------------------------------------

def _folded(head: HeadWeights, t: float) -> HeadWeights:
    """The reference: T folded into the last layer, temperature 1."""
    k = list(head.kernels)
    b = list(head.biases)
    k[-1] = k[-1] / np.float32(t)
    b[-1] = b[-1] / np.float32(t)
    return HeadWeights(kernels=tuple(k), biases=tuple(b), rates=head.rates, activation=head.activation)


def test_every_sampler_applies_the_temperature(bundle_copy):
    from edge_quq.samplers import make_sampler
    from edge_quq.samplers.base import draw_keep_masks

    t = 2.5
    b = set_calibration(bundle_copy, {"temperature": t})
    head = load_head_weights(b)
    ref_head = _folded(head, t)
    x = np.abs(np.random.default_rng(3).normal(1.0, 1.0, head.feature_size)).astype(np.float32)
    masks = draw_keep_masks(np.random.default_rng(7), head, 64)
    want = make_sampler("numpy", ref_head).sample_with_masks(x, masks)
    # probabilities are tempered; logits stay raw
    np.testing.assert_allclose(want.logits * t, head.logits(x[None])[0], rtol=1e-5, atol=1e-5)

    def same(got, tol=1e-5):
        np.testing.assert_allclose(got.mean, want.mean, atol=tol)
        np.testing.assert_allclose(got.std, want.std, atol=tol)
        np.testing.assert_allclose(got.deterministic, want.deterministic, atol=tol)
        np.testing.assert_allclose(got.logits, want.logits * t, rtol=1e-4, atol=1e-4)
        assert got.expected_entropy == pytest.approx(want.expected_entropy, abs=1e-4)

    same(make_sampler("numpy", head).sample_with_masks(x, masks))
    from edge_quq.samplers import native as sampler_native

    if sampler_native.available():
        same(make_sampler("native", head).sample_with_masks(x, masks))
    # exported heads: same seed, same masks as the numpy sampler
    ref_seeded = make_sampler("numpy", ref_head, seed=11).sample(x, 32)
    for kind in ("tflite", "onnx"):
        got = make_sampler(kind, head, seed=11, bundle=b).sample(x, 32)
        np.testing.assert_allclose(got.mean, ref_seeded.mean, atol=1e-5)
        np.testing.assert_allclose(got.std, ref_seeded.std, atol=1e-5)
        np.testing.assert_allclose(got.deterministic, ref_seeded.deterministic, atol=1e-5)
    # closed form: exactly the folded head's
    a, a_ref = make_sampler("analytic", head).sample(x, 0), make_sampler("analytic", ref_head).sample(x, 0)
    np.testing.assert_allclose(a.mean, a_ref.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.std, a_ref.std, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.deterministic, a_ref.deterministic, rtol=1e-5, atol=1e-7)
    assert a.expected_entropy == pytest.approx(a_ref.expected_entropy, rel=1e-6)
    # and T really changes the output
    assert not np.allclose(make_sampler("numpy", load_head_weights(load_bundle(b.path)), seed=1).sample(x, 8).deterministic,
                           HeadWeights(head.kernels, head.biases, head.rates, head.activation).probs(x[None])[0])


def test_exported_head_without_logits_output_is_refused_with_a_temperature(bundle_copy):
    from edge_quq.samplers.exported import _check_temperature

    head = load_head_weights(set_calibration(bundle_copy, {"temperature": 2.0}))
    with pytest.raises(OptionError, match="no 'logits' output"):
        _check_temperature(head, False, "onnx")
    _check_temperature(head, True, "onnx")


def test_predictor_reports_the_temperature(bundle_copy):
    from edge_quq import Predictor

    set_calibration(bundle_copy, {"temperature": 2.0})
    img = np.full((28, 28), 128, np.uint8)
    r2 = Predictor.from_bundle(bundle_copy, sampler="numpy", seed=0).predict(img)
    set_calibration(bundle_copy, None)
    r1 = Predictor.from_bundle(bundle_copy, sampler="numpy", seed=0).predict(img)
    assert r2.settings["temperature"] == 2.0 and r1.settings["temperature"] == 1.0
    z = np.asarray(r1.scores["energy"])  # logit-based scores do not move with T
    assert r2.scores["energy"] == pytest.approx(float(z), rel=1e-5)
    p1, p2 = np.asarray(r1.deterministic), np.asarray(r2.deterministic)
    assert np.argmax(p1) == np.argmax(p2) and not np.allclose(p1, p2)


# --- the report and the exporter option --------------------------------------------------------------------------

def test_report_command_writes_everything(tmp_path, tiny_model_path, tiny_bundle, capsys):
    pytest.importorskip("matplotlib")
    from edge_quq_export.quant_report import main

    out = tmp_path / "rep"
    rc = main(["--model", str(tiny_model_path), "--bundle", str(tiny_bundle), "--out", str(out),
               "--bits", "8,4", "--test-samples", "300", "--temperature-samples", "300", "--quant-batches", "2",
               "--batch-size", "32"])
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert names == {"calibration.json", "calibration.md", "reliability.png", "swapped_confidence.png",
                     "precision_trend.png", "temperature.png"}
    r = json.loads((out / "calibration.json").read_text())
    assert list(r["columns"]) == ["float", "W8A8", "W4A8", "int8 TFLite (bundle)"]
    for name, c in r["columns"].items():
        assert set(c["before"]) >= {"top1", "ece", "nll", "binary_nll"} and "after" in c
        assert sum(c["reliability_before"]["count"]) == 300
        if name != "float":
            s = c["vs_float"]
            assert sum(s["hist_swapped"]) == s["swapped_count"] and sum(s["hist_all"]) == 300
            assert s["delta_error_pp"] == pytest.approx(s["error_pct"] - s["error_float_pct"])
    assert r["temperature"]["float"]["temperature"] > 0 and "int8_tflite" in r["temperature"]
    md = (out / "calibration.md").read_text()
    assert "swapped" in md and "![reliability.png](reliability.png)" in md
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # bad input: one line, nothing written
    bad = tmp_path / "bad"
    assert main(["--model", str(tmp_path / "none.keras"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not found" in err and "\n" not in err and not bad.exists()
    assert main(["--model", str(tiny_model_path), "--out", str(bad), "--bits", "8,1"]) == 2
    assert "--bits" in capsys.readouterr().err and not bad.exists()
    # the report's old command name and option names still run it
    from edge_quq_export.calibration import main as old_main

    assert old_main(["report", "--model", str(tiny_model_path), "--out", str(bad), "--calib-batches", "1", "--bits", "8,1"]) == 2
    assert "--bits" in capsys.readouterr().err and not bad.exists()


def test_exporter_fits_a_temperature(tmp_path, tiny_model_path, tiny_data_files):
    from edge_quq.errors import ExportError
    from edge_quq_export.pipeline import ExportOptions, export_model

    calib, test = tiny_data_files
    with np.load(test) as f:
        xv, yv = f["x"][:400], f["y"][:400]
    with pytest.raises(ExportError, match="needs labels"):
        export_model(tiny_model_path, ExportOptions(calibration=calib, out=tmp_path / "no", temperature_data=xv))
    assert not (tmp_path / "no").exists()
    b = export_model(tiny_model_path, ExportOptions(calibration=calib, out=tmp_path / "b", temperature_data=xv,
                                                    temperature_labels=yv, temperature_source="test slice"))
    cal = b.manifest["calibration"]
    assert b.temperature == cal["temperature"] and cal["samples"] == 400 and cal["fitted_on"] == "test slice"
    assert math.isfinite(cal["heldout"]["ece_after"])
