"""http://HOST:PORT (--serve): a live view for a browser on the same network (stdlib http.server).

    GET /             a small page: the stream, the last decision with its policy, why it was ignored
                      (ignored_by), the detector flags and OOD p-value, the drift state, running ignore
                      rate, latency, FPS (polls /status.json)
    GET /stream.mjpg  multipart/x-mixed-replace JPEG stream of annotated frames
    GET /frame.jpg    the latest annotated frame
    GET /status.json  running counters, the last decision, the drift state, and the latest periodic stats (all read from the
                      run's LoopStats; the view counts nothing itself)

Frames are annotated and JPEG-encoded only while someone watches, once per frame however many viewers
there are (the first viewer thread to want a frame encodes it, the others reuse the bytes), so an unwatched
view costs the loop one reference assignment per frame.

Hostile or broken clients cannot take the loop down with them: connections are served by a bounded pool
of at most `max_clients` threads (one more connection gets an immediate 503 and is closed, so idle sockets
cannot pile up to the process's file limit), every connection has a socket timeout (a half-sent request or
a viewer that stops reading is closed after `timeout_s`), a client that goes away mid-request is counted,
not printed, and the Server header names no Python version.

Access control (--serve-token TOKEN): every request must carry the token, as `Authorization: Bearer TOKEN`
or as `?token=TOKEN` in the URL (what a browser uses: open http://HOST:PORT/?token=TOKEN; the page passes
it on to the stream and status requests). Binding beyond loopback without a token is warned about once.
"""
from __future__ import annotations

import hmac
import ipaddress
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Dict, Optional, Set, Tuple
from urllib.parse import parse_qs, quote, urlsplit

from edge_quq.errors import OptionError
from edge_quq.loopstats import LoopStats
from edge_quq.redact import redact, redact_obj
from edge_quq.sinks.base import FrameResult, Sink
from edge_quq.result import dumps

