"""`edge-quq health`: is the camera service alive and able to run its model?

Healthy means three things, checked in this order so the reason given is the most direct one:
1. the stats file the camera loop rewrites periodically exists and is fresh (`updated` younger than
   --max-age): the loop is still writing;
2. its `state` is "running" (the loop says frames flow; "stalled" and "stopped" are its own verdicts);
3. the bundle loads (manifest and checksums verified) and a backend can open its backbone: a restart
   would come back up.
A drift alarm in the stats (the input stream stopped looking like the calibration data) does not make the
service unhealthy: the service works, the data changed. It is reported in the line ("healthy: ...; drift
alarm since frame N") and in --json's `drift`, and the exit code stays 0.
The camera loop's stats file is one JSON object written atomically (rename), so a read never sees half.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from edge_quq.errors import EdgeQuqError

DEFAULT_STATS_FILE = Path("/var/lib/edge-quq/stats.json")
DEFAULT_SERVICE_BUNDLE = Path("/opt/edge-quq/bundle")  # where deploy/install.sh puts it
DEFAULT_MAX_AGE_S = 60.0


@dataclass
class Health:
    healthy: bool
    reason: str  # the one line: why not, or a summary when healthy
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"healthy": self.healthy, "reason": self.reason, **self.details}


def _fmt_age(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _installed_bundle() -> Optional[Path]:
    return DEFAULT_SERVICE_BUNDLE if DEFAULT_SERVICE_BUNDLE.is_dir() else None


MAX_STATS_BYTES = 1 << 20  # a stats file is a few KB; anything far bigger is not one


def read_stats_text(stats_file: Path) -> str:
    """The stats file's text; OSError for a missing, unreadable or non-regular file (a FIFO would block
    the reader forever, a device could be endless), ValueError for one that is not UTF-8 or far too big."""
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer before fstat can refuse it
    fd = os.open(stats_file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_STATS_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_STATS_BYTES:
        raise ValueError(f"larger than {MAX_STATS_BYTES // 1024} KB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_stats(stats_file: Path, max_age_s: float, now: Optional[float] = None) -> Health:
    """Freshness and state of the camera loop's stats file (no model work)."""
    now = time.time() if now is None else now
    try:
        raw = read_stats_text(Path(stats_file))
    except FileNotFoundError:
        return Health(False, f"no stats file at {stats_file} (service never ran, or --stats-file differs)")
    except OSError as e:
        return Health(False, f"cannot read stats file {stats_file} ({e.strerror or e})")
    except ValueError as e:
        return Health(False, f"stats file {stats_file} is {e}")
    try:
        stats = json.loads(raw)
    except json.JSONDecodeError as e:
        return Health(False, f"stats file {stats_file} is not JSON ({e.msg} at line {e.lineno})")
    if not isinstance(stats, dict):
        return Health(False, f"stats file {stats_file} is not a JSON object")
    updated = stats.get("updated")
    if isinstance(updated, bool) or not isinstance(updated, (int, float)) or not math.isfinite(updated):
        return Health(False, f"stats file {stats_file} has no numeric 'updated' time")
    age = now - float(updated)
    state = stats.get("state")
    details: Dict[str, Any] = {"stats_file": str(stats_file), "age_s": round(age, 3), "state": state}
    if age >= max_age_s:
        return Health(False, f"stats are {_fmt_age(age)} old (max {_fmt_age(max_age_s)}): the camera loop stopped writing {stats_file}", details)
    if age < -max_age_s:
        # A writer far in the future means the clock jumped (no RTC on a Pi before NTP sync): say so rather
        # than report a fresh file.
        return Health(False, f"stats 'updated' is {_fmt_age(-age)} in the future: system clock changed since {stats_file} was written", details)
    if state != "running":
        return Health(False, f"camera loop state is {state!r}, not 'running' ({stats_file})", details)
    failing = _failing_outputs(stats.get("sink_errors"))
    if failing:
        details["sink_errors"] = stats["sink_errors"]
        return Health(False, f"outputs failing: {failing} ({stats_file})", details)
    reason = f"stats {_fmt_age(max(age, 0.0))} old, state running"
    drift = stats.get("drift")
    if isinstance(drift, dict):
        details["drift"] = drift
        if drift.get("alarm") is True:
            reason += f"; drift alarm since frame {drift.get('since_frame')} (the input data changed, the service works)"
    return Health(True, reason, details)


