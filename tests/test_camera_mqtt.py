"""`edge-quq camera --mqtt` against a real Mosquitto broker started here on 127.0.0.1 (Debian `mosquitto`)."""
from __future__ import annotations

import json
import signal
import time

import pytest

from camera_util import Mosquitto, Subscriber, read_jsonl, run_camera, start_camera, stop, wait_for, write_folder, write_video

pytest.importorskip("paho.mqtt")

RESULT_KEYS = {"ts", "frame", "decision", "label", "class_index", "top_label", "top_index", "score", "interval", "rule", "ignored_by",
               "policy", "ood_p", "drift_alarm", "latency_ms", "last_kept_label"}


@pytest.fixture()
def broker(tmp_path):
    b = Mosquitto(tmp_path)
    yield b
    print(b.diagnose())  # shown with a failing test's captured output
    b.stop()


def test_topics_and_payloads(tmp_path, broker):
    video = tmp_path / "v.avi"
    write_video(video, n=150, corrupt_range=(50, 100))
    sub = Subscriber(broker.port, "edge-quq/#")
    out = tmp_path / "out.jsonl"
    try:
        r = run_camera("--source", str(video), "--mqtt", broker.url, "--mqtt-device", "cam1", "--jsonl", str(out),
                       "--stats-interval", "0.2", "--max-fps", "100", "--seed", "3")
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    finally:
        sub.close()
    avail = [m[2] for m in sub.on("edge-quq/cam1/available")]
    assert avail[0] == "online" and avail[-1] == "offline"  # a clean stop says offline itself

    recs = read_jsonl(out)
    # Published on every change of decision or class: exactly the frames where (decision, class) changed.
    keys = [(x["decision"], x["class_index"]) for x in recs]
    changes = [x["frame"] for i, x in enumerate(recs) if i == 0 or keys[i] != keys[i - 1]]
    results = [json.loads(m[2]) for m in sub.on("edge-quq/cam1/result")]
    assert [p["frame"] for p in results] == changes
    for p in results:
        assert set(p) == RESULT_KEYS
        assert p["decision"] in ("keep", "ignore") and (p["label"] is None) == (p["decision"] == "ignore")
        assert p["interval"][0] <= p["score"] <= p["interval"][1] + 1e-6
    by_frame = {x["frame"]: x for x in recs}
    assert all(by_frame[p["frame"]]["decision"] == p["decision"] and by_frame[p["frame"]]["label"] == p["label"] for p in results)

    # The drift topic: retained, on the first frame and on every change of the alarm (tests/test_camera_drift.py
    # has a stream that raises it).
    drift = [(json.loads(m[2]), m[3]) for m in sub.on("edge-quq/cam1/drift")]
    alarm = [x["drift"]["alarm"] for x in recs]
    assert [d["frame"] for d, _ in drift] == [x["frame"] for i, x in enumerate(recs) if i == 0 or alarm[i] != alarm[i - 1]]
    assert all(set(d) == {"ts", "frame", "alarm", "log10_martingale", "since_frame"} for d, _ in drift)

    stats = [json.loads(m[2]) for m in sub.on("edge-quq/cam1/stats")]
    assert stats and {"updated", "state", "frames", "ignore_rate", "latency_ms", "rss_mb"} <= set(stats[-1])
    assert stats[-1]["state"] == "stopped" and stats[-1]["frames"]["processed"] == 150


def test_every_frame_and_credentials_from_env(tmp_path, broker):
    write_folder(tmp_path / "imgs", 12)
    sub = Subscriber(broker.port, "site/#")
    try:
        import os
        import subprocess
        import sys

        env = dict(os.environ, EDGE_QUQ_MQTT_USERNAME="someone", EDGE_QUQ_MQTT_PASSWORD="secret")  # anonymous broker accepts any
        r = subprocess.run([sys.executable, "-m", "edge_quq", "camera", "--source", str(tmp_path / "imgs"), "--mqtt", broker.url,
                            "--mqtt-prefix", "site", "--mqtt-device", "door", "--mqtt-every-frame", "--max-fps", "50", "-q"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    finally:
        sub.close()
    assert [json.loads(m[2])["frame"] for m in sub.on("site/door/result")] == list(range(12))


def test_last_will_on_sigkill(tmp_path, broker):
    write_folder(tmp_path / "imgs", 10)
    sub = Subscriber(broker.port, "edge-quq/kill/available")
    proc = start_camera("--source", str(tmp_path / "imgs"), "--loop", "--max-fps", "20", "--mqtt", broker.url, "--mqtt-device", "kill", "-q")
    try:
        assert wait_for(lambda: [m[2] for m in sub.messages] == ["online"], 60), sub.messages
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: [m[2] for m in sub.messages] == ["online", "offline"], 10), sub.messages
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    # Retained: a subscriber that comes later still sees the device offline.
    late = Subscriber(broker.port, "edge-quq/kill/available")
    try:
        assert wait_for(lambda: late.messages, 5)
        assert late.messages[-1][2] == "offline" and late.messages[-1][3]
    finally:
        late.close()


def test_broker_down_mid_run_loses_no_frames(tmp_path, broker):
    write_folder(tmp_path / "imgs", 30)
    out = tmp_path / "out.jsonl"
    sub = Subscriber(broker.port, "edge-quq/flaky/#")
    proc = start_camera("--source", str(tmp_path / "imgs"), "--loop", "--frames", "600", "--max-fps", "60", "--jsonl", str(out),
                        "--mqtt", broker.url, "--mqtt-device", "flaky", "--mqtt-every-frame", "--stats-interval", "0.5", "-q")
    try:
        assert wait_for(lambda: sub.on("/result"), 60)
        broker.stop()
        down_at = len(read_jsonl(out, live=True))
        time.sleep(1.5)
        during = len(read_jsonl(out, live=True))
        assert during > down_at + 30  # the loop kept its pace while the broker was gone
        broker.start()
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    recs = read_jsonl(out)
    assert [x["frame"] for x in recs] == list(range(600))
    avail = [m[2] for m in sub.on("/available")]
    assert avail.count("online") >= 2  # reconnected (with backoff) and announced itself again
