"""Hostile or broken bundles (issue 15): every wrong type, non-finite or out-of-range manifest value, bad
weight or detector array, and symlink out of the bundle is one `error:` line naming it, exit 2; the
manifest's own sha256 is shown and pinned; JSON output never holds NaN or Infinity."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_quq.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, load_bundle, parse_manifest, sha256_file
from edge_quq.errors import BundleError

SAMPLES = Path(DEFAULT_BUNDLE_DIR).parent / "samples"
REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "edge_quq", *args], capture_output=True, text=True, timeout=300)


def one_error_line(p, code=2):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errs = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(errs) == 1 and errs[0].startswith("error: "), p.stderr
    return errs[0]


@pytest.fixture
def bundle(tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, b)
    return b


def manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST_NAME).read_text())


def write_manifest_json(b: Path, m: dict) -> None:
    (b / MANIFEST_NAME).write_text(json.dumps(m, indent=2))  # NaN/Infinity written as Python's json does


def rechecksum(b: Path, name: str) -> None:
    m = manifest(b)
    m["files"][name] = {"sha256": sha256_file(b / name), "bytes": (b / name).stat().st_size}
    write_manifest_json(b, m)


def _set(m: dict, path: str, value) -> None:
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        m = m[k]
    m[keys[-1]] = value


# (manifest path, bad value, words the one error line must contain)
MUTATIONS = [
    ("classes", 5, "classes"),
    ("classes", ["a", 3, "c", "d", "e", "f", "g", "h", "i", "j"], "classes"),
    ("input.shape", "abc", "input.shape"),
    ("input.shape", [28, 28, True], "input.shape"),
    ("head.layers.0", 5, "head.layers[0]"),
    ("head.layers.0.units", "300", "units"),
    ("head.layers.1.dropout", 1.5, "dropout"),
    ("decision", [], "decision"),
    ("decision.threshold", float("nan"), "decision.threshold"),
    ("decision.num_iter", 10**30, "decision.num_iter"),
    ("decision.z", float("inf"), "decision.z"),
    ("decision.mixed", {"a": 1}, "decision.mixed"),
    ("files.head.npz.bytes", "abc", "bytes"),
    ("files.head.npz", 5, "files['head.npz']"),
    ("schema_version", True, "schema_version"),
    ("input.preprocess.pixel_scale", 0, "pixel_scale"),
    ("input.preprocess.std", [0.0], "std"),
    ("input.preprocess.mean", [float("nan")], "mean"),
    ("input.preprocess.resize", [28, "x"], "resize"),
    ("backbone.tflite.input.scale", float("inf"), "scale"),
    ("backbone.tflite.input.scale", 0, "scale"),  # turned a T-shirt into "keep Bag", with numpy warnings
    ("backbone.tflite.output.zero_point", 1000, "zero_point"),
    ("backbone", "tflite", "backbone"),
    ("head.feature_size", 64.5, "feature_size"),
    ("head.mask_inputs", "mask0", "mask_inputs"),
    ("detectors.names", 7, "detectors.names"),
    ("name", 12, "name"),
]


def _mutated(b: Path, path: str, value) -> None:
    m = manifest(b)
    if path.startswith("files."):  # file names hold dots
        rest = path[len("files."):]
        name, _, key = rest.rpartition(".") if rest.endswith(".bytes") else (rest, "", "")
        if key:
            m["files"][name][key] = value
        else:
            m["files"][name] = value
    else:
        _set(m, path, value)
    write_manifest_json(b, m)


@pytest.mark.parametrize("path,value,needle", MUTATIONS, ids=[m[0] + "=" + repr(m[1])[:12] for m in MUTATIONS])
def test_bad_manifest_value_is_one_bundle_error_naming_the_field(bundle, path, value, needle):
    _mutated(bundle, path, value)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg


@pytest.mark.parametrize("command", ["info", "predict"])
@pytest.mark.parametrize("path,value,needle", [MUTATIONS[0], MUTATIONS[2], MUTATIONS[4], MUTATIONS[7], MUTATIONS[12],
                                               MUTATIONS[14], MUTATIONS[15]])
def test_bad_manifest_is_one_error_line_exit_2(bundle, command, path, value, needle):
    _mutated(bundle, path, value)
    args = ["info", str(bundle)] if command == "info" else ["predict", str(SAMPLES), "--bundle", str(bundle)]
    assert needle in one_error_line(run(*args))


def test_valid_manifest_still_round_trips_exactly(bundle):
    m = manifest(bundle)
    b = parse_manifest(m, bundle)
    assert b.to_json() == m
    assert parse_manifest(b.to_json(), bundle) == b


def drop_detectors(b: Path) -> None:
    """Detectors are checked against the head's sha256 first; without them the head weights are read next."""
    m = manifest(b)
    del m["detectors"], m["files"]["detectors.npz"]
    write_manifest_json(b, m)


