"""Host-side export: real converters (TFLite, tf2onnx + onnxruntime quantization), real runtimes
(ai_edge_litert, onnxruntime), real Fashion-MNIST images. The tiny model is trained once per session
(tests/conftest.py).

Tolerances, and why:
- int8 backbone features vs the float Keras backbone: cosine mean > 0.995 and min > 0.98 per sample (measured on
  the tiny model: TFLite mean 0.9997 / min 0.999, ONNX mean 0.9996 / min 0.999).
- numpy head on float features vs the Keras model in eval mode: max |dp| < 1e-5 (float32 rounding only).
- exported TFLite/ONNX heads vs numpy HeadWeights with the same masks: max |d| < 1e-5 (measured ~1e-7).
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_quq.bundle import MANIFEST_NAME, load_bundle, sha256_file
from edge_quq.errors import ExportError
from edge_quq.head import load_head_weights

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytest.importorskip("ai_edge_litert")

# Keras internals warn about numpy 2's copy keyword and about calling a named-input model with a tensor.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore:The structure of `inputs`")]

COS_MEAN, COS_MIN = 0.995, 0.98
HEAD_TOL = 1e-5


def _runner():
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart by default


def _float_inputs(x_uint8: np.ndarray) -> np.ndarray:
    return x_uint8[..., None].astype(np.float32) / 255.0


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


@pytest.fixture(scope="module")
def keras_model(tiny_model_path):
    import keras

    return keras.models.load_model(tiny_model_path, compile=False)


@pytest.fixture(scope="module")
def float_feats(keras_model, fashion_small):
    from edge_quq_export.split import find_split

    x = _float_inputs(fashion_small[2][:300])
    split = find_split(keras_model)
    return x, np.asarray(split.backbone(x, training=False)), np.asarray(keras_model(x, training=False))


# --- the bundle ---------------------------------------------------------------------------------------

def test_manifest_validates_and_every_file_is_checksummed(tiny_bundle):
    b = load_bundle(tiny_bundle)  # parses and verifies sizes and sha256
    on_disk = sorted(p.name for p in tiny_bundle.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(b.files) == on_disk
    for name, entry in b.files.items():
        assert sha256_file(tiny_bundle / name) == entry["sha256"]
        assert (tiny_bundle / name).stat().st_size == entry["bytes"]
    assert {"backbone_int8.tflite", "backbone_int8.onnx", "head.npz", "head_f32.tflite", "head_f32.onnx", "parity.json", "parity.md"} <= set(b.files)
    assert b.split_layer == "head_dropout0"
    assert [(l.dropout, l.units, l.activation) for l in b.head.layers] == [(0.2, 32, "relu"), (0.4, 10, "sigmoid")]
    assert b.head.mask_inputs == ("mask0", "mask1")
    assert b.classes[0] == "T-shirt/top" and b.input.shape == (28, 28, 1)
    d = b.decision
    assert (d.threshold, d.num_iter, d.z, d.mixed) == (0.5, 50, 0.8, "ignore")
    assert not list(tiny_bundle.parent.glob(".*tmp-*"))


def test_default_bundle_manifest_round_trips():
    """Writing the embedded bundle's manifest back from its parsed dataclasses gives the same JSON, byte for byte."""
    from edge_quq.bundle import DEFAULT_BUNDLE_DIR, parse_manifest

    text = (DEFAULT_BUNDLE_DIR / MANIFEST_NAME).read_text(encoding="utf-8")
    b = load_bundle()
    assert b.to_json() == json.loads(text)
    assert json.dumps(b.to_json(), indent=2) + "\n" == text
    assert parse_manifest(b.to_json(), b.path) == b
    assert b.manifest is not b.manifest  # a fresh copy each time: editing it cannot change the bundle
    b.manifest["detectors"]["tpr"] = 0.5
    assert b.extra["detectors"]["tpr"] == 0.95