DEFAULT_HOST = "127.0.0.1"
MAX_CLIENTS = 64  # connections served at once (MJPEG viewers included); one more gets 503
CLIENT_TIMEOUT_S = 10.0  # a connection silent (or not reading) this long is closed
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 17\r\nConnection: close\r\nRetry-After: 5\r\n\r\ntoo many clients\n"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edge-quq camera</title>
<style>body{font-family:sans-serif;background:#111;color:#eee;margin:1em}img{max-width:100%;image-rendering:pixelated;border:1px solid #444}
td{padding:2px 10px}.keep{color:#5c5}.ignore{color:#e55}</style></head>
<body><h3>edge-quq camera <span id="source"></span></h3>
<img id="stream" src="stream.mjpg__Q__" alt="live stream">
<table>
<tr><td>decision</td><td id="decision">-</td></tr>
<tr><td>policy</td><td id="policy">-</td></tr>
<tr><td>ignored by</td><td id="ignored_by">-</td></tr>
<tr><td>detector flags</td><td id="flagged">-</td></tr>
<tr><td>OOD p</td><td id="ood_p">-</td></tr>
<tr><td>drift</td><td id="drift">-</td></tr>
<tr><td>ignore rate</td><td id="ignore_rate">-</td></tr>
<tr><td>latency p50 / p90 (ms)</td><td id="latency">-</td></tr>
<tr><td>FPS</td><td id="fps">-</td></tr>
<tr><td>frames processed</td><td id="processed">-</td></tr>
<tr><td>state</td><td id="state">-</td></tr>
</table>
<script>
async function poll(){
  try{
    const s = await (await fetch('status.json__Q__',{cache:'no-store'})).json();
    const d = document.getElementById('decision');
    d.textContent = s.last ? (s.last.decision + ' ' + (s.last.label || ('(' + s.last.top_label + '?)'))) : '-';
    d.className = s.last ? s.last.decision : '';
    const L = s.last || {};
    document.getElementById('policy').textContent = L.policy || '-';
    document.getElementById('ignored_by').textContent = (L.ignored_by && L.ignored_by.length) ? L.ignored_by.join(', ') : '-';
    document.getElementById('flagged').textContent = (L.flagged && L.flagged.length) ? L.flagged.join(', ') : 'none';
    document.getElementById('ood_p').textContent = (L.ood_p === null || L.ood_p === undefined) ? '-' : L.ood_p.toFixed(4);
    const dr = document.getElementById('drift');
    dr.textContent = !s.drift ? 'off' : (s.drift.alarm ? ('ALARM since frame ' + s.drift.since_frame) : 'no alarm')
      + (s.drift ? ' (log10 M ' + s.drift.log10_martingale.toFixed(2) + ')' : '');
    dr.className = s.drift && s.drift.alarm ? 'ignore' : 'keep';
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(HTTPServer):
    """HTTPServer whose connections are handled by a bounded pool of daemon threads. At most `max_clients`
    connections are open at once; the accept loop answers one more with a canned 503 and closes it without
    ever blocking on it."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: Tuple[str, int], handler: Any, max_clients: int = MAX_CLIENTS) -> None:
        self.max_clients = max_clients
        self.active: Set[socket.socket] = set()
        self.rejected = 0  # connections answered 503 (over max_clients)
        self.dropped = 0  # connections that failed mid-request (client went away, timeout, bad bytes)
        self.served = 0
        self._lock = threading.Lock()
        self._work: "queue.Queue[Optional[Tuple[socket.socket, Any]]]" = queue.Queue()
        self._workers = 0
        self._idle = 0
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also asks DNS for the host's name (socket.getfqdn), which nothing here uses
        # and which can hang for seconds on a board without a resolver.
        import socketserver  # noqa: PLC0415

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self._lock:
            full = len(self.active) >= self.max_clients
            if not full:
                self.active.add(request)
                spawn = self._idle == 0
                self._idle = max(self._idle - 1, 0)
        if full:
            self.rejected += 1
            try:
                request.setblocking(False)
                request.send(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        if spawn:
            self._workers += 1
            threading.Thread(target=self._worker, name="edge-quq-http-client", daemon=True).start()
        self._work.put((request, client_address))

    def _worker(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            request, addr = job
            try:
                self.finish_request(request, addr)
                self.served += 1
            except Exception:  # the client went away, timed out or sent garbage: its problem, not the loop's
                self.dropped += 1
            finally:
                with self._lock:
                    self.active.discard(request)
                    self._idle += 1
                self.shutdown_request(request)

    def close_clients(self) -> None:
        """Wake every thread blocked on a client (a stop must not wait for the clients' timeouts)."""
        with self._lock:
            socks = list(self.active)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _ in range(self._workers):
            self._work.put(None)


class _Handler(BaseHTTPRequestHandler):
    """One client's requests; `sink` and `timeout` are set on a per-view subclass."""

    sink: "HttpSink"
    protocol_version = "HTTP/1.1"
    server_version = "edge-quq"
    # The stdlib answers a request it cannot parse in HTTP/0.9 style (a bare HTML body, no status line);
    # every answer here starts with a status line.
    default_request_version = "HTTP/1.0"

    def version_string(self) -> str:  # the default adds "Python/3.x.y"
        return self.server_version

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):  # "HTTP/0.9" would be answered without headers
            self.request_version = "HTTP/1.0"
            self.send_error(505, "HTTP/1.0 or HTTP/1.1 only")
            return False
        return True

    def log_message(self, *args: Any) -> None:  # access logs would flood the journal
        pass

    def _send(self, code: int, ctype: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> Tuple[bool, str]:
        """(allowed, the query to pass the token on to the page's own requests)."""
        token = self.sink.token
        if not token:
            return True, ""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            return True, ""
        given = parse_qs(urlsplit(self.path).query).get("token", [""])[0]
        if hmac.compare_digest(given.encode(), token.encode()):
            return True, "?token=" + quote(token, safe="")
        return False, ""

    def do_GET(self) -> None:
        ok, q = self._authorized()
        path = urlsplit(self.path).path
        if not ok:
            self._send(401, "text/plain", b"token required (?token=TOKEN or Authorization: Bearer TOKEN)\n",
                       {"WWW-Authenticate": 'Bearer realm="edge-quq"'})
        elif path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", PAGE.replace("__Q__", q).encode())
        elif path == "/status.json":
            self._send(200, "application/json", dumps(self.sink.status()).encode())
        elif path == "/frame.jpg":
            jpg = self.sink.jpeg()[1]
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
                seen, jpg = sink.jpeg()
                if jpg is None:
                    continue
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                self.wfile.flush()
        except OSError:  # the browser went away (or stopped reading for longer than the timeout)
            pass
        finally:
            with sink._cond:
                sink.clients -= 1


class HttpSink(Sink):
    name = "http"

    def __init__(self, spec: str, source: str = "", stats: Optional[LoopStats] = None, label: str = "", jpeg_quality: int = 80,
                 token: Optional[str] = None, max_clients: int = MAX_CLIENTS, timeout_s: float = CLIENT_TIMEOUT_S,
                 log: Optional[Callable[[str], None]] = None) -> None:
        label = label or f"--serve {spec}"
        host, port = parse_hostport(spec, label=label)
        self.source = redact(source)
        # Standalone (no camera loop to read from), the view records the frames it shows into its own stats.
        self.own_stats = stats is None
        self.loop_stats = LoopStats(source) if stats is None else stats
        self.jpeg_quality = jpeg_quality
        self.token = token or None
        self._cond = threading.Condition()
        self._latest: Optional[FrameResult] = None
        self._seq = 0
        self._encode_lock = threading.Lock()
        self._encoded: Tuple[int, Optional[bytes]] = (-1, None)
        self.encodes = 0  # JPEG encodes done (one per frame shown, however many viewers)
        self._closing = threading.Event()
        self.latest_stats: Dict[str, Any] = {}
        self.clients = 0
        server = type("Server6", (Server,), {"address_family": socket.AF_INET6}) if ":" in host else Server
        handler = type("Handler", (_Handler,), {"sink": self, "timeout": timeout_s})
        try:
            self.httpd = server((host, port), handler, max_clients)
        except OSError as e:
            raise OptionError(f"{label}: cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.host, self.port = host, self.httpd.server_address[1]
        if not self.token and not is_loopback(host) and log is not None:
            log(f"warning: {label}: the live view is open to the network without a token; anyone who can reach "
                f"port {self.port} sees the camera (set --serve-token)")
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="edge-quq-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}/"

    def jpeg(self) -> Tuple[int, Optional[bytes]]:
        """(frame sequence number, JPEG of the latest annotated frame): encoded once per frame, by whichever
        viewer asks first; the others get the same bytes."""
        import cv2  # noqa: PLC0415

        with self._encode_lock:
            with self._cond:  # read under the encode lock: a viewer never encodes a frame already replaced
                r, seq = self._latest, self._seq
            if r is None:
                return seq, None
            if self._encoded[0] == seq:
                return self._encoded
            ok, buf = cv2.imencode(".jpg", r.annotated, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            self.encodes += 1
            self._encoded = (seq, buf.tobytes() if ok else None)
            return self._encoded

    def status(self) -> Dict[str, Any]:
        st = self.loop_stats
        total = st.latency().get("total", {})
        httpd = self.httpd
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
            "connections": {"open": len(httpd.active), "max": httpd.max_clients, "rejected": httpd.rejected, "dropped": httpd.dropped},
            "last": st.last,
            "drift": st.drift,
            "stats": self.latest_stats,
        }

    def emit(self, r: FrameResult) -> None:
        if self.own_stats:
            self.loop_stats.record(r.prediction, r.time, r.index, r.drift)
        with self._cond:
            self._latest = r
            self._seq += 1
            streaming = self.clients > 0
        if streaming:
            # Encoded here, in the loop's thread, while someone streams: OpenCV's and malloc's per-thread
            # buffers then exist once, not once per viewer thread (50 viewers cost ~200 MB of RSS otherwise).
            self.jpeg()
        with self._cond:
            self._cond.notify_all()

    def stats(self, stats: Dict[str, Any]) -> None:
        self.latest_stats = redact_obj(stats)  # type: ignore[assignment]

    def close(self) -> None:
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.close_clients()
