"""The service contract of `edge-quq camera` under systemd, without systemd: the real command in a
subprocess, a datagram socket standing in for $NOTIFY_SOCKET, and an HTTP MJPEG "IP camera" that can freeze
(the connection stays open, no frames come), which is what a stalled source looks like to the loop.

Checked: READY=1 only once the source is open (the camera answers 1.5 s late here) and before any
WATCHDOG=1; WATCHDOG=1 at the rate WATCHDOG_USEC asks while frames flow; none while the source is frozen
(stats state "stalled", `edge-quq health` unhealthy); pings again once frames come back; STOPPING=1 on SIGTERM,
a clean exit, and stats state "stopped".
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from camera_util import MjpegServer, wait_for

SAMPLES = Path(__file__).resolve().parents[1] / "edge_quq" / "data" / "samples"


class NotifySocket:
    """What systemd listens on: collects (time, message) datagrams in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: List[Tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.time(), data.decode()))

    def between(self, t0: float, t1: float, key: str) -> List[float]:
        return [t for t, m in self.messages if t0 <= t < t1 and key in m.split("\n")]

    def first(self, key: str) -> Optional[float]:
        ts = [t for t, m in self.messages if key in m.split("\n")]
        return ts[0] if ts else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture()
def frames() -> List[bytes]:
    import cv2

    out = []
    for f in sorted(SAMPLES.iterdir()):
        img = cv2.imread(str(f))
        if img is not None:
            out.append(cv2.imencode(".jpg", cv2.resize(img, (96, 96)))[1].tobytes())
    assert out
    return out


def test_notify_protocol_ready_watchdog_stall_stopping(tmp_path, frames):
    cam = MjpegServer(frames, fps=25.0, open_delay_s=1.5)
    # AF_UNIX paths stop at 107 bytes; pytest's tmp_path for this test name can come close.
    sock_dir = Path(tempfile.mkdtemp(prefix="eqn-"))
    notify = NotifySocket(sock_dir / "notify.sock")
    stats = tmp_path / "stats.json"
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")  # ping every 0.5 s
    env.pop("WATCHDOG_PID", None)
    cmd = [sys.executable, "-m", "edge_quq", "camera", "--source", cam.url, "--stats-file", str(stats),
           "--stats-interval", "0.5", "--stall-timeout", "1", "--threads", "1", "-T", "10"]
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: notify.first("READY=1") is not None, 60), f"no READY=1; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        ready = notify.first("READY=1")
        # The source answered 1.5 s after it was asked: READY=1 waits for it, and nothing is pinged before.
        assert cam.connected_at and ready >= cam.connected_at[0] and ready - started >= 1.5
        assert not notify.between(0, ready, "WATCHDOG=1")

        # Frames flow: pings at about the requested half-interval.
        t0 = time.time()
        time.sleep(3.0)
        pings = notify.between(t0, time.time(), "WATCHDOG=1")
        assert len(pings) >= 4, notify.messages
        # Rate-limited to WATCHDOG_USEC/2 (0.5 s), not one per frame (0.04 s); receive times jitter under load.
        assert min(b - a for a, b in zip(pings, pings[1:])) >= 0.3
        assert wait_for(lambda: read_stats(stats).get("state") == "running", 5)
        h = subprocess.run([sys.executable, "-m", "edge_quq", "health", "--stats-file", str(stats), "--max-age", "5", "--no-model"],
                           capture_output=True, text=True)
        assert h.returncode == 0, h.stderr

        # The camera freezes: after the frames already in flight, no ping at all; the loop says "stalled".
        cam.flowing.clear()
        frozen = time.time()
        time.sleep(1.0)
        quiet_from = time.time()
        assert wait_for(lambda: read_stats(stats).get("state") == "stalled", 10), read_stats(stats)
        time.sleep(2.5)
        assert notify.between(quiet_from, time.time(), "WATCHDOG=1") == [], notify.messages
        assert notify.between(frozen, time.time(), "WATCHDOG=1") == notify.between(frozen, quiet_from, "WATCHDOG=1")
        h = subprocess.run([sys.executable, "-m", "edge_quq", "health", "--stats-file", str(stats), "--max-age", "5", "--no-model"],
                           capture_output=True, text=True)
        assert h.returncode == 1 and "'stalled'" in h.stderr

        # Frames come back (the loop reopens the source): pings resume.
        cam.flowing.set()
        back = time.time()
        assert wait_for(lambda: notify.between(back, time.time(), "WATCHDOG=1"), 20), notify.messages

        # SIGTERM: STOPPING=1, a clean exit, and the last stats say "stopped".
        term = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
        assert notify.between(term, time.time() + 1, "STOPPING=1"), notify.messages
        assert read_stats(stats).get("state") == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        cam.kill()
        shutil.rmtree(sock_dir, ignore_errors=True)
