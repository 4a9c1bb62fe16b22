"""Stage timing, process memory, and the latency summary of a run."""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import numpy as np

STAGES = ("preprocess", "backbone", "head", "detectors", "decision")


class StageClock:
    """Accumulates wall-clock milliseconds per named stage for one prediction. `overlap_ms`: time counted in two
    stages at once, as they ran on two threads (a frame's total is the stages' sum less it)."""

    __slots__ = ("ms", "overlap_ms")

    def __init__(self) -> None:
        self.ms: Dict[str, float] = {}
        self.overlap_ms = 0.0

    def stage(self, name: str) -> "_Stage":
        """A context manager adding the time spent inside it to stage `name`."""
        return _Stage(self.ms, name)


class _Stage:
    # a slotted class rather than @contextmanager: a frame enters several stages, and the generator machinery
    # cost a few microseconds each
    __slots__ = ("ms", "name", "t0")

    def __init__(self, ms: Dict[str, float], name: str) -> None:
        self.ms, self.name = ms, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.ms[self.name] = self.ms.get(self.name, 0.0) + (time.perf_counter() - self.t0) * 1e3


_PROCESS = None
_LAST_RSS = 0
_READ_ERRORS = 0


def rss_bytes() -> int:
    """Resident set size of this process (psutil; cached Process handle). Never raises: a failed /proc read
    (EMFILE when something exhausted the file descriptors, a restricted /proc) returns the last value read
    and is counted (proc_read_errors), because a number in a stats line is not worth a dead camera loop."""
    global _PROCESS, _LAST_RSS, _READ_ERRORS
    try:
        if _PROCESS is None:
            import psutil  # noqa: PLC0415

            _PROCESS = psutil.Process()
        _LAST_RSS = int(_PROCESS.memory_info().rss)
    except Exception:  # OSError, psutil.Error (AccessDenied, ...): all mean "not this time"
        _READ_ERRORS += 1
    return _LAST_RSS


def proc_read_errors() -> int:
    """How many rss_bytes() reads have failed in this process."""
    return _READ_ERRORS


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> Dict[str, float]:
    if len(values) == 0:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def latency_summary(timings: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """p50/p90/p99 and mean per stage (and total) over a run's results."""
    out: Dict[str, Dict[str, float]] = {}
    keys = [k for k in (*STAGES, "total") if any(k in t for t in timings)]
    for k in keys:
        vals = [t[k] for t in timings if k in t]
        out[k] = {**percentiles(vals), "mean": float(np.mean(vals)) if vals else float("nan")}
    return out
