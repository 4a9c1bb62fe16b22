"""`edge-quq camera` end to end, the real command in a subprocess: real video files and folders of real
Fashion-MNIST test images, a real MJPEG-over-HTTP camera that dies and comes back, signals, bad input, memory."""
from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from camera_util import (CLEAN, CORRUPT, MjpegServer, read_jsonl, run_camera, start_camera, stop, wait_for, write_folder,
                         write_video)

FRAME_KEYS = {"ts", "frame", "source", "decision", "rule", "label", "class_index", "classes", "top_label", "top_index", "mean", "std",
              "lower", "upper", "states", "deterministic", "scores", "timings_ms", "rss_mb", "ignored_by", "flagged"}
STATS_KEYS = {"updated", "state", "source", "started", "uptime_s", "frames", "ignore_rate", "fps", "fps_recent", "latency_ms", "rss_mb",
              "peak_rss_mb", "source_state", "board", "sink_errors"}


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    path = d / "fashion.avi"
    truth = write_video(path, n=300, corrupt_range=(100, 200))
    return path, truth


def test_video_file_all_outputs(tmp_path, video):
    import cv2

    path, truth = video
    out, stats, snaps, vid = tmp_path / "out.jsonl", tmp_path / "stats.json", tmp_path / "snaps", tmp_path / "annotated.avi"
    r = run_camera("--source", f"file://{path}", "--jsonl", str(out), "--stats-file", str(stats), "--snapshots", str(snaps),
                   "--max-snapshots", "15", "--video-out", str(vid), "--stats-interval", "1", "--seed", "1")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(out)
    # A file is read at the loop's pace: every frame processed, in order, none dropped.
    assert [x["frame"] for x in recs] == list(range(300))
    for x in recs:
        assert FRAME_KEYS <= set(x), set(FRAME_KEYS) - set(x)
        assert x["decision"] in ("keep", "ignore") and len(x["mean"]) == 10 and x["timings_ms"]["total"] > 0
        assert (x["label"] is None) == (x["decision"] == "ignore")
    ign = np.array([x["decision"] == "ignore" for x in recs])
    kinds = np.array(truth["kinds"])
    clean_rate, corrupt_rate = ign[kinds == CLEAN].mean(), ign[kinds == CORRUPT].mean()
    # The corrupted stretch is what the uncertainty is for: it must be ignored far more often.
    assert corrupt_rate >= clean_rate + 0.2 and corrupt_rate >= 3 * clean_rate, (clean_rate, corrupt_rate)
    kept_clean = [(x["class_index"], y) for x, y, k in zip(recs, truth["labels"], truth["kinds"]) if k == CLEAN and x["decision"] == "keep"]
    assert np.mean([a == b for a, b in kept_clean]) > 0.8

    st = json.loads(stats.read_text())
    assert STATS_KEYS <= set(st)
    assert st["state"] == "stopped" and st["frames"]["processed"] == 300 and st["frames"]["seen"] == 300 and st["frames"]["dropped"] == 0
    assert st["frames"]["ignored"] == int(ign.sum()) and abs(st["ignore_rate"] - ign.mean()) < 1e-3
    assert {"p50", "p90", "p99"} <= set(st["latency_ms"]["total"]) and st["peak_rss_mb"] >= st["rss_mb"] > 0
    assert "end of source" in r.stderr and "300 processed" in r.stderr

    # Snapshots: only ignored frames, the newest 15 kept, each with its JSON record.
    pngs = sorted(snaps.glob("*.png"))
    assert len(pngs) == min(15, int(ign.sum()))
    last_ignored = [x["frame"] for x in recs if x["decision"] == "ignore"][-15:]
    assert sorted(int(p.stem.split("_")[-1]) for p in pngs) == last_ignored
    assert all(json.loads(p.with_suffix(".json").read_text())["decision"] == "ignore" for p in pngs)

    cap = cv2.VideoCapture(str(vid))
    n, first = 0, None
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        first = fr if first is None else first
        n += 1
    assert n == 300 and first.shape[1] >= 320  # annotated frames are scaled up to stay legible


def test_image_folder_every_roi_and_stdout(tmp_path):
    labels = write_folder(tmp_path / "imgs", 40)
    r = run_camera("--source", str(tmp_path / "imgs"), "--jsonl", "-", "--every", "2", "--roi", "0,0,112,112", "-q")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["frame"] for x in recs] == list(range(0, 40, 2))
    assert all(x["roi"] == [0, 0, 112, 112] for x in recs)
    kept = [(x["class_index"], labels[x["frame"]]) for x in recs if x["decision"] == "keep"]
    assert len(kept) >= 15 and np.mean([a == b for a, b in kept]) > 0.8
    assert "20 processed" in r.stderr and "20 skipped" in r.stderr

    # A glob of the same folder, bounded by --frames, with a center crop.
    r = run_camera("--source", str(tmp_path / "imgs" / "img_00*.png"), "--frames", "5", "--crop", "0.9", "--jsonl", "-", "-q")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["frame"] for line in r.stdout.splitlines()] == [0, 1, 2, 3, 4]
    assert "frame limit" in r.stderr


