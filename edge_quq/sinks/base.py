"""What every sink gets: one FrameResult per processed frame, the stats dict at every stats interval, and
close() at the end (which must flush). Sinks are context managers, so `with open_output(uri) as out:`
closes them however the block ends."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

from edge_quq.result import Prediction


def frame_record(index: int, t: float, prediction: Prediction, roi: Optional[tuple] = None,
                 drift: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON-line object of one frame: time, frame index, the prediction, the drift state
    (DriftStatus.to_json(); null without a drift monitor), the classified region."""
    rec = prediction.to_dict()
    rec.pop("settings", None)  # the same every frame: it is in the stats file and the start-up line
    record = {"ts": round(t, 4), "frame": index, **rec, "drift": drift}
    if roi:
        record["roi"] = list(roi)
    return record


@dataclass
class FrameResult:
    index: int  # frame index from the source
    time: float  # unix time the frame was captured
    image: np.ndarray  # the full frame (BGR), before crop
    prediction: Prediction
    record: Dict[str, Any]  # the JSON-line object
    roi: Optional[tuple] = None  # (x, y, w, h) of the region that was classified
    fps: float = 0.0
    drift: Optional[Dict[str, Any]] = None  # DriftStatus.to_json() of this frame; None without a drift monitor
    _annotated: Optional[np.ndarray] = field(default=None, repr=False)
    _annotate: Optional[Callable[["FrameResult"], np.ndarray]] = field(default=None, repr=False)

    @classmethod
    def make(cls, index: int, t: float, image: np.ndarray, prediction: Prediction, roi: Optional[tuple] = None,
             fps: float = 0.0, drift: Optional[Dict[str, Any]] = None) -> "FrameResult":
        return cls(index, t, image, prediction, frame_record(index, t, prediction, roi, drift), roi, fps, drift)

    @property
    def annotated(self) -> np.ndarray:
        """The annotated frame, drawn once however many sinks ask for it."""
        if self._annotated is None:
            from edge_quq.sinks.annotate import annotate  # noqa: PLC0415

            self._annotated = (self._annotate or annotate)(self)
        return self._annotated


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


REPORT_EVERY_S = 300.0  # a failure that persists is said again this often (not every stats interval)


class Failures:
    """A sink's failures that do not end it (disk full, broker refusing): said on stderr the first time,
    then at most every `every_s` seconds while they last, once more when they end; counted for the stats'
    sink_errors.

    A nearly full disk makes an output flap (a small record fits, the next does not): the quiet period
    holds across such recoveries, so a flapping output says at most one line per `every_s`, and the
    "works again" line follows only a failure that was said."""

    def __init__(self, name: str, log: Callable[[str], None] = _stderr, every_s: float = REPORT_EVERY_S) -> None:
        self.name, self.log, self.every_s = name, log, every_s
        self.count = 0
        self.error: Optional[str] = None
        self.failing = False
        self._said_at: Optional[float] = None
        self._since_said = 0
        self._announced = False  # the current run of failures was said

    def failed(self, error: str) -> None:
        from edge_quq.redact import redact  # noqa: PLC0415

        self.count += 1
        self._since_said += 1
        self.error = redact(error)
        self.failing = True
        now = time.monotonic()
        quiet = self._said_at is not None and now - self._said_at < self.every_s
        if quiet:
            return
        if self._announced:
            self.log(f"warning: {self.name} output still failing ({self._since_said} failures in {now - self._said_at:.0f} s): {self.error}")
        else:
            self.log(f"warning: {self.name} output: {self.error}")
        self._said_at, self._since_said, self._announced = now, 0, True

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            if self._announced:
                self.log(f"{self.name} output works again (after {self.count} failures so far)")
            self._announced = False

    def entry(self) -> Optional[Dict[str, Any]]:
        """sink_errors' entry for this output, None while it never failed."""
        return {"error": self.error, "count": self.count, "failing": self.failing} if self.count else None


class Sink:
    name = "sink"
    quit = False  # set by a sink whose user asked to end the run (the --display window's q key)
    _rendered = 0
    failures: Optional[Failures] = None  # set by sinks that survive their own write failures

    def discard(self) -> None:
        """The run was refused before it started: remove what this output created (files, folders)."""

    def emit(self, r: FrameResult) -> None:
        pass

    def stats(self, stats: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def render(self, image: np.ndarray, prediction: Prediction, index: Optional[int] = None) -> None:
        """emit() for a caller without a camera loop: one frame and its prediction (jetson-inference's Render)."""
        i = self._rendered if index is None else index
        self._rendered = i + 1
        self.emit(FrameResult.make(i, time.time(), image, prediction))

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
