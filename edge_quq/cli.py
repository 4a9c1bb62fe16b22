"""`edge-quq`: predict, info (device side) and export (host side, needs the [export] extra)."""
from __future__ import annotations

import functools
import os
import resource
import signal
import sys
from array import array
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import click

from edge_quq import __version__
from edge_quq.config import DEFAULT_CONFIG_PATH, config_option, service_config_example
from edge_quq.defaults import (BACKENDS, DEFAULT_DETECTOR_SELECTION, DEFAULT_IGNORE_ON, DEFAULT_MAX_PIXELS, DEFAULT_MQTT_DISCOVERY_MODE, DEFAULT_ON_DRIFT,
                               DRIFT_DEFAULTS, MIXED_POLICIES, MQTT_DISCOVERY_MODES, MQTT_DISCOVERY_PREFIX, ON_DRIFT, OVERLAP_CHOICES, POLICIES,
                               default_help)
from edge_quq.errors import EdgeQuqError
from edge_quq.health import DEFAULT_MAX_AGE_S, DEFAULT_SERVICE_BUNDLE, DEFAULT_STATS_FILE
from edge_quq.options import PredictorOptions
from edge_quq.samplers import SAMPLER_CHOICES
from edge_quq.sources import DEFAULT_MAX_DECODE_ERRORS


def fail(message: str, code: int = 2) -> None:
    from edge_quq.redact import redact  # an error quoting a camera or broker URL must not print its password

    click.echo(f"error: {redact(message)}", err=True)
    sys.exit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn EdgeQuqError into one `error: ...` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgeQuqError as e:
            fail(str(e), e.exit_code)

    return wrapper


def _flag_text(flagged: Sequence[str], detectors: Any) -> str:
    n = len(detectors.with_threshold()) if detectors is not None else 0
    if not flagged:
        return "-"
    if len(flagged) == n and n > 3:
        return f"all {n}"
    return ",".join(flagged) if len(flagged) <= 3 else f"{len(flagged)} of {n}"


def peak_rss_bytes() -> int:
    # VmHWM is this process's own high-water mark. ru_maxrss is not: Linux carries the parent's RSS at fork
    # into it across exec, so a predict started from a 1.2 GB test runner reported 1.2 GB.
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-quq")
def main() -> None:
    """Quantized image classifiers that say when a prediction should not be trusted."""