def test_inf_head_bias_is_refused(bundle):
    drop_detectors(bundle)
    with np.load(bundle / "head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["dense1/bias"][3] = np.inf
    np.savez(bundle / "head.npz", **arrays)
    rechecksum(bundle, "head.npz")
    err = one_error_line(run("predict", str(SAMPLES), "--bundle", str(bundle)))
    assert "dense1/bias" in err and "infinite" in err


def test_non_numeric_head_weights_are_refused(bundle):
    drop_detectors(bundle)
    with np.load(bundle / "head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["dense0/kernel"] = np.full(arrays["dense0/kernel"].shape, "x")
    np.savez(bundle / "head.npz", **arrays)
    rechecksum(bundle, "head.npz")
    assert "dense0/kernel" in one_error_line(run("predict", str(SAMPLES), "--bundle", str(bundle)))


def _detector_arrays(b: Path) -> dict:
    with np.load(b / "detectors.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("key,make,needle", [
    ("mahalanobis/whitener", lambda a: np.eye(3, dtype=a.dtype), "whitener"),
    ("knn/bank", lambda a: a[:, :5], "bank"),
    ("knn/bank", lambda a: np.full(a.shape, np.inf, np.float32), "bank"),  # a float bank (its int8 scale removed below)
    ("vim/origin", lambda a: np.zeros((2, 2), a.dtype), "origin"),
    ("react/clip", lambda a: np.array(["x"]), "react/clip"),
])
def test_detector_arrays_of_the_wrong_shape_or_values_are_one_line(bundle, key, make, needle):
    arrays = _detector_arrays(bundle)
    assert key in arrays, sorted(arrays)
    arrays[key] = make(arrays[key])
    if arrays[key].dtype.kind == "f" and key + ".scale" in arrays:
        del arrays[key + ".scale"]
    np.savez_compressed(bundle / "detectors.npz", **arrays)
    rechecksum(bundle, "detectors.npz")
    err = one_error_line(run("predict", str(SAMPLES), "--bundle", str(bundle)))
    assert needle in err and "detectors.npz" in err


def test_detectors_meta_record_garbage_is_one_line(bundle):
    arrays = _detector_arrays(bundle)
    meta = json.loads(arrays["meta"].tobytes())
    meta["detectors"] = {"knn": 5}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(bundle / "detectors.npz", **arrays)
    rechecksum(bundle, "detectors.npz")
    assert "knn" in one_error_line(run("predict", str(SAMPLES), "--bundle", str(bundle)))


def test_manifest_sha256_is_shown_by_info_text_and_json(bundle):
    want = hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()
    assert load_bundle(bundle).manifest_sha256 == want
    p = run("info", str(bundle))
    assert p.returncode == 0 and any(l.startswith("manifest sha256") and l.endswith(want) for l in p.stdout.splitlines())
    j = json.loads(run("info", "--json", str(bundle)).stdout)
    assert j["manifest_sha256"] == want and j["fields"]["manifest sha256"] == want


def test_info_json_is_strict_json_with_nan_in_recorded_metrics(bundle):
    m = manifest(bundle)
    m["accuracy"]["float"] = float("nan")  # a recorded metric, not a value the runtime reads: kept, shown as null
    write_manifest_json(bundle, m)
    p = run("info", "--json", str(bundle))
    assert p.returncode == 0, p.stderr

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    j = json.loads(p.stdout, parse_constant=refuse)
    assert j["manifest"]["accuracy"]["float"] is None


def test_prediction_json_never_holds_nan_or_infinity():
    from edge_quq.result import Prediction, dumps

    nan, inf = float("nan"), float("inf")
    p = Prediction(source="x", keep=False, rule="uncertain", label=None, class_index=None, classes=[], top_index=0,
                   top_label="a", mean=[nan], std=[inf], lower=[-inf], upper=[nan], states=[-1], deterministic=[nan],
                   scores={"energy": inf}, timings_ms={"total": nan}, rss_bytes=1, settings={"z": nan})
    text = p.to_json()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text)
    assert d["mean"] == [None] and d["scores"]["energy"] is None and d["settings"]["z"] is None
    assert dumps({"a": [1.5, nan, {"b": -inf}]}) == '{"a":[1.5,null,{"b":null}]}'


