"""The camera loop: capture -> (crop) -> predict -> outputs, with stats, board health and service signals.

    Capture thread ──newest frame──▶ loop: every N / max-fps gate ─▶ crop/ROI ─▶ Predictor.predict
                                          ─▶ FrameResult ─▶ SinkSet (JSON lines, video, snapshots, window, HTTP, MQTT)
    every stats interval: LoopStats.to_dict() ─▶ stderr line, SinkSet.stats (stats file, HTTP status, MQTT stats),
                                                 systemd STATUS=

The pieces, each on its own: LoopStats (edge_quq.loopstats) counts; SinkSet (edge_quq.sinks) isolates the
outputs from each other; SourceWatch reports stalls; stop_on_signals turns SIGINT/SIGTERM into a stop
request; region() is the crop. CameraLoop only sequences them.

systemd contract (edge_quq.sdnotify.Notifier): READY=1 once the model is loaded and the source open (the
caller opens both before run()), WATCHDOG=1 only after a processed frame (a stalled loop stops pinging),
STATUS= the stats line, STOPPING=1 on SIGTERM/SIGINT.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from edge_quq.board import board_status, throttle_warning
from edge_quq.defaults import DEFAULT_MQTT_DISCOVERY_MODE, DEFAULT_ON_DRIFT, DRIFT_DEFAULTS, MQTT_DISCOVERY_PREFIX, ON_DRIFT
from edge_quq.capture import Capture, Frame
from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.loopstats import LoopStats
from edge_quq.sdnotify import Notifier
from edge_quq.sinks import FrameResult, SinkSet
from edge_quq.sinks.ha_discovery import discovery_messages
from edge_quq.sinks.mqtt import default_device, remove_discovery
from edge_quq.sources import DEFAULT_MAX_DECODE_ERRORS

Box = Tuple[int, int, int, int]


@dataclass
class LoopSettings:
    every: int = 1
    max_fps: Optional[float] = None
    crop: Optional[float] = None  # center crop: this fraction of the width and of the height
    roi: Optional[Box] = None
    duration: Optional[float] = None
    frames: Optional[int] = None
    stats_interval: float = 10.0
    quiet: bool = False


def parse_roi(text: str) -> Box:
    try:
        x, y, w, h = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise OptionError(f"--roi {text}: expected X,Y,W,H in pixels, e.g. 100,50,224,224") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise OptionError(f"--roi {text}: X, Y must be >= 0 and W, H > 0")
    return x, y, w, h


def region(shape: Tuple[int, ...], crop: Optional[float], roi: Optional[Box]) -> Optional[Box]:
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


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call request_stop(name) while the block runs (main thread only)."""
    old: Dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda n, f: request_stop(signal.Signals(n).name))
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class SourceWatch:
    """Says (once each) when a live source errs, stalls and comes back; keeps the stats' state in step."""

    def __init__(self, capture: Capture, stats: LoopStats, log: Callable[[str], None]) -> None:
        self.capture, self.stats, self.log = capture, stats, log
        self._last_error: Optional[str] = None
        self._stall_started: Optional[float] = None

    def idle(self, now: float) -> None:
        """No frame this time round."""
        cap = self.capture
        err = cap.last_error
        if err and err != self._last_error:
            self._last_error = err
            self.log(f"warning: source: {err}")
        if cap.stalled(now) and self._stall_started is None:
            self._stall_started = cap.last_frame_time
            self.stats.state = "stalled"
            self.log(f"warning: source stalled: no frame from {self.stats.source} for {now - cap.last_frame_time:.1f} s; reopening with backoff")

    def frame(self, now: float) -> None:
        """A frame arrived."""
        if self._stall_started is not None:
            self.log(f"source back after {now - self._stall_started:.1f} s without frames (reopened {self.capture.reopens} times so far)")
            self._stall_started = None
            self._last_error = None
        self.stats.state = "running"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CameraLoop:
    def __init__(self, predictor: Any, capture: Capture, sinks: SinkSet, settings: LoopSettings, notifier: Optional[Notifier] = None,
                 source_uri: str = "", log: Callable[[str], None] = _stderr, stats: Optional[LoopStats] = None,
                 drift: Any = None, on_drift: str = DEFAULT_ON_DRIFT) -> None:
        self.predictor = predictor
        self.drift = drift  # an edge_quq.drift.DriftMonitor fed from every processed frame, or None
        self.on_drift = on_drift
        self.capture = capture
        self.sinks = sinks
        self.s = settings
        self.notifier = notifier or Notifier(address="")
        self.log = log
        self.stats = stats or LoopStats(source_uri, capture)
        self.stats.sink_errors = sinks.errors
        self.watch = SourceWatch(capture, self.stats, log)
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.fatal: Optional[EdgeQuqError] = None  # set when the run ends in an error (the command exits non-zero)
        self._throttle_warned = False

    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.notifier.stopping()
            self.stop_event.set()

    def publish_stats(self, final: bool = False) -> Dict[str, Any]:
        self.stats.board = board_status()
        warn = throttle_warning(self.stats.board)
        if warn and not self._throttle_warned:
            self.log(f"warning: {warn}")
        self._throttle_warned = bool(warn)
        self.sinks.collect_errors()
        st = self.stats.to_dict()
        line = self.stats.line(st)
        if not self.s.quiet and not final:
            self.log(f"stats: {line}")
        self.notifier.status(line)
        self.sinks.stats(st)
        return st

    def run(self) -> Dict[str, Any]:
        """Run until the source ends or a stop; the final stats. A start the loop refuses (an --roi outside
        the first frame) raises OptionError before any stats are written."""
        refused = False
        with stop_on_signals(self.request_stop):
            self.capture.start()
            try:
                self._loop()
            except OptionError:
                refused = True
                raise
            finally:
                self.capture.stop()
                self.stats.state = "stopped"
                if not refused:
                    final = self.publish_stats(final=True)
        final["stop_reason"] = self.stop_reason or ("signal" if self.stop_event.is_set() else "")
        return final

    def _loop(self) -> None:
        s = self.s
        deadline = self.stats.started + s.duration if s.duration else None
        next_stats = time.time() + s.stats_interval
        # Files and folders are paced by the capture thread instead (every frame processed, none skipped).
        min_dt = 1.0 / s.max_fps if s.max_fps and self.capture.live else 0.0
        while not self.stop_event.is_set():
            now = time.time()
            if deadline is not None and now >= deadline:
                self.stop_reason = "duration"
                return
            if now >= next_stats:
                next_stats = now + s.stats_interval
                self.publish_stats()
            if self.sinks.quit:
                self.stop_reason = "window closed"
                return
            f = self.capture.get(timeout=0.1)
            now = time.time()
            if f is None:
                if self.capture.ended:
                    self.fatal = self.capture.fatal
                    self.stop_reason = "too many undecodable frames" if self.fatal else "end of source"
                    return
                self.watch.idle(now)
                continue
            self.watch.frame(now)
            since = self.stats.since_last(now)
            if f.index % s.every != 0 or (min_dt and since is not None and since < min_dt):
                self.stats.skipped += 1
                continue
            self._process(f, now)
            if s.frames is not None and self.stats.processed >= s.frames:
                self.stop_reason = "frame limit"
                return

    def _process(self, f: Frame, now: float) -> None:
        img = f.image
        try:
            roi = region(img.shape, self.s.crop, self.s.roi)
        except OptionError:
            if self.stats.processed:  # a stream that shrank mid-run: this frame only
                self.stats.failed += 1
                return
            raise
        crop = img[roi[1]:roi[1] + roi[3], roi[0]:roi[0] + roi[2]] if roi else img
        try:
            p = self.predictor.predict(crop, source=self.stats.source)
        except EdgeQuqError as e:
            self.stats.failed += 1
            self.log(f"warning: frame {f.index}: {e}")
            return
        drift = self._drift(p)
        self.stats.record(p, now, f.index, drift)
        self.sinks.emit(FrameResult.make(f.index, f.time, img, p, roi, self.stats.fps_ema, drift))
        self.notifier.watchdog()

    def _drift(self, p: Any) -> Optional[Dict[str, Any]]:
        """Feed the drift monitor with this frame; under --on-drift ignore, a frame during an alarm is ignored."""
        if self.drift is None:
            return None
        status = self.drift.observe(p)
        if status.alarm and self.on_drift == "ignore":
            p.keep, p.label, p.class_index, p.classes = False, None, None, []
            p.ignored_by.append("drift")
        return status.to_json()