def test_every_manifest_dataclass_round_trips(tmp_path):
    from dataclasses import replace

    from edge_quq.bundle import (DecisionDefaults, GateSpec, HeadLayer, HeadSpec, InputSpec, ModelFile, Preprocess,
                                 QuantParams, parse_manifest, write_manifest)
    from edge_quq.errors import BundleError

    for q in (QuantParams("int8", 0.0123, -7), QuantParams("uint8", 0.5, 128), QuantParams("float32")):
        assert QuantParams.from_json(q.to_json(), "q") == q
    pre = Preprocess("rgb", (32, 48), "cubic", 0.875, 1.0, (0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    spec = InputSpec((32, 48, 3), pre)
    assert InputSpec.from_json(spec.to_json(), "i") == spec
    mf = ModelFile("b.onnx", QuantParams("float32"), QuantParams("float32"))
    assert ModelFile.from_json(mf.to_json(), "m") == mf and "input_name" not in mf.to_json()
    head = HeadSpec("h.npz", (HeadLayer("dense0", 0.3, 5, "softmax"),), 7, tflite_int8="h8.tflite", extra={"note": [1, 2]})
    assert HeadSpec.from_json(head.to_json(), "h") == head
    dd = DecisionDefaults(0.6, 20, 1.1, "keep")
    assert DecisionDefaults.from_json(dd.to_json()) == dd
    b = replace(load_bundle(), path=tmp_path, input=spec, backbone_tflite=None, backbone_onnx=mf, split_layer="", head=head,
                classes=tuple("abcde"), decision=dd, calibration={"temperature": 1.25, "how": "x"}, extra={}, key_order=(),
                gate=None)
    gate = load_bundle().gate
    assert gate is not None and GateSpec.from_json(gate.to_json(), "g") == gate
    b.files = {f: {"sha256": "0" * 64, "bytes": 0} for f in ("b.onnx", "h.npz", "h8.tflite")}
    assert parse_manifest(b.to_json(), tmp_path) == b and b.temperature == 1.25
    with pytest.raises(ValueError, match="overwrite"):
        replace(b, extra={"head": {}}).to_json()
    # the writer refuses a bundle the reader would refuse, and writes nothing
    with pytest.raises(BundleError, match="linear"):
        write_manifest(tmp_path, replace(b, head=replace(head, layers=(HeadLayer("dense0", 0.3, 5, "linear"),))))
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_exported_manifest_is_written_from_the_bundle_dataclasses(tiny_bundle):
    from edge_quq.bundle import FORMAT_NAME, SCHEMA_VERSION, parse_manifest

    text = (tiny_bundle / MANIFEST_NAME).read_text()
    b = load_bundle(tiny_bundle)
    assert json.dumps(b.to_json(), indent=2) + "\n" == text  # writing the parsed bundle back changes nothing
    assert parse_manifest(b.to_json(), b.path) == b
    m = json.loads(text)
    assert (m["format"], m["schema_version"]) == (FORMAT_NAME, SCHEMA_VERSION)
    assert list(m)[:5] == ["format", "schema_version", "name", "created", "producer"] and list(m)[-1] == "files"
    assert m["head"]["keras_layers"] == ["head_dropout0", "head_dense0", "head_dropout1", "head_out"]


def test_quant_params_in_manifest_are_the_models_own(tiny_bundle):
    from ai_edge_litert.interpreter import Interpreter

    b = load_bundle(tiny_bundle)
    it = Interpreter(model_path=str(b.file(b.backbone_tflite.file)))
    din, dout = it.get_input_details()[0], it.get_output_details()[0]
    assert din["dtype"] == np.int8 and dout["dtype"] == np.int8
    assert (b.backbone_tflite.input.scale, b.backbone_tflite.input.zero_point) == pytest.approx(din["quantization"])
    assert (b.backbone_tflite.output.scale, b.backbone_tflite.output.zero_point) == pytest.approx(dout["quantization"])
    assert (din["name"], dout["name"]) == (b.backbone_tflite.input_name, b.backbone_tflite.output_name) == ("image", "features")


def test_int8_backbones_match_float_features(tiny_bundle, float_feats):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from edge_quq.preprocess import dequantize, quantize

    x, ff, _ = float_feats
    b = load_bundle(tiny_bundle)
    it = Interpreter(model_path=str(b.file(b.backbone_tflite.file)))
    it.resize_tensor_input(it.get_input_details()[0]["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], quantize(x, b.backbone_tflite.input))
    it.invoke()
    f_tfl = dequantize(it.get_tensor(it.get_output_details()[0]["index"]), b.backbone_tflite.output)
    sess = ort.InferenceSession(str(b.file(b.backbone_onnx.file)), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["features"]
    assert any(n.op_type == "QuantizeLinear" for n in __import__("onnx").load(str(b.file(b.backbone_onnx.file))).graph.node)
    f_onnx = sess.run(None, {"image": x})[0]
    for name, f in (("tflite", f_tfl), ("onnx", f_onnx)):
        assert f.shape == ff.shape, name
        c = _cos(ff, f)
        assert c.mean() > COS_MEAN and c.min() > COS_MIN, (name, c.mean(), c.min())


def test_head_weights_reproduce_the_float_model(tiny_bundle, float_feats):
    _, ff, probs = float_feats
    head = load_head_weights(load_bundle(tiny_bundle))
    np.testing.assert_allclose(head.probs(ff), probs, atol=HEAD_TOL, rtol=0)


@pytest.mark.parametrize("t", [1, 7, 51])
def test_exported_heads_equal_numpy_head_with_same_masks(tiny_bundle, float_feats, t):
    from edge_quq_export.parity import random_masks, run_head_model

    _, ff, _ = float_feats
    head = load_head_weights(load_bundle(tiny_bundle))
    feats = np.ascontiguousarray(ff[np.arange(t) % len(ff)])
    masks = random_masks(head, t, seed=t)
    want = head.probs(feats, masks)
    for kind in ("tflite", "onnx"):
        got = run_head_model(kind, tiny_bundle / f"head_f32.{kind}", feats, masks)
        np.testing.assert_allclose(got, want, atol=HEAD_TOL, rtol=0, err_msg=kind)
    # Masks equal to the keep probability give the eval-mode output (the runtime's row 0).
    keep = [np.full_like(m, 1.0 - r) for m, r in zip(masks, head.rates)]
    np.testing.assert_allclose(run_head_model("onnx", tiny_bundle / "head_f32.onnx", feats, keep), head.probs(feats), atol=HEAD_TOL, rtol=0)


def test_exported_heads_name_their_tensors(tiny_bundle):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(tiny_bundle / "head_f32.tflite"))
    assert sorted(d["name"] for d in it.get_input_details()) == ["features", "mask0", "mask1"]
    assert sorted(d["name"] for d in it.get_output_details()) == ["logits", "probs"]
    assert all(d["shape_signature"][0] == -1 for d in it.get_input_details())
    sess = ort.InferenceSession(str(tiny_bundle / "head_f32.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["features", "mask0", "mask1"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"]


def test_parity_report_records_accuracy_and_sizes(tiny_bundle):
    b = load_bundle(tiny_bundle)
    rep = json.loads((tiny_bundle / "parity.json").read_text())
    assert rep["samples"] == 1000 and rep["labels"]
    acc = b.manifest["accuracy"]
    assert acc["float"] == rep["float"]["top1_accuracy"] > 0.5  # a real (tiny) classifier, not chance
    for k in ("tflite", "onnx"):
        r = rep["int8"][k]
        assert abs(r["top1_accuracy"] - acc["float"]) < 0.03, (k, r["top1_accuracy"], acc["float"])
        assert r["top1_agreement"] > 0.95 and r["feature_cosine_min"] > COS_MIN
        assert rep["exported_head_vs_numpy_max_abs"][k] < HEAD_TOL
    assert rep["head_reproduction_max_abs"] < HEAD_TOL
    assert rep["size_reduction_factor"]["tflite"] > 1.5
    assert "| int8 tflite |" in (tiny_bundle / "parity.md").read_text()


# --- split ---------------------------------------------------------------------------------------------

def _model(kind: str):
    import keras

    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if kind == "no_dense":
        return keras.Model(inp, x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    if kind == "no_dropout":
        x = keras.layers.Dense(6, activation="relu", name="d0")(x)
        return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="d1")(x))
    if kind == "separate_activation":
        x = keras.layers.Dropout(0.3, name="drop")(x)
        x = keras.layers.Dense(6, name="d0")(x)
        x = keras.layers.ReLU(name="r0")(x)
        x = keras.layers.Dense(3, name="d1")(x)
        return keras.Model(inp, keras.layers.Activation("softmax", name="sm")(x))
    if kind == "tanh":
        x = keras.layers.Dropout(0.3, name="drop")(x)
        x = keras.layers.Dense(6, activation="tanh", name="d0")(x)
        return keras.Model(inp, keras.layers.Dense(3, activation="sigmoid", name="d1")(x))
    raise AssertionError(kind)


def test_split_variants():
    from edge_quq_export.split import find_split

    s = find_split(_model("separate_activation"))
    assert s.split_layer == "drop" and [(b.dropout, b.activation) for b in s.blocks] == [(0.3, "relu"), (0.0, "softmax")]
    assert s.blocks[0].keras_layers == ["d0", "r0"]
    s = find_split(_model("no_dropout"), dropout=[0.2, 0.4])
    assert s.split_layer == "d0" and [b.dropout for b in s.blocks] == [0.2, 0.4] and s.dropout_from_option
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype(np.float32)
    m = _model("separate_activation")
    s = find_split(m, split_layer="d0", dropout=[0.25, 0.0])  # the Dropout stays in the backbone (identity in eval mode)
    assert s.split_layer == "d0" and [b.dropout for b in s.blocks] == [0.25, 0.0]
    np.testing.assert_allclose(s.head_weights().probs(np.asarray(s.backbone(x))), np.asarray(m(x)), atol=1e-5)


@pytest.mark.parametrize("kind,kwargs,needle", [
    ("no_dense", {}, "does not end in a Dense classification head"),
    ("no_dropout", {}, "--dropout"),
    ("tanh", {}, "only relu"),
    ("no_dropout", {"dropout": [0.5]}, "gives 1 rates but the head has 2"),
    ("separate_activation", {"split_layer": "nope"}, "split layer 'nope' does not exist"),
    ("separate_activation", {"split_layer": "gap"}, "must be Dropout/Dense/Activation only"),
    ("separate_activation", {"split_layer": "d0"}, "every head dropout rate is 0"),
])
def test_split_refuses_unusable_heads(kind, kwargs, needle):
    from edge_quq_export.split import find_split

    with pytest.raises(ExportError, match=needle.replace("(", r"\(")):
        find_split(_model(kind), **kwargs)


# --- the command and its failures -----------------------------------------------------------------------

def _invoke(args):
    from edge_quq_export.cli import export_cmd

    return _runner().invoke(export_cmd, [str(a) for a in args])


def _assert_one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]


def _leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def bad_inputs(tmp_path, tiny_model_path, tiny_data_files):
    calib, test = tiny_data_files
    not_keras = tmp_path / "notes.keras"
    not_keras.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.keras"
    data = tiny_model_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    import keras

    no_head = tmp_path / "no_head.keras"
    _model("no_dense").save(no_head)
    wrong_shape = tmp_path / "wrong_shape.npy"
    np.save(wrong_shape, np.zeros((4, 32, 32, 1), np.float32))
    wrong_dtype = tmp_path / "wrong_dtype.npy"
    np.save(wrong_dtype, np.zeros((4, 28, 28), np.int64))
    not_bundle = tmp_path / "mine"
    not_bundle.mkdir()
    (not_bundle / "thesis.txt").write_text("precious\n")
    return {"model": tiny_model_path, "calib": calib, "test": test, "not_keras": not_keras, "truncated": truncated,
            "no_head": no_head, "wrong_shape": wrong_shape, "wrong_dtype": wrong_dtype, "not_bundle": not_bundle}


@pytest.mark.parametrize("case,needle", [
    ("not_keras", "not a Keras model file"),
    ("truncated", "truncated or corrupt"),
    ("no_head", "does not end in a Dense classification head"),
    ("split", "split layer 'no_such_layer' does not exist"),
    ("wrong_shape", "the model takes [N, 28, 28, 1]"),
    ("wrong_dtype", "dtype int64 is not supported"),
    ("not_bundle", "is not an edge-quq bundle"),
    ("missing_calib", "quantization data not found"),
])
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, bad_inputs, case, needle):
    model, calib, out = bad_inputs["model"], bad_inputs["calib"], tmp_path / "out" / "bundle"
    extra = []
    if case in ("not_keras", "truncated", "no_head"):
        model = bad_inputs[case]
    elif case == "split":
        extra = ["--split-layer", "no_such_layer"]
    elif case in ("wrong_shape", "wrong_dtype"):
        calib = bad_inputs[case]
    elif case == "not_bundle":
        out = bad_inputs["not_bundle"]
    elif case == "missing_calib":
        calib = tmp_path / "nope.npy"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = _invoke([model, "--quant-data", calib, "--out", out, *extra])
    _assert_one_line_error(res, needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, nothing left behind
    if case == "not_bundle":
        assert (out / "thesis.txt").read_text() == "precious\n"


def test_existing_bundle_needs_force_and_no_dropout_head_needs_rates(tmp_path, tiny_bundle, tiny_data_files):
    """Also the whole CLI path on a second architecture: softmax head without Dropout, rates from --dropout."""
    calib, _ = tiny_data_files
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    model = tmp_path / "nodrop.keras"
    import keras

    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 5, strides=3, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x)).save(model)
    before = sha256_file(out / MANIFEST_NAME)

    res = _invoke([model, "--quant-data", calib, "--out", out])
    _assert_one_line_error(res, "pass --force")
    res = _invoke([model, "--quant-data", calib, "--out", out, "--force"])
    _assert_one_line_error(res, "--dropout")
    assert sha256_file(out / MANIFEST_NAME) == before  # the old bundle is untouched after both failures

    # --calibration and --calib-samples: the old names of --quant-data and --quant-samples still work
    res = _invoke([model, "--calibration", calib, "--out", out, "--force", "--dropout", "0.1,0.3", "--calib-samples", "50",
                   "--classes", ",".join(f"c{i}" for i in range(10)), "--z", "0.9"])
    assert res.exit_code == 0, (res.output, res.exception)
    b = load_bundle(out)
    assert [l.dropout for l in b.head.layers] == [0.1, 0.3] and b.head.output_activation == "softmax"
    assert b.manifest["head"]["dropout_source"] == "option --dropout" and b.decision.z == 0.9
    assert "accuracy" not in b.manifest  # no labelled test data given
    assert json.loads((out / "parity.json").read_text())["quant_samples"] == 50
    assert _leftovers(tmp_path) == []


def test_old_option_names_are_hidden_from_help():
    res = _invoke(["--help"])
    assert res.exit_code == 0 and "--quant-data" in res.output and "--quant-samples" in res.output
    assert "--calibration " not in res.output and "--calib-samples" not in res.output
    from edge_quq.defaults import DECISION_DEFAULTS

    assert f"without, {DECISION_DEFAULTS['z']}." in " ".join(res.output.split())  # --z: chosen with --fit-data


def test_export_is_registered_in_the_main_cli():
    from edge_quq.cli import main

    assert "export" in main.commands


# --- data loaders --------------------------------------------------------------------------------------

def test_idx_reader_and_fashion_mnist(tmp_path, fashion_small):
    import gzip

    from edge_quq_export.datasets import read_idx

    x, y, xt, yt = fashion_small
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28) and set(np.unique(yt)) == set(range(10))
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">u4").tobytes() + arr.tobytes()
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ExportError, match="truncated"):
        read_idx(tmp_path / "short")


