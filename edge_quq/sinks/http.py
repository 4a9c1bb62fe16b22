"""http://HOST:PORT (--serve): a live view for a browser on the same network (stdlib http.server, one thread per client).

    GET /             a small page: the stream, running ignore rate, latency, FPS (polls /status.json)
    GET /stream.mjpg  multipart/x-mixed-replace JPEG stream of annotated frames
    GET /frame.jpg    the latest annotated frame
    GET /status.json  running counters, the last decision, and the latest periodic stats (all read from the
                      run's LoopStats; the view counts nothing itself)

Frames are annotated and JPEG-encoded in the client's thread only while someone watches, so an unwatched
view costs the loop one reference assignment per frame.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple

from edge_quq.errors import OptionError
from edge_quq.loopstats import LoopStats
from edge_quq.sinks.base import FrameResult, Sink

DEFAULT_HOST = "127.0.0.1"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edge-quq camera</title>
<style>body{font-family:sans-serif;background:#111;color:#eee;margin:1em}img{max-width:100%;image-rendering:pixelated;border:1px solid #444}
td{padding:2px 10px}.keep{color:#5c5}.ignore{color:#e55}</style></head>
<body><h3>edge-quq camera <span id="source"></span></h3>
<img id="stream" src="stream.mjpg" alt="live stream">
<table>
<tr><td>decision</td><td id="decision">-</td></tr>
<tr><td>ignore rate</td><td id="ignore_rate">-</td></tr>
<tr><td>latency p50 / p90 (ms)</td><td id="latency">-</td></tr>
<tr><td>FPS</td><td id="fps">-</td></tr>
<tr><td>frames processed</td><td id="processed">-</td></tr>
<tr><td>state</td><td id="state">-</td></tr>
</table>
<script>
async function poll(){
  try{
    const s = await (await fetch('status.json',{cache:'no-store'})).json();
    const d = document.getElementById('decision');
    d.textContent = s.last ? (s.last.decision + ' ' + (s.last.label || ('(' + s.last.top_label + '?)'))) : '-';
    d.className = s.last ? s.last.decision : '';
    document.getElementById('ignore_rate').textContent = (100*s.ignore_rate).toFixed(1) + ' %';
    document.getElementById('latency').textContent = s.latency_ms_p50.toFixed(2) + ' / ' + s.latency_ms_p90.toFixed(2);
    document.getElementById('fps').textContent = s.fps.toFixed(1);
    document.getElementById('processed').textContent = s.processed;
    document.getElementById('state').textContent = s.state;
    document.getElementById('source').textContent = s.source;
  }catch(e){}
}
setInterval(poll, 1000); poll();
</script></body></html>
"""


def parse_hostport(spec: str, default_host: str = DEFAULT_HOST, label: str = "") -> Tuple[str, int]:
    """'HOST:PORT', ':PORT', 'PORT' or '[IPv6]:PORT'."""
    label = label or f"--serve {spec}"
    s = spec.strip()
    host, port_s = default_host, s
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise OptionError(f"{label}: expected [IPv6]:PORT")
        host, port_s = s[1:end], s[end + 2:]
    elif ":" in s:
        h, port_s = s.rsplit(":", 1)
        host = h or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise OptionError(f"{label}: port {port_s!r} is not a number (expected HOST:PORT, e.g. 127.0.0.1:8080)") from None
    if not 0 <= port <= 65535:
        raise OptionError(f"{label}: port {port} out of range")
    return host, port


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    """One client's requests; `sink` is set on a per-view subclass."""

    sink: "HttpSink"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # access logs would flood the journal
        pass

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/status.json":
            self._send(200, "application/json", json.dumps(self.sink.status()).encode())
        elif path == "/frame.jpg":
            jpg = self.sink._jpeg()
            if jpg is None:
                self._send(503, "text/plain", b"no frame yet\n")
            else:
                self._send(200, "image/jpeg", jpg)
        elif path == "/stream.mjpg":
            self._stream()
        else:
            self._send(404, "text/plain", b"not found\n")

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        seen = -1
        sink = self.sink
        with sink._cond:
            sink.clients += 1
        try:
            while not sink._closing.is_set():
                with sink._cond:
                    if sink._seq == seen:
                        sink._cond.wait(1.0)
                    if sink._seq == seen:
                        continue
                    seen = sink._seq
                jpg = sink._jpeg()
                if jpg is None:
                    continue
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                self.wfile.flush()
        except OSError:  # the browser went away
            pass
        finally:
            with sink._cond:
                sink.clients -= 1


class HttpSink(Sink):
    name = "http"

    def __init__(self, spec: str, source: str = "", stats: Optional[LoopStats] = None, label: str = "", jpeg_quality: int = 80) -> None:
        label = label or f"--serve {spec}"
        host, port = parse_hostport(spec, label=label)
        self.source = source
        # Standalone (no camera loop to read from), the view records the frames it shows into its own stats.
        self.own_stats = stats is None
        self.loop_stats = LoopStats(source) if stats is None else stats
        self.jpeg_quality = jpeg_quality
        self._cond = threading.Condition()
        self._latest: Optional[FrameResult] = None
        self._seq = 0
        self._closing = threading.Event()
        self.latest_stats: Dict[str, Any] = {}
        self.clients = 0
        server = type("Server6", (Server,), {"address_family": socket.AF_INET6}) if ":" in host else Server
        try:
            self.httpd = server((host, port), type("Handler", (_Handler,), {"sink": self}))
        except OSError as e:
            raise OptionError(f"{label}: cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="edge-quq-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}/"

    def _jpeg(self) -> Optional[bytes]:
        import cv2  # noqa: PLC0415

        r = self._latest
        if r is None:
            return None
        ok, buf = cv2.imencode(".jpg", r.annotated, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        return buf.tobytes() if ok else None

    def status(self) -> Dict[str, Any]:
        st = self.loop_stats
        total = st.latency().get("total", {})
        return {
            "updated": time.time(),
            "source": self.source,
            "state": st.state if st.processed else "starting",
            "processed": st.processed,
            "ignored": st.ignored,
            "ignore_rate": st.ignore_rate or 0.0,
            "latency_ms_p50": total.get("p50", 0.0),
            "latency_ms_p90": total.get("p90", 0.0),
            "fps": st.fps_ema,
            "clients": self.clients,
            "last": st.last,
            "stats": self.latest_stats,
        }

    def emit(self, r: FrameResult) -> None:
        if self.own_stats:
            self.loop_stats.record(r.prediction, r.time, r.index)
        with self._cond:
            self._latest = r
            self._seq += 1
            self._cond.notify_all()

    def stats(self, stats: Dict[str, Any]) -> None:
        self.latest_stats = stats

    def close(self) -> None:
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