def model_options(fn: Callable) -> Callable:
    """Options shared by every command that runs the model; build_predictor turns their values into one
    PredictorOptions (edge_quq.options)."""
    opts = [
        click.option("--bundle", "bundle", type=click.Path(path_type=Path), default=None, help="Bundle folder (default: the embedded Fashion-MNIST bundle)."),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Backbone runtime."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime threads (default: all cores)."),
        click.option("--no-xnnpack", is_flag=True, help="TFLite: run the builtin kernels instead of the XNNPACK delegate."),
        click.option("--sampler", type=click.Choice(SAMPLER_CHOICES), default="auto", show_default=True, help="Head sampler."),
        click.option("-T", "--num-iter", type=int, default=None, help=f"MC dropout samples of the head {default_help('num_iter')}."),
        click.option("--threshold", type=float, default=None, help=f"Per-class decision threshold {default_help('threshold')}."),
        click.option("--z", "z", type=float, default=None, help=f"Interval factor z: interval = mean ± z·std (the paper's conf_factor) {default_help('z')}."),
        click.option("--confidence-level", type=float, default=None, help="Alternative to --z: two-sided coverage in (0, 1), e.g. 0.9 -> z = 1.645."),
        click.option("--mixed", type=click.Choice(MIXED_POLICIES), default=None, help=f"When some classes are present and others uncertain {default_help('mixed')}."),
        click.option("--seed", type=int, default=None, help="Seed of the dropout masks, for reproducible results."),
        click.option("--ignore-on", default=DEFAULT_IGNORE_ON, show_default=True, metavar="mc|any|DETECTOR",
                     help="What may ignore a prediction: mc (the MC decision rule), a detector of the bundle (its fitted "
                          "threshold alone, e.g. knn), or any (the MC rule or any detector with a threshold)."),
        click.option("--detectors", "detectors", default=DEFAULT_DETECTOR_SELECTION, show_default=True, metavar="gate|all|NAME[,NAME...]",
                     help="Detectors scored per frame: gate (only what the decision needs: the gate's detectors and the "
                          "--ignore-on one), all (every detector of the bundle and the gradient score, as diagnostics), "
                          "or names added to what the decision needs, e.g. knn,vim."),
        click.option("--policy", type=click.Choice(POLICIES), default=None,
                     help="Decision policy: paper (the MC rule alone), gated (the rule plus the OOD gate), risk (gated plus a "
                          "certified keep threshold, needs --target-error). Default: the bundle's (gated; paper without calibration data)."),
        click.option("--ood-alpha", type=float, default=None,
                     help="OOD gate level in (0, 1): ignore when the combined conformal p-value is below it (default: the bundle's)."),
        click.option("--target-error", type=float, default=None,
                     help="Risk policy: error rate among kept predictions to certify, in (0, 1), e.g. 0.02 (implies --policy risk)."),
        click.option("--delta", type=float, default=None,
                     help="Risk policy: the certificate fails with probability at most delta (default: the bundle's, 0.05)."),
        click.option("--overlap", type=click.Choice(OVERLAP_CHOICES), default="auto", show_default=True,
                     help="Score the detectors on a second thread while the head sampler runs: auto (when the detectors "
                          "are large enough to gain, and a second CPU is there), on, off."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
                     help="Refuse images with more pixels than this, from their header, before decoding (memory on small boards)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_predictor(**values: Any):
    """The predictor from the model options' values (the keyword arguments click passes)."""
    from edge_quq.predictor import Predictor

    return Predictor.from_bundle(options=PredictorOptions.from_cli(values))


def decision_math_status() -> str:
    """Whether the per-frame gate and drift steps run in C (edge_quq._gatekernel) or numpy."""
    from edge_quq.conformal import NATIVE

    if NATIVE is None:
        return "numpy (the C extension edge_quq._gatekernel is not built: install a C compiler and reinstall)"
    return "native (C)"


def native_kernel_status(bundle: Any) -> str:
    """What `--sampler auto` runs on this bundle here, and how to get the native kernel when it is missing."""
    from edge_quq.samplers import native as sampler_native
    from edge_quq.head import load_head_weights

    if not sampler_native.available():
        return ("numpy (the native kernel is not built: install a C compiler and the Python headers, e.g. "
                "apt-get install gcc python3-dev, then reinstall edge-quq)")
    if not sampler_native.supports(load_head_weights(bundle)):
        return f"numpy (native kernel {sampler_native.kernel_isa()} built, but this head's shape is not one it handles)"
    return f"native ({sampler_native.kernel_isa()} kernel)"


class RunTotals:
    """The run summary of `predict`, kept as counts and one float array per stage, so that memory does not
    grow with results kept around (8 bytes per stage per file)."""

    def __init__(self) -> None:
        self.inputs = self.failed = self.kept = 0
        self.stages: Dict[str, array] = {}

    def add(self, r: Any) -> None:
        from edge_quq.result import Failure

        self.inputs += 1
        if isinstance(r, Failure):
            self.failed += 1
            return
        self.kept += int(r.keep)
        for k, v in r.timings_ms.items():
            self.stages.setdefault(k, array("d")).append(v)

    @property
    def processed(self) -> int:
        return self.inputs - self.failed

    def latency_ms(self) -> Dict[str, Dict[str, float]]:
        from edge_quq.telemetry import STAGES, percentiles

        import numpy as np

        keys = [k for k in (*STAGES, "total") if k in self.stages]
        return {k: {**percentiles(self.stages[k]), "mean": float(np.mean(self.stages[k]))} for k in keys}

    def summary(self, predictor: Any, interrupted: Optional[str]) -> Dict[str, Any]:
        return {"inputs": self.inputs, "processed": self.processed, "failed": self.failed, "kept": self.kept,
                "ignored": self.processed - self.kept, "latency_ms": self.latency_ms(),
                "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "settings": predictor.describe_settings(),
                "backend": predictor.backbone.describe(), "interrupted": interrupted}


class TableRows:
    """`predict`'s table, one row printed per result as it comes. Column widths are fixed before the first
    result from what is known then (the bundle's class and rule names); an input name longer than its
    column pushes that row's other cells right instead of holding every row back to measure them all."""

    INPUT_WIDTH = 28

    def __init__(self, predictor: Any) -> None:
        from edge_quq.decision import RULE_NAMES

        self.predictor = predictor
        self.why = True  # rule, OOD gate, risk or a detector: always say who ignored each sample
        self.flags = predictor.active is not None  # detectors watch: say which flag a kept sample anyway
        label_w = max(len(c) for c in predictor.bundle.classes)
        header = ["input", "decision", "label", "rule", "top class mean±std", "max p", "ms"]
        header += (["ignored by"] if self.why else []) + (["OOD flags"] if self.flags else [])
        self.widths = [self.INPUT_WIDTH, 8, max(label_w, 5), max(map(len, RULE_NAMES)), label_w + 12, 6, 8, 14, 10][:len(header)]
        self.header = self.line(header) + "\n" + "  ".join("-" * w for w in self.widths)

    def line(self, cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, self.widths)).rstrip()

    def row(self, r: Any) -> str:
        from edge_quq.result import Failure

        extra = len(self.widths) - 7
        if isinstance(r, Failure):
            return self.line([Path(r.source).name, "ERROR"] + ["-"] * (5 + extra))
        t = r.top_index
        return self.line([
            Path(r.source).name, r.decision, r.label or "-", r.rule,
            f"{r.top_label} {r.mean[t]:.3f}±{r.std[t]:.3f}", f"{r.scores['max_prob']:.3f}", f"{r.timings_ms['total']:.2f}",
        ] + ([",".join(r.ignored_by) or "-"] if self.why else [])
          + ([_flag_text(r.flagged, self.predictor.active)] if self.flags else []))