def _write_cifar100(root: Path, n: int, keys_as_bytes: bool) -> np.ndarray:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    k = (lambda s: s.encode()) if keys_as_bytes else (lambda s: s)
    for split in ("train", "test"):
        d = {k("data"): imgs.transpose(0, 3, 1, 2).reshape(n, 3072), k("fine_labels"): list(range(n)),
             k("coarse_labels"): [i % 20 for i in range(n)], k("filenames"): [f"{i}.png" for i in range(n)]}
        with open(root / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = {k("fine_label_names"): [f"fine{i}" for i in range(100)], k("coarse_label_names"): [f"coarse{i}" for i in range(20)]}
    with open(root / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return imgs


@pytest.mark.parametrize("keys_as_bytes", [False, True])
def test_cifar100_loader(tmp_path, keys_as_bytes):
    from edge_quq_export.datasets import load_cifar100

    imgs = _write_cifar100(tmp_path, 6, keys_as_bytes)
    x, y, names = load_cifar100(tmp_path, "test")
    np.testing.assert_array_equal(x, imgs)  # channel planes -> HWC RGB
    assert list(y) == list(range(6)) and len(names) == 100 and names[5] == "fine5"
    _, yc, cn = load_cifar100(tmp_path, "train", label_mode="coarse")
    assert list(yc) == [i % 20 for i in range(6)] and len(cn) == 20
    with pytest.raises(ExportError, match="no such CIFAR-100 file"):
        load_cifar100(tmp_path / "missing", "train")


def test_cifar100c_loader(tmp_path):
    from edge_quq_export.datasets import load_cifar100c

    x = np.stack([np.full((32, 32, 3), i, np.uint8) for i in range(10)])
    np.save(tmp_path / "gaussian_noise.npy", x)
    np.save(tmp_path / "labels.npy", np.arange(10) % 3)
    xa, ya = load_cifar100c(tmp_path, "gaussian_noise")
    assert xa.shape == (10, 32, 32, 3) and list(ya) == list(np.arange(10) % 3)
    x3, y3 = load_cifar100c(tmp_path, "gaussian_noise", severity=3)
    assert [int(v[0, 0, 0]) for v in x3] == [4, 5] and list(y3) == [1, 2]
    with pytest.raises(ExportError, match="no such CIFAR-100-C file"):
        load_cifar100c(tmp_path, "fog")


def test_calibration_from_image_folder(tmp_path):
    import cv2

    from edge_quq.bundle import Preprocess
    from edge_quq_export.datasets import load_inputs

    for cls, color in (("cat", (0, 0, 255)), ("dog", (255, 255, 255))):
        (tmp_path / cls).mkdir()
        cv2.imwrite(str(tmp_path / cls / "a.png"), np.full((40, 30, 3), color, np.uint8))
        cv2.imwrite(str(tmp_path / cls / "b.png"), (np.full((20, 20, 3), color, np.uint16) * 257))  # 16-bit colour
    spec = Preprocess.from_json({"color": "rgb", "resize": [16, 16]})
    x, y = load_inputs(tmp_path, (16, 16, 3), spec, classes=["cat", "dog"])
    assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32 and list(y) == [0, 0, 1, 1]
    np.testing.assert_allclose(x[0, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)  # BGR file -> RGB input
    np.testing.assert_allclose(x[3], 1.0, atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no images"):
        load_inputs(tmp_path / "empty", (16, 16, 3), spec)


def test_parity_cosine_on_tiny_and_zero_features():
    from edge_quq_export.parity import _cosine

    a = np.array([[1e-11, 2e-11], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    b = np.array([[2e-11, 4e-11], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(_cosine(a, b), [1.0, 1.0, 0.0, 0.0], atol=1e-12)
