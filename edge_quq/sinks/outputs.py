"""Outputs addressed by URI, like sources: one parse function, one factory.

    jsonl:PATH | jsonl:-       one JSON line per processed frame, appended to PATH, or stdout
    video:PATH                 annotated video file (.avi, .mp4, .mkv)
    snapshots:DIR              ignored frames as PNG + JSON, for review
    stats:PATH                 the stats JSON, rewritten atomically every stats interval
    http://HOST:PORT           live view: MJPEG stream, page, /status.json
    mqtt://[user:pass@]HOST[:PORT], mqtts://...   results and stats to an MQTT broker
    display://0                a window with the annotated frames

parse_output() looks only at the string (and whether a parent folder exists) and refuses a bad one with one
OptionError line naming it, so the camera command refuses it before the model loads; open_output() opens
it. The camera command's older flags (--jsonl, --serve, ...) become the same specs (alias_outputs).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.redact import redact
from edge_quq.sinks.base import FrameResult, Sink
from edge_quq.sinks.files import DisplaySink, JsonLinesSink, SnapshotSink, StatsFileSink, VideoSink, check_parent, check_video_path
from edge_quq.sinks.http import HttpSink, parse_hostport
from edge_quq.sinks.mqtt import MqttSink, parse_broker_url

PATH_KINDS = ("jsonl", "video", "snapshots", "stats")
URI_HELP = "jsonl:PATH|-, video:PATH, snapshots:DIR, stats:PATH, http://HOST:PORT, mqtt://HOST, mqtts://HOST, display://0"


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # jsonl | video | snapshots | stats | http | mqtt | display
    target: str  # path, '-', HOST:PORT, broker URL, or display number
    label: str  # how the user wrote it ("--output jsonl:x" or "--jsonl x"), for error messages


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class OutputOptions:
    """Settings an output may need besides its URI (the camera command's --max-snapshots, --mqtt-* ...)."""
    max_snapshots: int = 200
    mqtt_prefix: str = "edge-quq"
    mqtt_device: Optional[str] = None
    mqtt_every_frame: bool = False
    mqtt_ca_file: Optional[str] = None
    mqtt_discovery: Optional[str] = None  # Home Assistant discovery prefix (edge_quq.sinks.ha_discovery)
    mqtt_discovery_mode: str = "device"
    serve_token: Optional[str] = None  # the live view's access token (edge_quq.sinks.http)
    video_fps: float = 10.0
    source: str = ""  # shown by the live view
    stats: Any = None  # the run's LoopStats, read by the live view (it keeps its own when None)
    log: Callable[[str], None] = field(default=_log, repr=False)


def _path_spec(kind: str, path: str, label: str) -> OutputSpec:
    if not path:
        raise OptionError(f"{label}: no path")
    if kind == "video":
        check_video_path(path, label)
    if kind in ("video", "stats"):
        check_parent(path, label)
    if kind == "jsonl" and path != "-" and Path(path).is_dir():
        raise OptionError(f"{label}: is a folder, not a file")
    return OutputSpec(kind, path, label)


def output_spec(kind: str, target: str, label: str) -> OutputSpec:
    """The spec of an output whose kind is known (the old flags); checks the target like parse_output."""
    if kind in PATH_KINDS:
        return _path_spec(kind, target, label)
    if kind == "http":
        parse_hostport(target, label=label)
        return OutputSpec(kind, target, label)
    if kind == "mqtt":
        parse_broker_url(target, label=label)
        return OutputSpec(kind, target, label)
    if kind == "display":
        return OutputSpec(kind, target or "0", label)
    raise OptionError(f"{label}: unknown output kind {kind!r}")  # pragma: no cover - callers pass known kinds


def parse_output(uri: str, label: Optional[str] = None) -> OutputSpec:
    """The output a URI names; OptionError (one line naming it) for one that names none."""
    label = label or f"--output {redact(uri)}"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", uri.strip())
    if not m:
        raise OptionError(f"{label}: not an output URI (expected {URI_HELP})")
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme in PATH_KINDS:
        # jsonl:/abs, jsonl:rel and jsonl:///abs all name a path
        return _path_spec(scheme, rest[2:] if rest.startswith("//") else rest, label)
    if scheme == "http":
        hostport = rest[2:] if rest.startswith("//") else rest
        if "/" in hostport.rstrip("/"):
            raise OptionError(f"{label}: the live view has no path; expected http://HOST:PORT")
        return output_spec("http", hostport.rstrip("/"), label)
    if scheme in ("mqtt", "mqtts"):
        return output_spec("mqtt", uri.strip(), label)
    if scheme == "display":
        return output_spec("display", rest.strip("/"), label)
    raise OptionError(f"{label}: unknown output {scheme}: (expected {URI_HELP})")


def alias_outputs(jsonl: Optional[str] = None, video_out: Optional[str] = None, snapshots: Optional[str] = None,
                  display: bool = False, serve: Optional[str] = None, mqtt: Optional[str] = None,
                  stats_file: Optional[Union[str, Path]] = None) -> List[OutputSpec]:
    """The specs the camera command's older output flags stand for (stats first: it is written first)."""
    flags: List[Tuple[str, str, Any]] = [("stats", "--stats-file", stats_file), ("jsonl", "--jsonl", jsonl),
                                         ("video", "--video-out", video_out), ("snapshots", "--snapshots", snapshots),
                                         ("display", "--display", "0" if display else None), ("http", "--serve", serve),
                                         ("mqtt", "--mqtt", mqtt)]
    return [output_spec(kind, str(v), f"{flag} {redact(str(v))}" if kind != "display" else flag) for kind, flag, v in flags if v is not None]


def _split_path_uri(uri: str) -> Optional[Tuple[str, str]]:
    m = re.match(r"^(jsonl|video|snapshots|stats):(?://)?(.+)$", uri.strip(), flags=re.I)
    return (m.group(1).lower(), m.group(2)) if m else None


def relative_to(uri: str, base: Path) -> str:
    """The URI with a relative path in it made relative to `base` (the config file's folder)."""
    parts = _split_path_uri(uri)
    if parts is None or parts[1] == "-" or Path(parts[1]).expanduser().is_absolute():
        return uri
    return f"{parts[0]}:{base / parts[1]}"


def stats_paths(uris: Iterable[str]) -> List[str]:
    """The stats files among output URIs (what `edge-quq health` reads); URIs that do not parse are skipped."""
    return [p[1] for p in map(_split_path_uri, uris) if p is not None and p[0] == "stats"]


def open_output(spec: Union[str, OutputSpec], options: Optional[OutputOptions] = None, **kw: Any) -> Sink:
    """Open one output (a URI or a parsed spec); `options` or keyword arguments are OutputOptions fields."""
    if isinstance(spec, str):
        spec = parse_output(spec)
    o = options or OutputOptions(**kw)
    if spec.kind == "jsonl":
        return JsonLinesSink(spec.target, label=spec.label, log=o.log)
    if spec.kind == "video":
        return VideoSink(spec.target, o.video_fps, label=spec.label)
    if spec.kind == "snapshots":
        return SnapshotSink(spec.target, o.max_snapshots, label=spec.label, log=o.log)
    if spec.kind == "stats":
        return StatsFileSink(spec.target, label=spec.label, log=o.log)
    if spec.kind == "display":
        return DisplaySink(label=spec.label)
    if spec.kind == "http":
        http = HttpSink(spec.target, o.source, stats=o.stats, label=spec.label, token=o.serve_token, log=o.log)
        o.log(f"serving the live view on {http.url}")
        return http
    return MqttSink(spec.target, o.mqtt_prefix, o.mqtt_device, o.mqtt_every_frame, o.mqtt_ca_file, label=spec.label, log=o.log,
                    discovery=o.mqtt_discovery, discovery_mode=o.mqtt_discovery_mode)


class SinkSet:
    """The run's outputs, each isolated from the others: one that breaks (disk full, display closed) is
    reported, closed and dropped, and the rest keep going. Closing the set closes every sink once."""

    def __init__(self, sinks: Iterable[Sink] = (), log: Callable[[str], None] = _log,
                 errors: Optional[Dict[str, str]] = None) -> None:
        self.sinks: List[Sink] = list(sinks)
        self.log = log
        self.errors: Dict[str, str] = {} if errors is None else errors

    def add(self, sink: Sink) -> Sink:
        self.sinks.append(sink)
        return sink

    @property
    def quit(self) -> bool:
        return any(s.quit for s in self.sinks)

    def emit(self, r: FrameResult) -> None:
        for sink in list(self.sinks):
            self._call(sink, sink.emit, r)

    def stats(self, st: Dict[str, Any]) -> None:
        for sink in list(self.sinks):
            self._call(sink, sink.stats, st)

    def collect_errors(self) -> Dict[str, Dict[str, Any]]:
        """Bring `errors` (the stats' sink_errors) up to date with the failures the live sinks counted."""
        for sink in self.sinks:
            entry = sink.failures.entry() if sink.failures is not None else None
            if entry is not None:
                self.errors[sink.name] = entry
        return self.errors

    def _call(self, sink: Sink, method: Callable[[Any], None], arg: Any) -> None:
        try:
            method(arg)
        except (OSError, EdgeQuqError) as e:
            msg = redact(getattr(e, "strerror", None) or str(e))
            prev = sink.failures.count if sink.failures is not None else 0
            self.errors[sink.name] = {"error": msg, "count": prev + 1, "failing": True, "stopped": True}
            self.log(f"warning: {sink.name} output stopped: {msg}")
            self.sinks.remove(sink)
            self._close(sink)

    def discard(self) -> None:
        """The run was refused: every output removes what it created, then closes."""
        for sink in self.sinks:
            try:
                sink.discard()
            except OSError:
                pass
        self.close()

    def _close(self, sink: Sink) -> None:
        try:
            sink.close()
        except Exception as e:  # one sink failing to close must not keep the others from flushing
            self.log(f"warning: {sink.name} output did not close cleanly: {e}")

    def close(self) -> None:
        while self.sinks:
            self._close(self.sinks.pop(0))

    def __enter__(self) -> "SinkSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