class StopOnSignal:
    """`with StopOnSignal() as stop:` SIGTERM and SIGINT set stop.signal_name instead of killing the process,
    so a loop checking it between results ends after a whole line and still prints its summary."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name)) if self.signal_name else 0


@main.command()
@click.argument("paths", nargs=-1, required=True)
@model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Images per backbone call.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table; the run summary goes to stderr.")
@user_errors
def predict(paths: Sequence[str], batch_size: int, as_json: bool, **model: Any) -> None:
    """Classify image files, folders or globs; say keep or ignore for each.

    Each result is printed as soon as its file is done. Exit code 0 when every input was processed (ignoring
    a sample is a result), 1 when some inputs could not be read (the others still get results), 2 for bad
    options or a bad bundle; after SIGTERM (SIGINT) the results so far and the summary are printed and the
    exit code is 143 (130).
    """
    from edge_quq.inputs import iter_inputs
    from edge_quq.result import Failure, dumps

    predictor = build_predictor(**model)
    totals = RunTotals()
    table = None if as_json else TableRows(predictor)
    if table is not None:
        click.echo(table.header)

    def emit(r: Any) -> None:
        totals.add(r)
        if isinstance(r, Failure):
            click.echo(f"error: {r.error}", err=True)
        click.echo(dumps(r.to_dict()) if table is None else table.row(r))

    with StopOnSignal() as stop:
        def paths_only() -> Iterator[Path]:
            # expansion problems are reported in input order, between the results around them
            for item in iter_inputs(paths):
                if stop.signal_name:
                    return
                if isinstance(item, Failure):
                    emit(item)
                else:
                    yield item

        try:
            for r in predictor.iter_predict(paths_only(), batch_size=batch_size):
                emit(r)
                if stop.signal_name:
                    break
        except BrokenPipeError:
            # The reader went away (`edge-quq predict DIR | head`): stop quietly, as cat does, with
            # stdout pointed at /dev/null so that the interpreter's final flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
    summary = totals.summary(predictor, stop.signal_name)
    if table is None:
        click.echo(dumps({"summary": summary}), err=True)
    else:
        _print_table_summary(summary, predictor)
    sys.exit(stop.exit_code or (1 if totals.failed else 0))


def _print_table_summary(summary: Dict[str, Any], predictor: Any) -> None:
    s = predictor.settings
    stopped = f" (stopped by {summary['interrupted']})" if summary["interrupted"] else ""
    click.echo(
        f"\n{summary['processed']} processed, {summary['kept']} kept, {summary['ignored']} ignored, {summary['failed']} failed{stopped}"
        f" | policy {predictor.policy.name} | T={s.num_iter} z={s.z:.3g} threshold={s.threshold:g} sampler={predictor.sampler.name} backend={summary['backend']}"
    )
    lat = summary["latency_ms"].get("total")
    if lat:
        stages = ", ".join(f"{k} {v['p50']:.2f}" for k, v in summary["latency_ms"].items() if k != "total")
        click.echo(f"latency ms p50/p90/p99: {lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f} (p50 per stage: {stages}); peak RSS {summary['peak_rss_mb']} MB")


@main.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def info(bundle: Optional[Path], as_json: bool) -> None:
    """Describe a bundle (default: the embedded one) and which backends can load it here."""
    from edge_quq.backends import loadable_backends
    from edge_quq.bundle import bundle_summary, load_bundle

    b = load_bundle(bundle)
    rows = bundle_summary(b)
    acc = b.manifest.get("accuracy")
    if isinstance(acc, dict):
        rows.append(("accuracy", ", ".join(f"{k} {v}" for k, v in acc.items())))
    backends = loadable_backends(b)
    rows.append(("head sampler", native_kernel_status(b)))
    rows.append(("decision math", decision_math_status()))
    if as_json:
        from edge_quq.result import dumps

        click.echo(dumps({"manifest_sha256": b.manifest_sha256, "fields": dict(rows), "backends": dict(backends),
                          "manifest": b.manifest}, indent=2, separators=(",", ": ")))
        return
    width = max(len(k) for k, _ in rows + backends) + 2
    for k, v in rows:
        click.echo(f"{k:<{width}}{v}")
    for k, v in backends:
        click.echo(f"{('backend ' + k):<{width}}{v}")


# -- camera ------------------------------------------------------------------------------------------------
class OutputURI(click.ParamType):
    """--output's values stay strings for click (the command checks them with parse_output, one error line);
    in a config file a relative path inside one is taken relative to the file's folder, like path options."""

    name = "uri"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> str:
        return str(value)

    @staticmethod
    def relative_to(value: str, base: Path) -> str:
        from edge_quq.sinks.outputs import relative_to

        return relative_to(value, base)