def test_http_camera_dies_and_comes_back(tmp_path):
    """A live source that fails mid-stream: the loop reports it, keeps running, reopens with backoff, and
    processes frames again once the camera is back; SIGINT then ends it within a second with stats flushed."""
    import cv2

    folder = tmp_path / "imgs"
    write_folder(folder, 20)
    jpgs = [cv2.imencode(".jpg", cv2.imread(str(p)))[1].tobytes() for p in sorted(folder.iterdir())]
    cam = MjpegServer(jpgs, fps=40)
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    proc = start_camera("--source", cam.url, "--jsonl", str(out), "--stats-file", str(stats), "--stats-interval", "0.3",
                        "--stall-timeout", "1", "--open-timeout", "2", "--threads", "1", "-T", "10")
    try:
        assert wait_for(lambda: out.exists() and len(read_jsonl(out, live=True)) >= 30, 60), proc.stderr.read() if proc.poll() is not None else ""
        cam.kill()
        assert wait_for(lambda: json.loads(stats.read_text()).get("state") == "stalled", 15)
        n_dead = len(read_jsonl(out, live=True))
        time.sleep(2.0)
        assert proc.poll() is None  # survived
        cam.start()
        assert wait_for(lambda: len(read_jsonl(out, live=True)) >= n_dead + 30, 30)
        assert wait_for(lambda: json.loads(stats.read_text()).get("state") == "running", 10)
        took = stop(proc, signal.SIGINT)
        assert proc.returncode == 0
        assert took < 1.5, took
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        cam.kill()
    assert "source stalled" in err and "source back after" in err, err
    st = json.loads(stats.read_text())
    assert st["state"] == "stopped" and st["source_state"]["reopens"] >= 1 and st["source_state"]["failures"] >= 1
    frames = [x["frame"] for x in read_jsonl(out)]
    assert frames == sorted(frames) and st["frames"]["processed"] == len(frames)