def _failing_outputs(errors: Any) -> str:
    """The outputs the stats say are failing now or stopped, as words ('' when none)."""
    from edge_quq.loopstats import sink_error_text

    if not isinstance(errors, dict):
        return ""
    bad = {k: v for k, v in errors.items() if isinstance(v, dict) and (v.get("failing") or v.get("stopped"))}
    return "; ".join(sink_error_text(str(k), v) for k, v in bad.items())


def check_model(bundle: Optional[Path], backend: str = "auto") -> Health:
    """Load and verify the bundle, then open its backbone with one thread (what a restart would do)."""
    from edge_quq.backends import make_backbone
    from edge_quq.bundle import load_bundle

    try:
        b = load_bundle(bundle)
        bb = make_backbone(b, backend, threads=1)
    except EdgeQuqError as e:
        return Health(False, f"model does not load: {e}")
    return Health(True, f"bundle {b.path} loads ({bb.describe()})", {"bundle": str(b.path), "backend": bb.describe()})


def check(stats_file: Path, max_age_s: float, bundle: Optional[Path], backend: str = "auto", model: bool = True,
          now: Optional[float] = None) -> Health:
    h = check_stats(stats_file, max_age_s, now)
    if not h.healthy or not model:
        return h
    m = check_model(bundle, backend)
    details = {**h.details, **m.details}
    if not m.healthy:
        return Health(False, m.reason, details)
    return Health(True, f"{h.reason}; {m.reason}", details)


def settings_from_config(path: Path, camera: Any) -> Dict[str, Any]:
    """bundle, backend and stats_file as the service would see them in its config file (the stats file
    set as `stats-file` or as a `stats:PATH` output).

    The whole file is checked against the camera command exactly as the service checks it at start-up
    (types and keys, then the source, loop settings and outputs, as the camera does before it loads the
    model): a config the service would refuse is itself a health problem.
    """
    from edge_quq.config import load_config
    from edge_quq.sinks.outputs import stats_paths

    dm = load_config(camera, path)
    check_camera_settings(camera, dm, path)
    out = {k: dm[k] for k in ("bundle", "backend", "stats_file") if k in dm}
    if "stats_file" not in out:
        paths = stats_paths(dm.get("outputs", ()))
        if paths:
            out["stats_file"] = Path(paths[0])
    return out


def check_camera_settings(camera: Any, default_map: Dict[str, Any], path: Path) -> None:
    """Run the camera command's own start-up checks on a config's values (ConfigError naming the file)."""
    import click

    from edge_quq.camera import CameraOptions
    from edge_quq.config import ConfigError

    try:
        ctx = camera.make_context("camera", [], default_map=default_map, resilient_parsing=False)
    except click.UsageError as e:
        raise ConfigError(f"{path}: {e.format_message()}") from None
    try:
        CameraOptions.pop_from(dict(ctx.params)).check()
    except EdgeQuqError as e:
        raise ConfigError(f"{path}: {e}") from None


def service_health(camera: Any, config: Optional[Path], stats_file: Optional[Path], bundle: Optional[Path], backend: Optional[str],
                   max_age_s: float, model: bool = True) -> Health:
    """What `edge-quq health` reports: arguments given win, then the service config (`config`, else the
    installed one when this user may read it), then the installed defaults."""
    from edge_quq import config as config_module
    from edge_quq.config import ConfigError

    # The installed config is root:edge-quq 0640 (it may hold broker passwords): a monitoring user outside
    # that group gets the installed defaults instead, which is what install.sh writes into it anyway.
    default_cfg = config_module.DEFAULT_CONFIG_PATH
    cfg_path = config if config is not None else (default_cfg if os.access(default_cfg, os.R_OK) else None)
    from_cfg: Dict[str, Any] = {}
    if cfg_path is not None:
        try:
            from_cfg = settings_from_config(cfg_path, camera)
        except ConfigError as e:
            return Health(False, f"service config is invalid: {e}", {"config": str(cfg_path)})
    return check(
        stats_file or from_cfg.get("stats_file") or DEFAULT_STATS_FILE, max_age_s,
        bundle or from_cfg.get("bundle") or _installed_bundle(), backend or from_cfg.get("backend") or "auto", model=model,
    )