CAMERA_OPTIONS = [
    click.option("--width", type=click.IntRange(min=1), default=None, help="Capture width (cameras: csi, v4l2)."),
    click.option("--height", type=click.IntRange(min=1), default=None, help="Capture height (cameras: csi, v4l2)."),
    click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None, help="Capture frame rate (cameras: csi, v4l2)."),
    click.option("--every", type=click.IntRange(min=1), default=1, show_default=True, help="Process every Nth frame read from the source."),
    click.option("--max-fps", type=click.FloatRange(min=0, min_open=True), default=None, help="Process at most this many frames per second."),
    click.option("--crop", type=click.FloatRange(min=0, max=1, min_open=True), default=None, help="Classify the centered region of this fraction of width and height."),
    click.option("--roi", default=None, metavar="X,Y,W,H", help="Classify this pixel region of each frame (instead of --crop)."),
    click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this many seconds."),
    click.option("--frames", type=click.IntRange(min=1), default=None, help="Stop after this many processed frames."),
    click.option("--loop", is_flag=True, help="Files and folders: start again at the end (demos, soak tests)."),
    click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
                 help="Live sources: seconds without a frame before the source counts as stalled and is reopened."),
    click.option("--max-decode-errors", type=click.IntRange(min=0), default=DEFAULT_MAX_DECODE_ERRORS, show_default=True,
                 help="Video files: skip up to this many undecodable frames (a damaged stretch), counted in the stats as "
                      "decode_errors; one more ends the run with an error (exit 1)."),
    click.option("--open-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="Network sources: seconds to wait for a connection."),
    click.option("--stats-interval", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="Seconds between stats (stderr, stats file, MQTT, systemd STATUS)."),
    click.option("--output", "outputs", type=OutputURI(), multiple=True, metavar="URI",
                 help="Where results go; repeat for several: jsonl:PATH or jsonl:- (stdout), video:PATH, snapshots:DIR, stats:PATH, "
                      "http://HOST:PORT, mqtt://[user:pass@]host[:port] or mqtts://..., display://0 (docs/camera.md)."),
    click.option("--stats-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Same as --output stats:PATH: rewrite this JSON file (atomically) at every stats interval and at the end."),
    click.option("--jsonl", default=None, metavar="PATH|-", help="Same as --output jsonl:PATH: one JSON line per processed frame, to a file (appended) or - for stdout."),
    click.option("--video-out", default=None, metavar="PATH", help="Same as --output video:PATH: annotated video file (.avi, .mp4, .mkv)."),
    click.option("--snapshots", default=None, metavar="DIR", help="Same as --output snapshots:DIR: save ignored frames (PNG + JSON) to this folder for review."),
    click.option("--max-snapshots", type=click.IntRange(min=1), default=200, show_default=True, help="Keep at most this many snapshots (oldest deleted)."),
    click.option("--display", is_flag=True, help="Same as --output display://0: show annotated frames in a window (needs a screen and an OpenCV with GUI)."),
    click.option("--serve", default=None, metavar="[HOST:]PORT", help="Same as --output http://HOST:PORT: live HTTP view (MJPEG stream, page, /status.json); host defaults to 127.0.0.1."),
    click.option("--serve-token", default=None, metavar="TOKEN", envvar="EDGE_QUQ_SERVE_TOKEN",
                 help="Live view: require this token, as ?token=TOKEN in the URL (browsers) or an Authorization: Bearer TOKEN "
                      "header; set it whenever --serve binds beyond 127.0.0.1 (env EDGE_QUQ_SERVE_TOKEN)."),
    click.option("--mqtt", "mqtt_url", default=None, metavar="URL", help="Same as --output mqtt://...: publish to an MQTT broker, mqtt://[user:pass@]host[:port], mqtts:// for TLS."),
    click.option("--mqtt-prefix", default="edge-quq", show_default=True, help="MQTT topic prefix."),
    click.option("--mqtt-device", default=None, help="MQTT device name under the prefix (default: host name)."),
    click.option("--mqtt-every-frame", is_flag=True, help="Publish a result for every frame, not only on a change of decision or class."),
    click.option("--mqtt-ca-file", type=click.Path(exists=True, dir_okay=False), default=None, help="CA certificate for mqtts:// (default: the system's)."),
    click.option("--mqtt-discovery", is_flag=False, flag_value=MQTT_DISCOVERY_PREFIX, default=None, metavar="[PREFIX]",
                 help=f"Publish Home Assistant MQTT discovery (retained) under PREFIX (alone: {MQTT_DISCOVERY_PREFIX}), so the "
                      "camera shows up in Home Assistant as a device with its sensors; republished when Home Assistant "
                      "says online on PREFIX/status. The device name (--mqtt-device) must be letters, digits, _ and -."),
    click.option("--mqtt-discovery-mode", type=click.Choice(MQTT_DISCOVERY_MODES), default=DEFAULT_MQTT_DISCOVERY_MODE, show_default=True,
                 help="device: one message PREFIX/device/ID/config for the whole device (Home Assistant 2024.11 and newer); "
                      "component: one PREFIX/COMPONENT/ID/config per entity (older Home Assistant)."),
    click.option("--mqtt-discovery-remove", is_flag=True,
                 help="Delete this device from Home Assistant (empty retained payloads on its discovery topics, both "
                      "modes), then exit 0 without opening the source or loading the model."),
    click.option("--on-drift", type=click.Choice(ON_DRIFT), default=DEFAULT_ON_DRIFT, show_default=True,
                 help="When the drift alarm is up: flag (report it only) or ignore (frames during the alarm are also ignored, "
                      "\"drift\" in ignored_by)."),
    click.option("--drift-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
                 default=float(DRIFT_DEFAULTS["delta"]), show_default=True,  # type: ignore[arg-type]
                 help="Drift alarm: bound on the probability of a false alarm on an in-distribution stream (per start "
                      "of the martingale; docs/camera.md)."),
    click.option("--no-drift", is_flag=True, help="No drift alarm (every JSON line then carries \"drift\": null)."),
    click.option("-q", "--quiet", is_flag=True, help="No periodic stats lines on stderr (the final summary is still printed)."),
]