@dataclass
class CameraOptions:
    """The camera command's own settings (everything but the model options), gathered from click's values."""
    source: str
    outputs: Tuple[str, ...] = ()
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None
    every: int = 1
    max_fps: Optional[float] = None
    crop: Optional[float] = None
    roi: Optional[str] = None
    duration: Optional[float] = None
    frames: Optional[int] = None
    loop: bool = False
    stall_timeout: float = 5.0
    open_timeout: float = 10.0
    stats_interval: float = 10.0
    quiet: bool = False
    # the output flags older than --output (aliases of output URIs) and the outputs' own settings
    stats_file: Optional[str] = None
    jsonl: Optional[str] = None
    video_out: Optional[str] = None
    snapshots: Optional[str] = None
    display: bool = False
    serve: Optional[str] = None
    mqtt_url: Optional[str] = None
    max_snapshots: int = 200
    mqtt_prefix: str = "edge-quq"
    mqtt_device: Optional[str] = None
    mqtt_every_frame: bool = False
    mqtt_ca_file: Optional[str] = None
    mqtt_discovery: Optional[str] = None  # Home Assistant's discovery prefix, None: no discovery
    mqtt_discovery_mode: str = DEFAULT_MQTT_DISCOVERY_MODE
    mqtt_discovery_remove: bool = False
    serve_token: Optional[str] = None
    max_decode_errors: int = DEFAULT_MAX_DECODE_ERRORS
    on_drift: str = DEFAULT_ON_DRIFT
    drift_delta: float = float(DRIFT_DEFAULTS["delta"])  # type: ignore[arg-type]
    no_drift: bool = False

    @classmethod
    def pop_from(cls, values: Dict[str, Any]) -> "CameraOptions":
        """Take this object's fields out of `values` (click's keyword arguments); the model options remain."""
        names = [f for f in cls.__dataclass_fields__ if f in values]
        return cls(**{n: values.pop(n) for n in names})

    def source_spec(self) -> Any:
        from edge_quq.sources import check_openable, parse_source  # noqa: PLC0415

        spec = parse_source(self.source, self.width, self.height, self.fps)
        check_openable(spec)
        return spec

    def output_specs(self) -> list:
        from edge_quq.sinks import alias_outputs, parse_output  # noqa: PLC0415

        aliases = alias_outputs(self.jsonl, self.video_out, self.snapshots, self.display, self.serve, self.mqtt_url,
                                None if self.stats_file is None else str(self.stats_file))
        return aliases + [parse_output(u) for u in self.outputs]

    def loop_settings(self) -> LoopSettings:
        roi = parse_roi(self.roi) if self.roi else None
        if roi is not None and self.crop is not None:
            raise OptionError("--roi and --crop are exclusive")
        return LoopSettings(every=self.every, max_fps=self.max_fps, crop=self.crop, roi=roi, duration=self.duration,
                            frames=self.frames, stats_interval=self.stats_interval, quiet=self.quiet)

    def check(self) -> Tuple[Any, LoopSettings, list]:
        """Everything that can be refused from the settings alone, before the model loads: the source, the
        loop settings, the outputs. `edge-quq health --config` runs the same checks."""
        if self.on_drift not in ON_DRIFT:
            raise OptionError(f"--on-drift must be one of {', '.join(ON_DRIFT)}, got {self.on_drift!r}")
        if not 0.0 < float(self.drift_delta) < 1.0:
            raise OptionError(f"--drift-delta must be strictly between 0 and 1, got {self.drift_delta}")
        if self.serve_token is not None and (not self.serve_token or any(c.isspace() or not c.isprintable() for c in self.serve_token)):
            raise OptionError("--serve-token: must be non-empty printable text without spaces")
        outputs = self.output_specs()
        self.check_discovery(outputs)
        return self.source_spec(), self.loop_settings(), outputs

    def check_discovery(self, outputs: list) -> None:
        """--mqtt-discovery*: an MQTT output to publish on, and a device name and prefix HA accepts."""
        if self.mqtt_discovery is None and not self.mqtt_discovery_remove:
            return
        flag = "--mqtt-discovery-remove" if self.mqtt_discovery_remove else "--mqtt-discovery"
        if not any(o.kind == "mqtt" for o in outputs):
            raise OptionError(f"{flag} needs an MQTT output (--mqtt URL or --output mqtt://...)")
        discovery_messages(self.mqtt_device or default_device(), "-", self.mqtt_discovery or MQTT_DISCOVERY_PREFIX,
                           self.mqtt_discovery_mode)

    def remove_discovery(self) -> list:
        """--mqtt-discovery-remove on every MQTT output: the discovery topics cleared."""
        outputs = self.output_specs()
        self.check_discovery(outputs)
        return [t for o in outputs if o.kind == "mqtt"
                for t in remove_discovery(o.target, self.mqtt_device, self.mqtt_discovery or MQTT_DISCOVERY_PREFIX,
                                          self.mqtt_ca_file, label=o.label)]

    def output_options(self, nominal_fps: float, stats: LoopStats, log: Callable[[str], None]) -> Any:
        from edge_quq.sinks import OutputOptions  # noqa: PLC0415

        return OutputOptions(max_snapshots=self.max_snapshots, mqtt_prefix=self.mqtt_prefix, mqtt_device=self.mqtt_device,
                             mqtt_every_frame=self.mqtt_every_frame, mqtt_ca_file=self.mqtt_ca_file, serve_token=self.serve_token,
                             mqtt_discovery=self.mqtt_discovery, mqtt_discovery_mode=self.mqtt_discovery_mode,
                             video_fps=self.max_fps or nominal_fps or 10.0, source=self.source, stats=stats, log=log)

    def drift_monitor(self, predictor: Any, log: Callable[[str], None]) -> Any:
        """The run's DriftMonitor, or None (--no-drift, or no gate p-values: said once here)."""
        if self.no_drift:
            return None
        from edge_quq.drift import DriftMonitor  # noqa: PLC0415

        monitor = DriftMonitor.for_predictor(predictor, delta=self.drift_delta)
        if monitor is None:
            why = ("the bundle has no calibration data" if getattr(predictor.bundle, "gate", None) is None
                   else f"policy {predictor.policy.name} computes no gate p-values (use --policy gated or risk)")
            log(f"camera: drift alarm off: {why} (every JSON line carries \"drift\": null)")
            return None
        log(f"camera: drift alarm on: detector {monitor.detector}, delta {monitor.delta:g}, "
            f"clears after {monitor.clear_after} fed frames without a crossing, --on-drift {self.on_drift}")
        return monitor
