"""Camera and broker passwords never leave the process (issue 15): a camera run with credentials in its source
and broker URLs, through every output, and every byte it wrote, served or published grepped for them."""
from __future__ import annotations

import json
import os
import stat
import urllib.request

from camera_util import Mosquitto, MjpegServer, Subscriber, free_port, run_camera, start_camera, stop, wait_for, write_folder

CAM_PW, BROKER_PW = "CamPass123", "BrokerPW"


def _jpegs(tmp_path, n=12):
    import cv2

    folder = tmp_path / "imgs"
    write_folder(folder, n)
    return [cv2.imencode(".jpg", cv2.imread(str(p)))[1].tobytes() for p in sorted(folder.iterdir())]


def test_no_output_carries_a_password(tmp_path):
    cam = MjpegServer(_jpegs(tmp_path), fps=20, auth=("admin", CAM_PW))
    broker = Mosquitto(tmp_path, users={"user": BROKER_PW, "watcher": "w"})
    sub = Subscriber(broker.port, "#", "watcher", "w")
    port = free_port()
    src = f"http://admin:{CAM_PW}@127.0.0.1:{cam.port}/video.mjpg"
    out, stats, snaps = tmp_path / "out.jsonl", tmp_path / "stats.json", tmp_path / "snaps"
    # --threshold 0.9999: (nearly) every frame is ignored, so every frame is also a snapshot
    proc = start_camera("--source", src, "--mqtt", f"mqtt://user:{BROKER_PW}@127.0.0.1:{broker.port}", "--mqtt-device", "cam1",
                        "--output", f"jsonl:{out}", "--stats-file", str(stats), "--snapshots", str(snaps), "--serve", f"127.0.0.1:{port}",
                        "--stats-interval", "0.3", "--threads", "1", "-T", "10", "--threshold", "0.9999")
    status = b""
    try:
        assert wait_for(lambda: proc.poll() is not None or (out.exists() and out.read_text().count("\n") >= 20), 60), proc.stderr.read() if proc.poll() is not None else ""
        assert wait_for(lambda: len(sub.on("/stats")) >= 2, 20)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            status = r.read()
        assert stop(proc) < 5 and proc.returncode == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()
        cam.kill()
    assert cam.refused == 0 or cam.sent > 0  # the camera did get the credentials
    published = "\n".join(m[2] for m in sub.messages)
    snapshot_json = "\n".join(p.read_text() for p in snaps.glob("*.json"))
    assert snapshot_json and published and status
    everything = {"stderr": err, "jsonl": out.read_text(), "stats file": stats.read_text(), "status.json": status.decode(),
                  "mqtt": published, "snapshots": snapshot_json}
    for name, text in everything.items():
        assert CAM_PW not in text and BROKER_PW not in text, f"a password leaks through {name}"
    # ... and the source is still recognisable, with its password masked
    assert json.loads(out.read_text().splitlines()[0])["source"] == f"http://admin:***@127.0.0.1:{cam.port}/video.mjpg"
    assert json.loads(stats.read_text())["source"].startswith("http://admin:***@")
    assert "admin:***@" in err  # the start-up line names the source
    # the stats file is not world-readable
    assert stat.S_IMODE(os.stat(stats).st_mode) & 0o007 == 0


def test_error_lines_mask_passwords(tmp_path):
    write_folder(tmp_path / "imgs", 2)
    r = run_camera("--source", str(tmp_path / "imgs"), "--mqtt", "mqtt://user:PW123secret@host:99999")
    assert r.returncode == 2 and "PW123secret" not in r.stderr and "user:***@host" in r.stderr, r.stderr
    r = run_camera("--source", "rtsp://admin:CamPass123@", "-T", "10")
    assert r.returncode == 2 and "CamPass123" not in r.stderr, r.stderr
    r = run_camera("--source", str(tmp_path / "imgs"), "--output", "mqtt://user:PW123secret@host/topic")
    assert r.returncode == 2 and "PW123secret" not in r.stderr, r.stderr


def test_health_and_config_output_mask_passwords(tmp_path):
    from click.testing import CliRunner

    from edge_quq.cli import main

    cfg = tmp_path / "config"
    cfg.write_text(f'source = "{tmp_path}"\nmqtt = "mqtt://user:PW123secret@host:99999"\n')
    r = CliRunner().invoke(main, ["health", "--config", str(cfg), "--no-model"])
    assert r.exit_code == 1 and "PW123secret" not in r.output and "service config is invalid" in r.output, r.output
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"updated": 2e9, "state": "running", "source": "rtsp://a:PW123secret@cam/x"}))
    r = CliRunner().invoke(main, ["health", "--stats-file", str(stats), "--no-model", "--json"])
    assert "PW123secret" not in r.output