def test_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(bundle / "head.npz", outside / "head.npz")
    (bundle / "head.npz").unlink()
    (bundle / "head.npz").symlink_to(outside / "head.npz")
    err = one_error_line(run("info", str(bundle)))
    assert "head.npz" in err and "outside the bundle" in err
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle)


def test_symlinked_manifest_out_of_the_bundle_is_refused(bundle, tmp_path):
    shutil.move(str(bundle / MANIFEST_NAME), tmp_path / "m.json")
    (bundle / MANIFEST_NAME).symlink_to(tmp_path / "m.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle)


def test_symlinks_inside_the_bundle_and_a_symlinked_folder_still_load(bundle, tmp_path):
    (bundle / "sub").mkdir()
    shutil.move(str(bundle / "head.npz"), bundle / "sub" / "head.npz")
    (bundle / "head.npz").symlink_to(Path("sub") / "head.npz")
    link = tmp_path / "link"
    link.symlink_to(bundle)
    assert load_bundle(link).name == "fashion-mnist-reference"


def test_a_fifo_in_place_of_a_bundle_file_is_one_line(bundle):
    (bundle / "head.npz").unlink()
    os.mkfifo(bundle / "head.npz")
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bundle)


# -- install.sh ---------------------------------------------------------------------------------------------
def install(*args):
    return subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), *args], capture_output=True, text=True, timeout=120)


def test_install_pins_the_manifest_sha256(bundle, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    digest = hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()
    bad = install("--root", str(root), "--bundle", str(bundle), "--bundle-sha256", "0" * 64)
    assert bad.returncode == 2 and "manifest sha256" in bad.stderr and digest in bad.stderr, bad.stderr
    assert not (root / "opt").exists()
    assert install("--root", str(root), "--bundle", str(bundle), "--bundle-sha256", "xyz").returncode == 2
    ok = install("--root", str(root), "--bundle", str(bundle), "--bundle-sha256", digest.upper(), "--no-start")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert digest in ok.stdout


def test_install_refuses_a_symlink_out_of_the_bundle(bundle, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the bundle")
    (bundle / "notes.txt").symlink_to(secret)  # named by no manifest entry: only install.sh's walk sees it
    r = install("--root", str(root), "--bundle", str(bundle))
    assert r.returncode == 2 and "outside the bundle" in r.stderr, r.stdout + r.stderr
    assert not (root / "opt").exists()


def test_install_copies_inside_symlinks_as_regular_files(bundle, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (bundle / "sub").mkdir()
    shutil.move(str(bundle / "parity.md"), bundle / "sub" / "parity.md")
    (bundle / "parity.md").symlink_to(Path("sub") / "parity.md")
    r = install("--root", str(root), "--bundle", str(bundle), "--no-start")
    assert r.returncode == 0, r.stdout + r.stderr
    copied = root / "opt/edge-quq/bundle/parity.md"
    assert copied.is_file() and not copied.is_symlink()


# -- export --out ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/proc/x", "/proc/x/y/bundle", "nonempty", "afile"])
def test_export_refuses_an_unusable_out_with_one_line_before_loading_the_model(tmp_path, where):
    model = tmp_path / "model.keras"
    model.write_bytes(b"not read: --out is checked first")
    out = Path(where)
    if where == "nonempty":
        out = tmp_path / "nonempty"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif where == "afile":
        out = tmp_path / "afile"
        out.write_text("mine")
    err = one_error_line(run("export", str(model), "--quant-data", str(tmp_path), "--out", str(out)))
    assert str(out) in err
    if where.startswith("/proc"):
        assert "cannot create" in err
    else:
        assert (out / "keep.txt").read_text() == "mine" if out.is_dir() else out.read_text() == "mine"


def test_export_of_a_real_model_to_proc_is_one_line(tmp_path, tiny_model_path, tiny_data_files):
    """With a model that loads, /proc/x used to get as far as staging and end in an OSError traceback."""
    calib, _ = tiny_data_files
    err = one_error_line(run("export", str(tiny_model_path), "--quant-data", str(calib), "--out", "/proc/x"))
    assert "/proc/x" in err and "cannot create" in err
