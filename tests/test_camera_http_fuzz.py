"""Property tests over HTTP requests to the live view (issue 15): random request lines, headers and bodies.
The view answers with an HTTP status line or closes the connection, never crashes, lets no traceback out,
answers a plain request afterwards, and serves nothing without the token. Bounded in examples and time."""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOKEN = "fuzz-t0ken"

methods = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "get", "", "G\x00T", "PRI", "CONNECT"]) | st.text(max_size=12)
paths = st.sampled_from(["/", "/status.json", "/frame.jpg", "/stream.mjpg", "/index.html", "//", "/../../etc/passwd", "*",
                         f"/status.json?token={TOKEN}", "/?token=", "/%00", "/" + "a" * 70000]) | st.text(max_size=200)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1.1", "", "HTTP/x"])
headers = st.lists(st.tuples(st.sampled_from(["Host", "Authorization", "Content-Length", "Connection", "Expect",
                                              "Transfer-Encoding", "X"]) | st.text(max_size=20),
                             st.sampled_from([f"Bearer {TOKEN}", "Bearer x", "100-continue", "-1", "99999999999", "keep-alive",
                                              "chunked"]) | st.text(max_size=100)), max_size=8)
bodies = st.binary(max_size=2000)
raw = st.binary(min_size=1, max_size=3000)


@pytest.fixture(scope="module")
def view():
    import edge_quq
    from edge_quq.sinks import FrameResult
    from edge_quq.sinks.http import HttpSink

    predictor = edge_quq.Predictor.from_bundle()
    f = sorted(p for p in edge_quq.SAMPLES_DIR.iterdir() if p.suffix == ".png")[0]
    v = HttpSink("127.0.0.1:0", log=lambda m: None, token=TOKEN, timeout_s=1.0, max_clients=8)
    v.emit(FrameResult.make(0, time.time(), np.zeros((64, 64, 3), np.uint8), predictor.predict(str(f))))
    yield v
    v.close()


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data`, close our side, read what comes back (a stream is cut after 1 s)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (it may refuse before reading everything)
            pass
        s.settimeout(1.0)
        got = b""
        try:
            while len(got) < 200000:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return got
    finally:
        s.close()


def _check(view, data: bytes) -> None:
    got = _exchange(view.port, data)
    assert got == b"" or got.startswith(b"HTTP/1."), got[:200]
    if got.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]:
        assert TOKEN.encode() in data  # nothing is served without the token
    assert b"Traceback" not in got and b"Python/" not in got


def _still_serving(view) -> None:
    got = _exchange(view.port, f"GET /status.json HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 200") and json.loads(got.split(b"\r\n\r\n", 1)[1])["connections"]["max"] == 8


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def test_random_requests(view, capfd):
    @FUZZ
    @given(methods, paths, versions, headers, bodies)
    def one(method, path, version, hdrs, body):
        lines = [f"{method} {path} {version}".strip()] + [f"{k}: {v}" for k, v in hdrs]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
        _check(view, data)

    one()
    _still_serving(view)
    assert "Traceback" not in capfd.readouterr().err


def test_random_bytes(view, capfd):
    @FUZZ
    @given(raw)
    def one(data):
        _check(view, data)

    one()
    _still_serving(view)
    assert "Traceback" not in capfd.readouterr().err