def camera_options(fn: Callable) -> Callable:
    """The camera command's own options; edge_quq.camera.CameraOptions gathers their values."""
    for opt in reversed(CAMERA_OPTIONS):
        fn = opt(fn)
    return fn


@main.command()
@config_option
@click.option("--source", required=True, metavar="URI",
              help="Frame source: csi://0, v4l2:///dev/video0, /dev/video0, 0, rtsp://..., http(s)://..., file://video.mp4, a video path, "
                   "an image folder or glob, or a GStreamer pipeline (docs/camera.md).")
@model_options
@camera_options
@user_errors
def camera(**values: Any) -> None:
    """Classify a live camera, stream, video or image folder frame by frame; say keep or ignore for each.

    Ends at the end of a file or folder, after --duration/--frames, or on SIGINT/SIGTERM (outputs flushed,
    exit 0). A live source that fails or stalls is reopened with backoff. docs/camera.md has the details.
    """
    from contextlib import ExitStack

    from edge_quq.camera import CameraLoop, CameraOptions
    from edge_quq.capture import Capture
    from edge_quq.loopstats import LoopStats, summary_text
    from edge_quq.redact import redact
    from edge_quq.sdnotify import Notifier
    from edge_quq.sinks import SinkSet, open_output
    from edge_quq.sources import open_source

    opts = CameraOptions.pop_from(values)  # what remains in `values` are the model options
    if opts.mqtt_discovery_remove:
        topics = opts.remove_discovery()
        click.echo(f"camera: Home Assistant discovery removed (empty retained payloads on {len(topics)} topics, "
                   f"{topics[0]} and the per-component ones)", err=True)
        return
    # Everything that can be refused from the arguments alone is refused before the model loads.
    spec, settings, outputs = opts.check()

    def log(msg: str) -> None:
        click.echo(redact(msg), err=True)

    def source() -> Any:
        return open_source(spec, opts.open_timeout, opts.stall_timeout, opts.max_decode_errors)

    predictor = build_predictor(**values)
    with ExitStack() as stack:
        first = stack.enter_context(source())
        cap = Capture(spec, source, first, stall_timeout_s=opts.stall_timeout,
                      loop=opts.loop, pace_s=(1.0 / opts.max_fps) if opts.max_fps and not spec.live else 0.0)
        stats = LoopStats(opts.source, cap)
        sinks = stack.enter_context(SinkSet(log=log))
        out_opts = opts.output_options(first.nominal_fps, stats, log)
        try:
            for o in outputs:
                sinks.add(open_output(o, out_opts))
            notifier = stack.enter_context(Notifier())
            s = predictor.settings
            log(f"camera: {first.describe()} | backend {predictor.backbone.describe()} sampler {predictor.sampler.name} "
                f"T={s.num_iter} z={s.z:.3g} threshold={s.threshold:g}")
            notifier.ready(f"model loaded, {spec.kind} source open")
            drift = opts.drift_monitor(predictor, log)
            loop = CameraLoop(predictor, cap, sinks, settings, notifier, source_uri=opts.source, log=log, stats=stats,
                              drift=drift, on_drift=opts.on_drift)
            final = loop.run()
        except EdgeQuqError:
            sinks.discard()  # a refused start leaves no stats file, no empty folder
            raise
    log(summary_text(final))
    if loop.fatal is not None:
        fail(str(loop.fatal), loop.fatal.exit_code)


