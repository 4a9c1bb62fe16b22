"""`edge-quq predict` and `edge-quq info` as a user runs them: real processes, both output modes, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_quq.bundle import DEFAULT_BUNDLE_DIR, load_bundle

SAMPLES = Path(DEFAULT_BUNDLE_DIR).parent / "samples"


def run(*args, env=None, check_code=None):
    p = subprocess.run([sys.executable, "-m", "edge_quq", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    if check_code is not None:
        assert p.returncode == check_code, (p.returncode, p.stdout, p.stderr)
    return p


def error_lines(stderr: str):
    return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_predict_table_on_shipped_samples():
    p = run("predict", str(SAMPLES), "--seed", "0", check_code=0)
    assert "decision" in p.stdout and "keep" in p.stdout
    assert "latency ms p50/p90/p99" in p.stdout and "peak RSS" in p.stdout
    n = len([f for f in SAMPLES.iterdir() if f.suffix == ".png"])
    assert f"{n} processed" in p.stdout


def test_predict_json_lines_and_summary_on_stderr():
    files = sorted(str(f) for f in SAMPLES.glob("*.png"))[:3]
    p = run("predict", *files, "--json", "--seed", "1", "-T", "30", "--backend", "onnx", check_code=0)
    objs = [json.loads(l) for l in p.stdout.splitlines()]
    assert [o["source"] for o in objs] == files
    assert all(o["decision"] in ("keep", "ignore") and o["settings"]["num_iter"] == 30 for o in objs)
    summary = json.loads(p.stderr.strip().splitlines()[-1])["summary"]
    assert summary["processed"] == 3 and {"p50", "p90", "p99"} <= set(summary["latency_ms"]["total"])
    assert summary["peak_rss_mb"] > 0


def test_confidence_level_and_glob():
    p = run("predict", str(SAMPLES / "0*.png"), "--confidence-level", "0.9", "--json", check_code=0)
    objs = [json.loads(l) for l in p.stdout.splitlines()]
    assert objs and all(abs(o["settings"]["z"] - 1.644854) < 1e-5 for o in objs)


def test_ignored_samples_still_exit_zero():
    # z huge: every interval with any spread straddles the threshold, so most samples are ignored
    # (a saturated sigmoid has std exactly 0 and stays decided, and a single straddling class gets the
    # benefit of the doubt); ignoring is still a success.
    p = run("predict", str(SAMPLES), "--z", "1000", "--json", check_code=0)
    objs = [json.loads(l) for l in p.stdout.splitlines()]
    assert sum(o["decision"] == "ignore" for o in objs) >= len(objs) // 2
    for o in objs:
        if o["decision"] == "keep":
            # kept only when at most one class straddles (the rule's benefit of the doubt)
            assert o["states"].count(-1) <= 1


def test_bad_files_are_reported_and_others_still_processed(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    good = next(SAMPLES.glob("*.png"))
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    p = run("predict", str(tmp_path / "empty.png"), str(good), str(tmp_path / "notes.png"), str(nothing), "--json")
    assert p.returncode == 1
    errs = error_lines(p.stderr)
    assert any("empty file" in e for e in errs)
    assert any("not a readable image" in e for e in errs)
    assert any("contains no images" in e for e in errs)
    objs = [json.loads(l) for l in p.stdout.splitlines()]
    assert sum("decision" in o for o in objs) == 1 and sum("error" in o for o in objs) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["-T", "1"], "at least 2"),
        (["--confidence-level", "1.5"], "between 0 and 1"),
        (["--confidence-level", "0"], "between 0 and 1"),
        (["--z", "1", "--confidence-level", "0.9"], "not both"),
        (["--threshold", "1.0"], "threshold"),
    ],
)
def test_bad_options_one_error_line(args, message):
    p = run("predict", str(SAMPLES), *args, check_code=2)
    errs = error_lines(p.stderr)
    assert len(errs) == 1 and message in errs[0] and p.stdout == ""


def test_tampered_bundle_one_error_line(tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, b)
    onnx = next(b.glob("*backbone*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[100] ^= 0x01
    onnx.write_bytes(bytes(data))
    p = run("predict", str(SAMPLES), "--bundle", str(b), check_code=2)
    errs = error_lines(p.stderr)
    assert len(errs) == 1 and "sha256 mismatch" in errs[0] and onnx.name in errs[0]
    p = run("info", str(b), check_code=2)
    assert "sha256 mismatch" in p.stderr


def test_not_a_bundle_and_missing_bundle(tmp_path):
    p = run("predict", str(SAMPLES), "--bundle", str(tmp_path), check_code=2)
    assert "not a bundle" in p.stderr
    p = run("info", str(tmp_path / "nope"), check_code=2)
    assert "does not exist" in p.stderr


def test_backend_not_installed_is_one_clear_line(tmp_path):
    # A real import failure: a module named onnxruntime that raises ImportError shadows the installed one.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('onnxruntime removed for this test')\n")
    p = run("predict", str(SAMPLES), "--backend", "onnx", env={"PYTHONPATH": str(shadow)}, check_code=2)
    errs = error_lines(p.stderr)
    assert len(errs) == 1 and "onnxruntime is not installed" in errs[0]


def test_info_text_and_json():
    p = run("info", check_code=0)
    for word in ("classes", "T-shirt/top", "backbone tflite", "backbone onnx", "decision defaults", "loads:"):
        assert word in p.stdout
    j = json.loads(run("info", "--json", check_code=0).stdout)
    assert j["manifest"]["format"] == "edge-quq-bundle" and "tflite" in j["backends"]
    # Which head sampler `auto` runs here: tests/run.sh installs the compiler, so the kernel must be built.
    assert j["fields"]["head sampler"].startswith("native (")
    assert j["fields"]["decision math"] == "native (C)"
    # the rule-plus-gate figures are not catch rates of the gate: their own line
    assert "id_error_kept" not in j["fields"]["gate validation"]
    assert j["fields"]["with the rule"].startswith("ignored ") and "error among kept" in j["fields"]["with the rule"]


def test_runtime_log_lines_stay_off_stderr():
    # TFLite's C++ "INFO: Created ... XNNPACK delegate" would read like a message of ours on a board's journal.
    p = run("predict", str(SAMPLES / "01_trouser.png"), "--backend", "tflite", "--sampler", "tflite", check_code=0)
    assert "INFO:" not in p.stderr and "XNNPACK on" in p.stdout  # the summary still names the delegate


def test_table_shows_detector_flags_on_a_kept_far_ood_image():
    # The MC rule keeps the ring pattern as Bag; the table must still show that detectors flag it.
    p = run("predict", str(SAMPLES / "ood_rings16.png"), str(SAMPLES / "01_trouser.png"), "--seed", "0", check_code=0)
    lines = p.stdout.splitlines()
    assert "OOD flags" in lines[0]
    rings = next(l for l in lines if l.startswith("ood_rings16.png"))
    trouser = next(l for l in lines if l.startswith("01_trouser.png"))
    gate = load_bundle().gate.detectors  # what a default run computes and flags
    assert any(n in rings for n in gate) and trouser.rstrip().endswith("-"), (rings, gate)
