"""The camera loop: capture -> (crop) -> predict -> sinks, with stats, board health and service signals.

    Capture thread ──newest frame──▶ loop: every N / max-fps gate ─▶ crop/ROI ─▶ Predictor.predict
                                          ─▶ FrameResult ─▶ each sink (JSON lines, video, snapshots, window, HTTP, MQTT)
    every stats interval: stats object ─▶ stderr line, --stats-file (atomic), sinks (HTTP status, MQTT stats),
                                          systemd STATUS=

systemd contract (edge_quq.sdnotify.Notifier): READY=1 once the model is loaded and the source open (the
caller opens both before run()), WATCHDOG=1 only after a processed frame (a stalled loop stops pinging),
STATUS= the stats line, STOPPING=1 on SIGTERM/SIGINT.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from edge_quq.board import board_status, throttle_warning
from edge_quq.capture import Capture
from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.sdnotify import Notifier
from edge_quq.sinks import FrameResult, Sink
from edge_quq.sinks.files import atomic_write_json
from edge_quq.telemetry import latency_summary, rss_bytes

LATENCY_WINDOW = 1000  # stats percentiles cover the last this-many processed frames (bounded memory)


@dataclass
class LoopSettings:
    every: int = 1
    max_fps: Optional[float] = None
    crop: Optional[float] = None  # center crop: this fraction of the width and of the height
    roi: Optional[Tuple[int, int, int, int]] = None
    duration: Optional[float] = None
    frames: Optional[int] = None
    stats_interval: float = 10.0
    stats_file: Optional[Path] = None
    quiet: bool = False


def parse_roi(text: str) -> Tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise OptionError(f"--roi {text}: expected X,Y,W,H in pixels, e.g. 100,50,224,224") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise OptionError(f"--roi {text}: X, Y must be >= 0 and W, H > 0")
    return x, y, w, h


def region(shape: Tuple[int, ...], crop: Optional[float], roi: Optional[Tuple[int, int, int, int]]) -> Optional[Tuple[int, int, int, int]]:
    """(x, y, w, h) of the classified region of a frame of `shape`, or None for the whole frame."""
    H, W = shape[:2]
    if roi is not None:
        x, y, w, h = roi
        if x >= W or y >= H:
            raise OptionError(f"--roi {x},{y},{w},{h} lies outside the {W}x{H} frame")
        return x, y, min(w, W - x), min(h, H - y)
    if crop is not None and crop < 1.0:
        w, h = max(1, int(round(W * crop))), max(1, int(round(H * crop)))
        return (W - w) // 2, (H - h) // 2, w, h
    return None


def _r(v: float, nd: int = 3) -> Optional[float]:
    return round(float(v), nd) if v is not None and math.isfinite(v) else None


class CameraLoop:
    def __init__(self, predictor: Any, capture: Capture, sinks: List[Sink], settings: LoopSettings, notifier: Optional[Notifier] = None,
                 source_uri: str = "", log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
        self.predictor = predictor
        self.capture = capture
        self.sinks = sinks
        self.s = settings
        self.notifier = notifier or Notifier(address="")
        self.source_uri = source_uri
        self.log = log
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.state = "running"
        self.processed = self.kept = self.ignored = self.skipped = self.failed = 0
        self.timings: Deque[Dict[str, float]] = deque(maxlen=LATENCY_WINDOW)
        self.started = time.time()
        self.first_frame_at: Optional[float] = None
        self.peak_rss = 0
        self.fps_ema = 0.0
        self._last_processed_t: Optional[float] = None
        self._last_error_seen: Optional[str] = None
        self._stall_started: Optional[float] = None
        self._throttle_warned = False
        self.board: Dict[str, Any] = {}
        self.sink_errors: Dict[str, str] = {}

    # -- signals --------------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.notifier.stopping()
            self.stop_event.set()

    def _install_signals(self) -> Dict[int, Any]:
        old: Dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda n, f: self.request_stop(signal.Signals(n).name))
        return old

    # -- stats ----------------------------------------------------------------------------------------
    def stats(self, now: Optional[float] = None) -> Dict[str, Any]:
        now = time.time() if now is None else now
        rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        cap = self.capture
        t0 = self.first_frame_at or self.started
        elapsed = max(now - t0, 1e-9)
        lat = latency_summary(list(self.timings)) if self.timings else {}
        return {
            "updated": now,
            "state": self.state,
            "source": self.source_uri,
            "started": self.started,
            "uptime_s": _r(now - self.started, 1),
            "frames": {"seen": cap.seen, "processed": self.processed, "dropped": cap.dropped, "skipped": self.skipped,
                       "kept": self.kept, "ignored": self.ignored, "failed": self.failed},
            "ignore_rate": _r(self.ignored / self.processed, 4) if self.processed else None,
            "fps": _r(self.processed / elapsed if self.first_frame_at else 0.0, 2),
            "fps_recent": _r(self.fps_ema, 2),
            "latency_ms": {k: {q: _r(v) for q, v in d.items()} for k, d in lat.items()},
            "rss_mb": _r(rss / 2**20, 1),
            "peak_rss_mb": _r(self.peak_rss / 2**20, 1),
            "source_state": {"live": cap.live, "reopens": cap.reopens, "failures": cap.failures, "last_error": cap.last_error,
                             "seconds_since_frame": _r(now - cap.last_frame_time, 1)},
            "board": self.board,
            "sink_errors": dict(self.sink_errors),
        }

    def stats_line(self, st: Dict[str, Any]) -> str:
        f = st["frames"]
        tot = st["latency_ms"].get("total", {})
        rate = st["ignore_rate"]
        parts = [f"{st['state']}", f"{f['processed']}/{f['seen']} frames", f"dropped {f['dropped']}",
                 f"ignored {f['ignored']} ({100 * rate:.1f}%)" if rate is not None else "ignored 0",
                 f"{st['fps']:.1f} fps"]
        if tot.get("p50") is not None:
            parts.append(f"p50/p99 {tot['p50']:.1f}/{tot['p99']:.1f} ms")
        parts.append(f"RSS {st['rss_mb']:.0f} MB")
        b = st["board"]
        if b.get("temp_c") is not None:
            parts.append(f"{b['temp_c']:.0f}°C")
        if b.get("throttled") and b["throttled"].get("active"):
            parts.append("THROTTLED")
        return ", ".join(parts)

    def publish_stats(self, final: bool = False) -> Dict[str, Any]:
        self.board = board_status()
        warn = throttle_warning(self.board)
        if warn and not self._throttle_warned:
            self.log(f"warning: {warn}")
        self._throttle_warned = bool(warn)
        st = self.stats()
        line = self.stats_line(st)
        if not self.s.quiet and not final:
            self.log(f"stats: {line}")
        self.notifier.status(line)
        if self.s.stats_file is not None:
            try:
                atomic_write_json(self.s.stats_file, st)
            except OSError as e:
                self.log(f"warning: cannot write --stats-file {self.s.stats_file}: {e.strerror}")
        for sink in list(self.sinks):
            self._call(sink, "stats", st)
        return st

    def _call(self, sink: Sink, method: str, arg: Any) -> None:
        # A sink that breaks (disk full, display closed) is reported and dropped; the others keep going.
        try:
            getattr(sink, method)(arg)
        except (OSError, EdgeQuqError) as e:
            msg = getattr(e, "strerror", None) or str(e)
            self.sink_errors[sink.name] = msg
            self.log(f"warning: {sink.name} output stopped: {msg}")
            self.sinks.remove(sink)
            try:
                sink.close()
            except Exception:
                pass

    # -- the loop -------------------------------------------------------------------------------------
    def _watch_source(self, now: float) -> None:
        cap = self.capture
        err = cap.last_error
        if err and err != self._last_error_seen:
            self._last_error_seen = err
            self.log(f"warning: source: {err}")
        if cap.stalled(now):
            if self._stall_started is None:
                self._stall_started = cap.last_frame_time
                self.state = "stalled"
                self.log(f"warning: source stalled: no frame from {self.source_uri} for {now - cap.last_frame_time:.1f} s; reopening with backoff")

    def _frame_back(self, now: float) -> None:
        if self._stall_started is not None:
            self.log(f"source back after {now - self._stall_started:.1f} s without frames (reopened {self.capture.reopens} times so far)")
            self._stall_started = None
            self._last_error_seen = None
        self.state = "running"

    def run(self) -> Dict[str, Any]:
        old = self._install_signals()
        s = self.s
        deadline = self.started + s.duration if s.duration else None
        next_stats = time.time() + s.stats_interval
        # Files and folders are paced by the capture thread instead (every frame processed, none skipped).
        min_dt = 1.0 / s.max_fps if s.max_fps and self.capture.live else 0.0
        self.capture.start()
        try:
            while not self.stop_event.is_set():
                now = time.time()
                if deadline is not None and now >= deadline:
                    self.stop_reason = "duration"
                    break
                if now >= next_stats:
                    next_stats = now + s.stats_interval
                    self.publish_stats()
                if any(getattr(k, "quit", False) for k in self.sinks):
                    self.stop_reason = "window closed"
                    break
                f = self.capture.get(timeout=0.1)
                now = time.time()
                if f is None:
                    if self.capture.ended:
                        self.stop_reason = "end of source"
                        break
                    self._watch_source(now)
                    continue
                self._frame_back(now)
                if f.index % s.every != 0 or (min_dt and self._last_processed_t is not None and now - self._last_processed_t < min_dt):
                    self.skipped += 1
                    continue
                self._process(f, now)
                if s.frames is not None and self.processed >= s.frames:
                    self.stop_reason = "frame limit"
                    break
        finally:
            self.capture.stop()
            self.state = "stopped"
            final = self.publish_stats(final=True)
            for sink in list(self.sinks):
                try:
                    sink.close()
                except Exception as e:  # one sink failing to close must not keep the others from flushing
                    self.log(f"warning: {sink.name} output did not close cleanly: {e}")
            for sig, h in old.items():
                signal.signal(sig, h)
        final["stop_reason"] = self.stop_reason or ("signal" if self.stop_event.is_set() else "")
        return final

    def _process(self, f, now: float) -> None:
        img = f.image
        roi = region(img.shape, self.s.crop, self.s.roi)
        crop = img[roi[1]:roi[1] + roi[3], roi[0]:roi[0] + roi[2]] if roi else img
        try:
            p = self.predictor.predict(crop, source=self.source_uri)
        except EdgeQuqError as e:
            self.failed += 1
            self.log(f"warning: frame {f.index}: {e}")
            return
        if self.first_frame_at is None:
            self.first_frame_at = now
        if self._last_processed_t is not None:
            dt = max(now - self._last_processed_t, 1e-6)
            self.fps_ema = 1.0 / dt if self.fps_ema == 0 else 0.9 * self.fps_ema + 0.1 / dt
        self._last_processed_t = now
        self.processed += 1
        if p.keep:
            self.kept += 1
        else:
            self.ignored += 1
        self.timings.append(p.timings_ms)
        self.peak_rss = max(self.peak_rss, p.rss_bytes)
        rec = p.to_dict()
        rec.pop("settings", None)  # the same every frame: it is in the stats file and the start-up line
        record = {"ts": round(f.time, 4), "frame": f.index, **rec}
        if roi:
            record["roi"] = list(roi)
        r = FrameResult(f.index, f.time, img, p, record, roi, self.fps_ema)
        for sink in list(self.sinks):
            self._call(sink, "emit", r)
        self.notifier.watchdog()


def summary_text(st: Dict[str, Any]) -> str:
    f = st["frames"]
    rate = st["ignore_rate"]
    lines = [
        f"camera: {st.get('stop_reason') or 'stopped'} after {st['uptime_s']} s on {st['source']}",
        f"  frames: {f['seen']} seen, {f['processed']} processed, {f['dropped']} dropped, {f['skipped']} skipped, "
        f"{f['kept']} kept, {f['ignored']} ignored ({'-' if rate is None else f'{100 * rate:.1f}%'}), {f['failed']} failed; {st['fps']} fps",
    ]
    lat = st["latency_ms"]
    if lat:
        lines.append("  latency ms p50/p90/p99: " + "; ".join(f"{k} {v['p50']}/{v['p90']}/{v['p99']}" for k, v in lat.items()))
    lines.append(f"  RSS {st['rss_mb']} MB, peak {st['peak_rss_mb']} MB")
    src = st["source_state"]
    if src["reopens"] or src["failures"]:
        lines.append(f"  source: {src['failures']} failures, {src['reopens']} reopens; last error: {src['last_error']}")
    b = st["board"]
    if b.get("temp_c") is not None or b.get("throttled"):
        thr = b.get("throttled")
        lines.append(f"  board: {b.get('temp_c')} °C" + (f", throttled {thr['raw']} {','.join(thr['flags']) or 'none'}" if thr else ""))
    if st.get("sink_errors"):
        lines.append("  outputs stopped: " + "; ".join(f"{k}: {v}" for k, v in st["sink_errors"].items()))
    return "\n".join(lines)
