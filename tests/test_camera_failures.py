"""What goes wrong around a camera run (issue 15): a damaged video, a full disk, a broker that refuses us, a
start that is refused, odd stats files and configs for `edge-quq health`. Real files, a real tmpfs, a real
mosquitto with a password file, the real command in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from camera_util import Mosquitto, fashion_test, free_port, read_jsonl, run_camera, start_camera, stop, to_frame, wait_for, write_folder

FAST = ("-T", "10", "--threads", "1")


# -- damaged video ----------------------------------------------------------------------------------------
def _damaged_mp4(path: Path, n: int = 600) -> int:
    """An mp4 of Fashion-MNIST frames with 2 % of its bytes zeroed at 30 %; returns how many of its frames
    OpenCV can still decode (each one sought and read on its own)."""
    import cv2

    x, _ = fashion_test(n)
    clean = path.with_name("clean.mp4")
    w = cv2.VideoWriter(str(clean), cv2.VideoWriter_fourcc(*"mp4v"), 25, (112, 112))
    assert w.isOpened()
    for i in range(n):
        w.write(to_frame(x[i]))
    w.release()
    data = bytearray(clean.read_bytes())
    a = int(len(data) * 0.30)
    data[a:a + len(data) // 50] = bytes(len(data) // 50)
    path.write_bytes(bytes(data))
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    decodable = 0
    for i in range(n):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        decodable += bool(cap.read()[0])
    cap.release()
    return decodable


def test_a_damaged_stretch_is_skipped_and_counted(tmp_path):
    video = tmp_path / "damaged.mp4"
    decodable = _damaged_mp4(video)
    assert 300 < decodable < 600  # the damage is real, and most of the file survives it
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    r = run_camera("--source", str(video), "--jsonl", str(out), "--stats-file", str(stats), *FAST)
    assert r.returncode == 0, r.stderr
    st = json.loads(stats.read_text())
    processed = len(read_jsonl(out))
    # the issue: the run stopped at frame 187 of 600, exit 0, "end of source"
    assert abs(processed - decodable) <= 10, (processed, decodable)
    assert st["frames"]["processed"] == processed and st["frames"]["decode_errors"] >= 600 - decodable - 10
    assert f"{st['frames']['decode_errors']} undecodable" in r.stderr


def test_more_damage_than_allowed_ends_the_run_with_an_error(tmp_path):
    video = tmp_path / "damaged.mp4"
    _damaged_mp4(video)
    out = tmp_path / "out.jsonl"
    r = run_camera("--source", str(video), "--jsonl", str(out), "--max-decode-errors", "5", *FAST)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --source ") and "more than 5 undecodable frames" in last, r.stderr
    assert "Traceback" not in r.stderr and 150 < len(read_jsonl(out)) < 300


# -- full disk --------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_leaves_whole_records_and_says_so_once(tmp_path, small_disk):
    write_folder(tmp_path / "imgs", 20)
    stats = tmp_path / "stats.json"  # outside the full disk: it must count what failed inside
    r = run_camera("--source", str(tmp_path / "imgs"), "--loop", "--frames", "300", "--threshold", "0.9999",
                   "--jsonl", str(small_disk / "out.jsonl"), "--snapshots", str(small_disk / "snaps"), "--stats-file", str(stats),
                   "--output", f"stats:{small_disk / 'stats2.json'}", "--stats-interval", "0.05", *FAST)
    assert r.returncode == 0, r.stderr
    raw = (small_disk / "out.jsonl").read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())
    snaps = small_disk / "snaps"
    pngs, jsons = {p.stem for p in snaps.glob("*.png")}, {p.stem for p in snaps.glob("*.json")}
    assert pngs == jsons and all(p.stat().st_size > 0 for p in snaps.iterdir())
    assert not [p.name for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    if (small_disk / "stats2.json").exists():
        json.loads((small_disk / "stats2.json").read_text())
    st = json.loads(stats.read_text())
    errs = st["sink_errors"]
    assert errs["snapshots"]["count"] > 10 and errs["jsonl"]["count"] > 10, errs
    # said once each, not at every stats interval or frame
    for name in ("jsonl", "snapshots", "stats"):
        said = [line for line in r.stderr.splitlines() if line.startswith(f"warning: {name} output")]
        assert len(said) <= 1, r.stderr
    assert "output errors: " in r.stderr and "Traceback" not in r.stderr


def test_a_flapping_output_is_said_once_per_quiet_period():
    from edge_quq.sinks.base import Failures

    said: list = []
    f = Failures("snapshots", said.append, every_s=3600)
    for _ in range(5):  # a nearly full disk: one record fits, the next does not
        f.failed("No space left on device")
        f.ok()
    assert said == ["warning: snapshots output: No space left on device", "snapshots output works again (after 1 failures so far)"]
    assert f.entry() == {"error": "No space left on device", "count": 5, "failing": False}
    said.clear()
    g = Failures("jsonl", said.append, every_s=0)  # no quiet period: every new run of failures is said
    g.failed("full")
    g.failed("full")
    g.ok()
    g.failed("full")
    assert said[0] == "warning: jsonl output: full" and said[1].startswith("warning: jsonl output still failing (1 failures")
    assert said[2:] == ["jsonl output works again (after 2 failures so far)", "warning: jsonl output: full"]


# -- refused starts ---------------------------------------------------------------------------------------
def test_a_refused_start_leaves_nothing_behind(tmp_path):
    write_folder(tmp_path / "imgs", 3)
    d = tmp_path / "out"
    d.mkdir()
    r = run_camera("--source", str(tmp_path / "imgs"), "--roi", "500,500,10,10", "--stats-file", str(d / "stats.json"),
                   "--snapshots", str(d / "snaps"), "--jsonl", str(d / "sub" / "out.jsonl"), *FAST)
    assert r.returncode == 2 and "lies outside the 112x112 frame" in r.stderr, r.stderr
    assert list(d.iterdir()) == []
    r = run_camera("--source", str(tmp_path / "imgs"), "--snapshots", str(d / "snaps"), "--stats-file", str(d / "stats.json"),
                   "--output", "video:/proc/x.avi", *FAST)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --output video:/proc/x.avi: OpenCV cannot write this file"
    assert list(d.iterdir()) == []


# -- MQTT failures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["wrong password", "mqtts to a plain port", "unreachable"])
def test_mqtt_failures_are_reported_and_the_loop_runs_on(tmp_path, case):
    write_folder(tmp_path / "imgs", 10)
    broker = Mosquitto(tmp_path, users={"user": "right"}) if case != "unreachable" else None
    url = {"wrong password": f"mqtt://user:wrong@127.0.0.1:{broker.port if broker else 0}",
           "mqtts to a plain port": f"mqtts://user:right@127.0.0.1:{broker.port if broker else 0}",
           "unreachable": f"mqtt://127.0.0.1:{free_port()}"}[case]
    stats, out = tmp_path / "stats.json", tmp_path / "out.jsonl"
    proc = start_camera("--source", str(tmp_path / "imgs"), "--loop", "--max-fps", "20", "--mqtt", url, "--stats-file", str(stats),
                        "--jsonl", str(out), "--stats-interval", "0.3", "-q", *FAST)
    try:
        def reported() -> bool:
            try:
                return "mqtt" in json.loads(stats.read_text())["sink_errors"]
            except (OSError, ValueError, KeyError):
                return False

        assert wait_for(lambda: reported() or proc.poll() is not None, 30), proc.stderr.read() if proc.poll() is not None else ""
        n = len(read_jsonl(out, live=True))
        assert wait_for(lambda: len(read_jsonl(out, live=True)) > n + 10, 30)  # the loop keeps running
        h = subprocess.run([sys.executable, "-m", "edge_quq", "health", "--stats-file", str(stats), "--no-model"], capture_output=True, text=True)
        assert h.returncode == 1 and h.stderr.startswith("unhealthy: outputs failing: mqtt failing"), h.stderr
        assert stop(proc) < 5 and proc.returncode == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if broker:
            broker.stop()
    said = [line for line in err.splitlines() if line.startswith("warning: mqtt output")]
    assert len(said) == 1, err
    if case == "wrong password":
        assert "Not authorized" in said[0] or "Bad user name or password" in said[0]
    e = json.loads(stats.read_text())["sink_errors"]["mqtt"]
    assert e["count"] >= 1 and e["failing"] and "output errors: mqtt failing" in err


# -- health on odd files and configs ----------------------------------------------------------------------
def _health(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_quq", "health", *args], capture_output=True, text=True, timeout=timeout)


def test_health_on_a_non_utf8_stats_file_is_one_line(tmp_path):
    f = tmp_path / "stats.json"
    f.write_bytes(b'{"updated": 1, "state": "\xff\xfe"}')
    r = _health("--stats-file", str(f), "--no-model")
    assert r.returncode == 1 and r.stderr.strip() == f"unhealthy: stats file {f} is not UTF-8 text (invalid start byte at byte 25)"


def test_health_refuses_a_fifo_instead_of_hanging(tmp_path):
    f = tmp_path / "stats.json"
    os.mkfifo(f)
    r = _health("--stats-file", str(f), "--no-model", timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == f"unhealthy: cannot read stats file {f} (not a regular file)"


@pytest.mark.parametrize("line, why", [
    ('roi = "1,2"', "--roi 1,2: expected X,Y,W,H"),
    ('output = ["bogus:x"]', "unknown output bogus:"),
    ('video-out = "out.xyz"', "unknown container .xyz"),
    ('mqtt = "mqtt://u:PW@host:99999"', "not a broker URL"),
])
def test_health_config_refuses_what_the_camera_refuses(tmp_path, line, why):
    write_folder(tmp_path / "imgs", 2)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"updated": time.time(), "state": "running"}))
    cfg = tmp_path / "config"
    cfg.write_text(f'source = "{tmp_path / "imgs"}"\nstats-file = "{stats}"\n{line}\n')
    r = _health("--config", str(cfg), "--no-model")
    assert r.returncode == 1 and r.stderr.startswith(f"unhealthy: service config is invalid: {cfg}: ") and why in r.stderr, r.stderr
    # and the camera itself refuses the same file
    c = run_camera("--config", str(cfg), *FAST)
    assert c.returncode == 2 and why in c.stderr
