"""Streaming `edge-quq predict` (issue 15): each result is printed when its file is done, memory does not
grow with the number of files, and SIGTERM leaves complete lines and a summary. No timing assertions: the
order of events through a pipe and peak RSS are what is checked."""
from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_quq.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME

SAMPLES = Path(DEFAULT_BUNDLE_DIR).parent / "samples"
SAMPLE = SAMPLES / "00_t-shirt-top.png"


def image_folder(root: Path, n: int) -> Path:
    d = root / f"images{n}"
    d.mkdir()
    data = SAMPLE.read_bytes()
    for i in range(n):
        (d / f"img{i:05d}.png").write_bytes(data)
    return d


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {n: image_folder(root, n) for n in (2000, 20000)}


@pytest.fixture(scope="module")
def lean_bundle(tmp_path_factory) -> Path:
    """The default bundle without detectors (and so without the gate calibrated on them): the same memory
    story, fewer seconds per file."""
    b = tmp_path_factory.mktemp("lean") / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, b)
    m = json.loads((b / MANIFEST_NAME).read_text())
    del m["detectors"], m["files"]["detectors.npz"], m["gate"], m["files"]["gate.npz"]
    (b / MANIFEST_NAME).write_text(json.dumps(m, indent=2))
    (b / "detectors.npz").unlink()
    (b / "gate.npz").unlink()
    return b


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_quq", "predict", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rest_of(p: subprocess.Popen) -> tuple:
    """(stdout, stderr) after readline() calls. Not communicate(): with two pipes it reads the file
    descriptors directly, so lines readline() had already buffered were lost (a faster predict put a sixth
    line in that buffer and the count came out short). stderr carries only the summary, so reading stdout
    to its end first cannot block the child."""
    out = p.stdout.read()
    err = p.stderr.read()
    p.wait(timeout=300)
    return out, err


def test_json_lines_stream_and_sigterm_leaves_complete_lines_and_a_summary(folders):
    p = start(str(folders[20000]), "--json")
    first = [p.stdout.readline() for _ in range(5)]  # arrive while most files are still unread
    p.send_signal(signal.SIGTERM)
    rest, err = rest_of(p)
    lines = first + rest.splitlines(keepends=True)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert all(l.endswith("\n") for l in lines)
    results = [json.loads(l) for l in lines]
    assert 5 <= len(results) < 20000
    assert [r["source"] for r in results] == [str(folders[20000] / f"img{i:05d}.png") for i in range(len(results))]
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    assert summary["interrupted"] == "SIGTERM" and summary["processed"] == len(results)
    assert summary["latency_ms"]["total"]["p50"] > 0


def test_table_rows_stream_and_sigterm_prints_the_summary(folders):
    p = start(str(folders[20000]))
    head = [p.stdout.readline() for _ in range(4)]  # header, rule, two rows
    p.send_signal(signal.SIGTERM)
    rest, err = rest_of(p)
    assert p.returncode == 143, err
    assert head[0].startswith("input") and set(head[1].strip()) <= {"-", " "}
    rows = [l for l in head[2:] + rest.splitlines(keepends=True) if l.startswith("img")]
    # input, decision, label, rule, "top mean±std" (two words), max p, ms, ignored by, OOD flags
    assert rows and all(l.endswith("\n") and len(l.split()) == 10 for l in rows)
    assert f"{len(rows)} processed" in rest and "stopped by SIGTERM" in rest


def test_iter_predict_consumes_its_input_lazily():
    from edge_quq.predictor import Predictor

    p = Predictor.from_bundle(seed=0)
    endless = itertools.repeat(SAMPLE)  # a list of every input would never finish being built
    got = list(itertools.islice(p.iter_predict(endless, batch_size=3), 4))
    assert [r.label for r in got] == ["T-shirt/top"] * 4
    mixed = p.predict_many([SAMPLE, SAMPLES / "nope.png", SAMPLE], batch_size=2)
    assert [type(r).__name__ for r in mixed] == ["Prediction", "Failure", "Prediction"]


def peak_rss_mb(folder: Path, bundle: Path) -> float:
    r = subprocess.run([sys.executable, "-m", "edge_quq", "predict", str(folder), "--json", "--bundle", str(bundle),
                        "-T", "2", "--seed", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stderr.strip().splitlines()[-1])["summary"]
    assert summary["processed"] == int(folder.name[len("images"):])
    return summary["peak_rss_mb"]


def test_peak_rss_does_not_grow_with_the_number_of_files(folders, lean_bundle):
    small, large = peak_rss_mb(folders[2000], lean_bundle), peak_rss_mb(folders[20000], lean_bundle)
    # Kept results cost ~4 KB each (18 000 more files: ~70 MB); the summary's per-stage arrays cost 8 bytes
    # per stage per file and the sorted folder listing ~100 bytes per file (~3 MB together).
    assert large - small < 12, (small, large)


def test_a_reader_that_goes_away_ends_the_run_quietly(folders):
    """`edge-quq predict DIR | head -3`: streaming makes this common; it must not end in a traceback."""
    p = start(str(folders[2000]), "--json")
    lines = [p.stdout.readline() for _ in range(3)]
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=300)
    assert all(json.loads(l)["decision"] in ("keep", "ignore") for l in lines)
    assert "Traceback" not in err and p.returncode == 128 + signal.SIGPIPE, (p.returncode, err)