# -- health ------------------------------------------------------------------------------------------------
@main.command(name="health")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"The service's config file, for its bundle, backend and stats file (default: {DEFAULT_CONFIG_PATH} when it exists).")
@click.option("--stats-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Stats file the camera loop writes (default: the config's stats file, else {DEFAULT_STATS_FILE}).")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help=f"Bundle to load (default: the config's, else {DEFAULT_SERVICE_BUNDLE} when it exists, else the embedded one).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Backend to open it with (default: the config's, else auto).")
@click.option("--max-age", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_AGE_S, show_default=True,
              help="Seconds after which the stats count as stale.")
@click.option("--no-model", is_flag=True, help="Only check the stats file (cheap enough for every few seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a line.")
def health(config: Optional[Path], stats_file: Optional[Path], bundle: Optional[Path], backend: Optional[str],
           max_age: float, no_model: bool, as_json: bool) -> None:
    """Exit 0 when the camera service is healthy: fresh stats (younger than --max-age), state running,
    and the bundle loads with a backend. Otherwise exit 1 with one line saying why (2 for bad options).

    Meant for a systemd timer, a cron job or a monitoring agent; reads nothing but the stats file, the
    config and the bundle.
    """
    from edge_quq.health import service_health

    if config is not None and not config.exists():
        fail(f"{config}: config file does not exist")
    from edge_quq.redact import redact, redact_obj
    from edge_quq.result import dumps

    result = service_health(camera, config, stats_file, bundle, backend, max_age, model=not no_model)
    result.reason, result.details = redact(result.reason), redact_obj(result.details)  # type: ignore[assignment]
    if as_json:
        click.echo(dumps(result.to_dict(), sort_keys=True, separators=None))
    elif result.healthy:
        click.echo(f"healthy: {result.reason}")
    else:
        click.echo(f"unhealthy: {result.reason}", err=True)
    sys.exit(0 if result.healthy else 1)


@main.command(name="config-template", hidden=True)
def config_template() -> None:
    """Print deploy/config.example (edge-quq config-template > deploy/config.example)."""
    click.echo(service_config_example(camera), nl=False)


def _register_host_commands() -> None:
    # The exporter lives in the same distribution but needs TensorFlow only when it runs.
    try:
        from edge_quq_export.cli import export_cmd  # type: ignore
    except ImportError:
        return
    main.add_command(export_cmd, name="export")
    try:
        from edge_quq_export.detectors import fit_detectors_cmd  # type: ignore
    except ImportError:
        return
    main.add_command(fit_detectors_cmd, name="fit-detectors")


_register_host_commands()


if __name__ == "__main__":
    main()
