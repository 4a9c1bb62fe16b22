"""Shared by the camera tests: real Fashion-MNIST frames in real video files and folders, a real MQTT broker,
an MJPEG-over-HTTP camera that can die and come back, and running the real command in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")
SCALE = 4  # 28x28 -> 112x112 frames, a small camera-like picture the bundle downsizes again
CLEAN, CORRUPT = "clean", "corrupt"


def fashion_test(n: int, offset: int = 0):
    """(images uint8 [n,28,28], labels) from the real Fashion-MNIST test set."""
    from edge_quq_export.datasets import load_fashion_mnist

    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")
    x, y = load_fashion_mnist("test", FASHION)
    return x[offset:offset + n].copy(), y[offset:offset + n].copy()


def to_frame(img28: np.ndarray) -> np.ndarray:
    import cv2

    big = cv2.resize(img28, (28 * SCALE, 28 * SCALE), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)


def corrupt(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two thirds of the picture lost to interference (random noise), the kind of frame the model must not trust.
    (Plain noise or blur alone is met with confident nonsense far more often by the default bundle;
    the test measures the ignore rates through the MJPG video.)"""
    out = frame.copy()
    h, w = frame.shape[:2]
    out[:, : 2 * w // 3] = rng.integers(0, 256, (h, 2 * w // 3, 1), dtype=np.uint8)
    return out


def write_video(path: Path, n: int = 300, corrupt_range=(100, 200), fps: float = 25.0, seed: int = 0) -> Dict[str, list]:
    """A real MJPG .avi of Fashion-MNIST test images; frames in corrupt_range are corrupted. Returns the
    ground truth per frame."""
    import cv2

    x, y = fashion_test(n)
    rng = np.random.default_rng(seed)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (28 * SCALE, 28 * SCALE))
    assert w.isOpened()
    kinds = []
    for i in range(n):
        fr = to_frame(x[i])
        bad = corrupt_range[0] <= i < corrupt_range[1]
        w.write(corrupt(fr, rng) if bad else fr)
        kinds.append(CORRUPT if bad else CLEAN)
    w.release()
    return {"labels": [int(v) for v in y], "kinds": kinds}


def write_folder(folder: Path, n: int, offset: int = 0) -> List[int]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    x, y = fashion_test(n, offset)
    for i in range(n):
        cv2.imwrite(str(folder / f"img_{i:04d}.png"), to_frame(x[i]))
    return [int(v) for v in y]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def camera_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "edge_quq", "camera", *args]


def start_camera(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(camera_cmd(*args), stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=subprocess.PIPE, text=True, **kw)


def run_camera(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(camera_cmd(*args), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path, live: bool = False) -> List[dict]:
    """The records of a JSON-lines file. `live`: the writer is still running, so a last line without its newline
    is one being appended (a reader can see a write half done), not yet a record; read after the writer stopped,
    such a line fails to parse, as a half-written record should."""
    text = Path(path).read_text()
    if live:
        text = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> float:
    """Send `sig`, wait for the exit; returns the seconds it took."""
    t0 = time.time()
    proc.send_signal(sig)
    proc.wait(timeout=timeout)
    return time.time() - t0


class Mosquitto:
    """A real broker on 127.0.0.1:<free port> (Debian's mosquitto), stoppable and restartable on the same port."""

    def __init__(self, tmp: Path, port: Optional[int] = None, users: Optional[Dict[str, str]] = None) -> None:
        import shutil

        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if exe is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.port = port or free_port()
        self.conf = tmp / "mosquitto.conf"
        conf = f"listener {self.port} 127.0.0.1\npersistence false\n"
        if users:  # a password file (mosquitto_passwd); "user root": read it where the test put it
            pw = tmp / "mosquitto.passwd"
            pw.write_text("")
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), name, password], check=True, capture_output=True)
            conf += f"allow_anonymous false\npassword_file {pw}\nuser root\n"
        else:
            conf += "allow_anonymous true\n"
        self.conf.write_text(conf)
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        # The broker's own log goes to a file beside its config: when a client cannot connect, it says why.
        self.log = self.conf.with_suffix(".log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf), "-v"], stdout=log, stderr=log)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        assert wait_for(up, 10), f"mosquitto did not start: {self.log.read_text()[-2000:]}"

    def diagnose(self) -> str:
        state = "running" if self.proc is not None and self.proc.poll() is None else f"exited ({self.proc.returncode if self.proc else '-'})"
        log = self.log.read_text()
        # Debian's mosquitto asks libwrap, as user mosquitto (it drops root), and libwrap refuses everyone when it
        # cannot read the files (a root "/" of mode 0700 did that in tests/fresh-machine.sh).
        hint = ""
        if "denied access by tcpd" in log:
            hint = "; TCP wrappers refused the client: a rule in /etc/hosts.deny, or /etc/hosts.* unreadable by user mosquitto"
        return f"broker {state}{hint}; its log: {log[-2000:]}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Subscriber:
    """A paho client in the test that records (time, topic, payload, retained) for a topic filter."""

    def __init__(self, port: int, topic: str, username: Optional[str] = None, password: Optional[str] = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: List[tuple] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}-{time.time_ns()}")

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe(topic, qos=1)
            self.connected.set()

        def on_message(client, userdata, msg):
            with self.lock:
                self.messages.append((time.time(), msg.topic, msg.payload.decode(), bool(msg.retain)))

        c.on_connect = on_connect
        c.on_message = on_message
        if username:
            c.username_pw_set(username, password)
        c.reconnect_delay_set(0.2, 1)
        c.connect_async("127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c
        # Generous: a loaded 2-core CI machine running a whole test suite beside this one is slow to schedule.
        assert self.connected.wait(30), f"no CONNACK from 127.0.0.1:{port} within 30 s"

    def on(self, suffix: str) -> List[tuple]:
        with self.lock:
            return [m for m in self.messages if m[1].endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MjpegServer:
    """An IP camera: multipart JPEG over HTTP on a fixed port; kill() drops every connection and stops
    listening (the camera died), start() brings it back on the same port. Clearing `flowing` freezes it
    (connections stay open, no frames); `open_delay_s` makes it slow to answer a connection. With `auth`
    (user, password) it wants HTTP basic auth, as IP cameras do (401 and a challenge without it)."""

    def __init__(self, frames: Sequence[bytes], fps: float = 30.0, port: Optional[int] = None, open_delay_s: float = 0.0,
                 auth: Optional[tuple] = None) -> None:
        self.frames, self.fps, self.open_delay_s = list(frames), fps, open_delay_s
        self.auth = auth
        self.refused = 0
        self.port = port or free_port()
        self.sent = 0
        self.connected_at: List[float] = []
        self.httpd: Optional[ThreadingHTTPServer] = None
        self.alive = threading.Event()
        self.flowing = threading.Event()
        self.flowing.set()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def start(self) -> None:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                if srv.auth is not None:
                    import base64

                    want = "Basic " + base64.b64encode(f"{srv.auth[0]}:{srv.auth[1]}".encode()).decode()
                    if self.headers.get("Authorization") != want:
                        srv.refused += 1
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                time.sleep(srv.open_delay_s)
                srv.connected_at.append(time.time())
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while srv.alive.is_set():
                        if not srv.flowing.is_set():
                            time.sleep(0.02)
                            continue
                        jpg = srv.frames[i % len(srv.frames)]
                        i += 1
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                        self.wfile.flush()
                        srv.sent += 1
                        time.sleep(1.0 / srv.fps)
                except OSError:
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.alive.set()
        self.httpd = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def kill(self) -> None:
        self.alive.clear()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