@pytest.fixture(scope="module")
def port_in_use():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("args, message", [
    (["--source", "/nonexistent/video.mp4"], "no such file or folder"),
    (["--source", "ftp://example.com/cam"], "unsupported scheme ftp://"),
    (["--source", "videotestsrc ! videoconvert ! appsink"], "built without GStreamer"),
    (["--source", "/dev/video99"], "cannot be opened"),
    (["--source", "rtsp://127.0.0.1:1/none", "--open-timeout", "2"], "cannot be opened"),
    (["--source", "SAMPLES", "--mqtt", "mqtt://broker:notaport"], "not a broker URL"),
    (["--source", "SAMPLES", "--mqtt", "http://broker"], "scheme must be mqtt:// or mqtts://"),
    (["--source", "SAMPLES", "--serve", "127.0.0.1:PORT_IN_USE"], "cannot listen on 127.0.0.1"),
    (["--source", "SAMPLES", "--roi", "1,2,3"], "expected X,Y,W,H"),
    (["--source", "SAMPLES", "--roi", "500,500,10,10"], "outside the"),
    (["--source", "SAMPLES", "--video-out", "x.gif"], "unknown container"),
    (["--source", "SAMPLES", "--output", "video:x.gif"], "--output video:x.gif: unknown container .gif"),
    (["--source", "SAMPLES", "--output", "results.jsonl"], "--output results.jsonl: not an output URI"),
    (["--source", "SAMPLES", "--output", "ftp://host/x"], "--output ftp://host/x: unknown output ftp:"),
    (["--source", "SAMPLES", "--output", "stats:/nonexistent/stats.json"], "folder /nonexistent does not exist"),
    (["--source", "SAMPLES", "--output", "mqtt://"], "--output mqtt://: no broker host"),
    (["--source", "SAMPLES", "--output", "http://127.0.0.1:PORT_IN_USE"], "--output http://127.0.0.1:PORT_IN_USE: cannot listen on"),
    (["--source", "SAMPLES", "--output", "http://127.0.0.1:80/view"], "the live view has no path"),
])
def test_bad_input_one_error_line(tmp_path, port_in_use, args, message):
    samples = str(Path(__file__).resolve().parents[1] / "edge_quq" / "data" / "samples")
    args = [a.replace("SAMPLES", samples).replace("PORT_IN_USE", str(port_in_use)) for a in args]
    message = message.replace("PORT_IN_USE", str(port_in_use))
    out = tmp_path / "out.jsonl"
    r = run_camera(*args, "--jsonl", str(out), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    # Nothing half-written: a refused run leaves no output file behind (not even an empty one).
    assert not out.exists()


def test_output_uris_are_the_old_flags(tmp_path):
    """--output URIs and the old flags give the same outputs; an output kind may repeat (a file and stdout)."""
    write_folder(tmp_path / "imgs", 12)
    common = ["--source", str(tmp_path / "imgs"), "--seed", "5", "-T", "10", "--stats-interval", "0.2", "-q"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_camera(*common, "--output", f"jsonl:{a}.jsonl", "--output", "jsonl:-", "--output", f"stats:{a}.json",
                   "--output", f"snapshots:{a}", "--output", f"video:{a}.avi")
    assert r.returncode == 0, r.stderr
    r2 = run_camera(*common, "--jsonl", f"{b}.jsonl", "--stats-file", f"{b}.json", "--snapshots", str(b), "--video-out", f"{b}.avi")
    assert r2.returncode == 0, r2.stderr

    def strip(recs):
        return [{k: v for k, v in x.items() if k not in ("ts", "timings_ms", "rss_mb")} for x in recs]

    recs = read_jsonl(f"{a}.jsonl")
    assert len(recs) == 12 and strip(recs) == strip(read_jsonl(f"{b}.jsonl"))
    assert strip(recs) == strip([json.loads(line) for line in r.stdout.splitlines()])
    sa, sb = json.loads(Path(f"{a}.json").read_text()), json.loads(Path(f"{b}.json").read_text())
    assert STATS_KEYS <= set(sa) and set(sa) == set(sb) and sa["frames"] == sb["frames"] and sa["frames"]["processed"] == 12
    assert sorted(p.name.split("_")[-1] for p in a.iterdir()) == sorted(p.name.split("_")[-1] for p in b.iterdir())  # same frames
    assert Path(f"{a}.avi").stat().st_size > 0 and Path(f"{b}.avi").stat().st_size > 0


def test_memory_flat_over_5000_frames(tmp_path):
    """RSS after 5,000 frames within a few MB of RSS after 500 (a looping folder, the fastest source)."""
    write_folder(tmp_path / "imgs", 50)
    out = tmp_path / "out.jsonl"
    r = run_camera("--source", str(tmp_path / "imgs"), "--loop", "--frames", "5000", "--jsonl", str(out), "-T", "10", "-q", timeout=300)
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(out)
    assert len(recs) == 5000
    rss = {x["frame"] + 1: x["rss_mb"] for x in recs}
    growth = rss[5000] - rss[500]
    print(f"RSS after 500 frames {rss[500]:.1f} MB, after 5000 {rss[5000]:.1f} MB, growth {growth:+.2f} MB")
    assert growth < 4.0, (rss[500], rss[5000])


@pytest.mark.parametrize("uri, kind, target", [
    ("jsonl:-", "jsonl", "-"),
    ("jsonl:results.jsonl", "jsonl", "results.jsonl"),
    ("jsonl:///var/tmp/r.jsonl", "jsonl", "/var/tmp/r.jsonl"),
    ("video:/tmp/clip.mp4", "video", "/tmp/clip.mp4"),
    ("snapshots:ignored/", "snapshots", "ignored/"),
    ("stats:/tmp/stats.json", "stats", "/tmp/stats.json"),
    ("http://0.0.0.0:8080", "http", "0.0.0.0:8080"),
    ("http://[::1]:8080/", "http", "[::1]:8080"),
    ("mqtts://user:pw@broker.local", "mqtt", "mqtts://user:pw@broker.local"),
    ("display://0", "display", "0"),
])
def test_output_uri_forms(uri, kind, target):
    from edge_quq.sinks import alias_outputs, parse_output

    from edge_quq.redact import redact

    spec = parse_output(uri)
    # the label (quoted by error lines) never carries a password
    assert (spec.kind, spec.target, spec.label) == (kind, target, f"--output {redact(uri)}")
    # The old flags name the same outputs.
    old = {"jsonl": "jsonl", "video": "video_out", "snapshots": "snapshots", "stats": "stats_file", "http": "serve", "mqtt": "mqtt",
           "display": "display"}[kind]
    (alias,) = alias_outputs(**{old: True if kind == "display" else target})
    assert (alias.kind, alias.target) == (kind, target)


def test_unreadable_files_of_a_folder_are_reported(tmp_path):
    write_folder(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "img_0001b.png").write_bytes(b"not a png")
    stats = tmp_path / "stats.json"
    r = run_camera("--source", str(tmp_path / "imgs"), "--output", f"stats:{stats}", "-q")
    assert r.returncode == 0, r.stderr
    st = json.loads(stats.read_text())
    assert st["frames"]["processed"] == 3 and st["source_state"]["unreadable"] == 1
    assert "1 unreadable files" in r.stderr
