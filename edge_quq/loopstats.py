"""LoopStats: the one place a camera run is counted. The loop records into it; the periodic stats line,
the stats file, the HTTP view's /status.json, MQTT's stats topic and systemd's STATUS= all read it.

The stats dict (to_dict) is the stats file's format:
    updated, state, source, started, uptime_s, frames {seen, processed, dropped, skipped, kept, ignored,
    failed, decode_errors}, ignore_rate, fps, fps_recent, latency_ms {stage: {p50, p90, p99, mean}}, rss_mb,
    peak_rss_mb, proc_read_errors, source_state {live, reopens, failures, last_error, seconds_since_frame,
    unreadable}, board, sink_errors {output: {error, count, stopped}}, drift {alarm, log10_martingale,
    since_frame} (null without a drift monitor)

Every string in it goes through edge_quq.redact (the source URI, errors quoting it): the dict is stored
and published as it is.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, Optional

from edge_quq.redact import redact, redact_obj
from edge_quq.telemetry import latency_summary, proc_read_errors, rss_bytes

LATENCY_WINDOW = 1000  # percentiles cover the last this-many processed frames (bounded memory)


def _r(v: Optional[float], nd: int = 3) -> Optional[float]:
    return round(float(v), nd) if v is not None and math.isfinite(v) else None


class LoopStats:
    """Counters, FPS and a latency window of one run. `capture` (optional) supplies the source's own
    counters (seen, dropped, reopens, ...); without one, seen counts the recorded frames."""

    def __init__(self, source: str = "", capture: Any = None, window: int = LATENCY_WINDOW) -> None:
        self.source = redact(source)
        self.capture = capture
        self.state = "running"
        self.processed = self.kept = self.ignored = self.skipped = self.failed = 0
        self.timings: Deque[Dict[str, float]] = deque(maxlen=window)
        self.started = time.time()
        self.first_frame_at: Optional[float] = None
        self.peak_rss = 0
        self.fps_ema = 0.0
        self.last: Optional[Dict[str, Any]] = None  # the last decision, for the live view
        self.drift: Optional[Dict[str, Any]] = None  # the last frame's DriftStatus.to_json()
        self.board: Dict[str, Any] = {}
        self.sink_errors: Dict[str, Dict[str, Any]] = {}
        self._last_t: Optional[float] = None
        self._lock = threading.Lock()  # the HTTP view reads from its own threads

    def record(self, prediction: Any, now: Optional[float] = None, index: Optional[int] = None,
               drift: Optional[Dict[str, Any]] = None) -> None:
        """One processed frame, with its drift state (None without a drift monitor)."""
        now = time.time() if now is None else now
        with self._lock:
            if self.first_frame_at is None:
                self.first_frame_at = now
            if self._last_t is not None:
                dt = max(now - self._last_t, 1e-6)
                self.fps_ema = 1.0 / dt if self.fps_ema == 0 else 0.9 * self.fps_ema + 0.1 / dt
            self._last_t = now
            self.processed += 1
            if prediction.keep:
                self.kept += 1
            else:
                self.ignored += 1
            self.timings.append(prediction.timings_ms)
            self.peak_rss = max(self.peak_rss, prediction.rss_bytes)
            self.last = {"frame": self.processed - 1 if index is None else index, "time": now, "decision": prediction.decision,
                         "label": prediction.label, "top_label": prediction.top_label,
                         "policy": getattr(prediction, "policy", None), "ignored_by": list(getattr(prediction, "ignored_by", [])),
                         "flagged": list(getattr(prediction, "flagged", [])), "ood_p": getattr(prediction, "ood_p", None)}
            if drift is not None:
                self.drift = dict(drift)

    def since_last(self, now: float) -> Optional[float]:
        """Seconds since the last processed frame (None before the first)."""
        return None if self._last_t is None else now - self._last_t

    @property
    def ignore_rate(self) -> Optional[float]:
        return self.ignored / self.processed if self.processed else None

    def fps(self, now: Optional[float] = None) -> float:
        if self.first_frame_at is None:
            return 0.0
        now = time.time() if now is None else now
        return self.processed / max(now - self.first_frame_at, 1e-9)

    def latency(self) -> Dict[str, Dict[str, float]]:
        with self._lock:
            window = list(self.timings)
        return latency_summary(window) if window else {}

    def _frames(self) -> Dict[str, int]:
        cap = self.capture
        seen = cap.seen if cap is not None else self.processed + self.skipped + self.failed
        return {"seen": seen, "processed": self.processed, "dropped": cap.dropped if cap is not None else 0, "skipped": self.skipped,
                "kept": self.kept, "ignored": self.ignored, "failed": self.failed,
                "decode_errors": cap.decode_errors if cap is not None else 0}

    def _source_state(self, now: float) -> Dict[str, Any]:
        cap = self.capture
        if cap is None:
            return {}
        return {"live": cap.live, "reopens": cap.reopens, "failures": cap.failures, "last_error": cap.last_error,
                "seconds_since_frame": _r(now - cap.last_frame_time, 1), "unreadable": cap.unreadable}

    def to_dict(self, now: Optional[float] = None) -> Dict[str, Any]:
        now = time.time() if now is None else now
        rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        lat = self.latency()
        rate = self.ignore_rate
        return redact_obj({  # type: ignore[return-value]
            "updated": now,
            "state": self.state,
            "source": self.source,
            "started": self.started,
            "uptime_s": _r(now - self.started, 1),
            "frames": self._frames(),
            "ignore_rate": _r(rate, 4) if rate is not None else None,
            "fps": _r(self.fps(now), 2),
            "fps_recent": _r(self.fps_ema, 2),
            "latency_ms": {k: {q: _r(v) for q, v in d.items()} for k, d in lat.items()},
            "rss_mb": _r(rss / 2**20, 1),
            "peak_rss_mb": _r(self.peak_rss / 2**20, 1),
            "proc_read_errors": proc_read_errors(),
            "source_state": self._source_state(now),
            "board": self.board,
            "sink_errors": {k: dict(v) for k, v in self.sink_errors.items()},
            "drift": self.drift,
        })

    def line(self, st: Optional[Dict[str, Any]] = None) -> str:
        """The one-line summary (stderr every stats interval, systemd STATUS=)."""
        return stats_line(self.to_dict() if st is None else st)


def stats_line(st: Dict[str, Any]) -> str:
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
    alarm = drift_text(st.get("drift"))
    if alarm:
        parts.append(alarm)
    return ", ".join(parts)


def drift_text(drift: Any) -> str:
    """'DRIFT ALARM since frame N' while the stats' drift record says alarm, else ''."""
    if not isinstance(drift, dict) or drift.get("alarm") is not True:
        return ""
    return f"DRIFT ALARM since frame {drift.get('since_frame')}"


