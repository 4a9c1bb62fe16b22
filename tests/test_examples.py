"""examples/: each program runs as a user would run it, on the public API only, and stays short."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from camera_util import CLEAN, CORRUPT, read_jsonl, write_video

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_are_short(name):
    assert len((EXAMPLES / name).read_text().splitlines()) <= 40


def test_classify_folder(tmp_path):
    import edge_quq

    out = run("classify_folder.py", cwd=tmp_path).stdout.splitlines()
    names = sorted(p.name for p in edge_quq.SAMPLES_DIR.iterdir() if p.is_file())
    assert [line.split()[0] for line in out] == names
    by_name = {line.split()[0]: line.split()[1] for line in out}
    # The ten class samples are clean test images: kept; SOURCES.json is not an image: one error line.
    assert [by_name[n] for n in names if n[:2].isdigit()] == ["keep"] * 10
    assert by_name["SOURCES.json"] == "error:"


@pytest.fixture(scope="module")
def camera_run(tmp_path_factory):
    """examples/camera_loop.py on a real MJPG video of Fashion-MNIST test images, a third of them corrupted."""
    d = tmp_path_factory.mktemp("camera_loop")
    truth = write_video(d / "fashion.avi", n=90, corrupt_range=(30, 60))
    run("camera_loop.py", str(d / "fashion.avi"), "jsonl:results.jsonl", "video:annotated.avi", cwd=d)
    return d, truth


def test_camera_loop_one_source_two_outputs(camera_run):
    import cv2

    d, truth = camera_run
    recs = read_jsonl(d / "results.jsonl")
    assert [r["frame"] for r in recs] == list(range(90))
    ign = np.array([r["decision"] == "ignore" for r in recs])
    kinds = np.array(truth["kinds"])
    assert ign[kinds == CORRUPT].mean() >= ign[kinds == CLEAN].mean() + 0.2
    cap = cv2.VideoCapture(str(d / "annotated.avi"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 90


def test_results_table(camera_run):
    d, _ = camera_run
    recs = read_jsonl(d / "results.jsonl")
    out = run("results_table.py", "results.jsonl", cwd=d).stdout.splitlines()
    total = out[-1].split()
    ignored = sum(r["decision"] == "ignore" for r in recs)
    assert total[:4] == ["all", "90", str(90 - ignored), str(ignored)]
    rows = {line[:14].strip(): line[14:].split() for line in out[1:-1]}
    assert set(rows) == {r["top_label"] for r in recs}
    assert sum(int(v[0]) for v in rows.values()) == 90