def summary_text(st: Dict[str, Any]) -> str:
    """The end-of-run summary (stderr)."""
    f = st["frames"]
    rate = st["ignore_rate"]
    lines = [
        f"camera: {st.get('stop_reason') or 'stopped'} after {st['uptime_s']} s on {st['source']}",
        f"  frames: {f['seen']} seen, {f['processed']} processed, {f['dropped']} dropped, {f['skipped']} skipped, "
        f"{f['kept']} kept, {f['ignored']} ignored ({'-' if rate is None else f'{100 * rate:.1f}%'}), {f['failed']} failed, "
        f"{f.get('decode_errors', 0)} undecodable; {st['fps']} fps",
    ]
    lat = st["latency_ms"]
    if lat:
        lines.append("  latency ms p50/p90/p99: " + "; ".join(f"{k} {v['p50']}/{v['p90']}/{v['p99']}" for k, v in lat.items()))
    lines.append(f"  RSS {st['rss_mb']} MB, peak {st['peak_rss_mb']} MB")
    src = st["source_state"]
    if src.get("reopens") or src.get("failures") or src.get("unreadable"):
        lines.append(f"  source: {src['failures']} failures, {src['reopens']} reopens, {src['unreadable']} unreadable files; "
                     f"last error: {src['last_error']}")
    b = st["board"]
    if b.get("temp_c") is not None or b.get("throttled"):
        thr = b.get("throttled")
        lines.append(f"  board: {b.get('temp_c')} °C" + (f", throttled {thr['raw']} {','.join(thr['flags']) or 'none'}" if thr else ""))
    d = st.get("drift")
    if isinstance(d, dict):
        lines.append(f"  drift: {drift_text(d) or 'no alarm'} (log10 martingale {d.get('log10_martingale')})")
    if st.get("sink_errors"):
        lines.append("  output errors: " + "; ".join(sink_error_text(k, v) for k, v in st["sink_errors"].items()))
    return "\n".join(lines)


def sink_error_text(name: str, e: Dict[str, Any]) -> str:
    """One output's entry of sink_errors as words (summary, `edge-quq health`)."""
    return f"{name} {'stopped' if e.get('stopped') else 'failing'} ({e.get('count', 1)}x): {e.get('error')}"
