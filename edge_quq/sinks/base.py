"""What every sink gets: one FrameResult per processed frame, the stats dict at every stats interval, and
close() at the end (which must flush). Sinks are context managers, so `with open_output(uri) as out:`
closes them however the block ends."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

from edge_quq.result import Prediction


def frame_record(index: int, t: float, prediction: Prediction, roi: Optional[tuple] = None) -> Dict[str, Any]:
    """The JSON-line object of one frame: time, frame index, the prediction, the classified region."""
    rec = prediction.to_dict()
    rec.pop("settings", None)  # the same every frame: it is in the stats file and the start-up line
    record = {"ts": round(t, 4), "frame": index, **rec}
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
    _annotated: Optional[np.ndarray] = field(default=None, repr=False)
    _annotate: Optional[Callable[["FrameResult"], np.ndarray]] = field(default=None, repr=False)

    @classmethod
    def make(cls, index: int, t: float, image: np.ndarray, prediction: Prediction, roi: Optional[tuple] = None,
             fps: float = 0.0) -> "FrameResult":
        return cls(index, t, image, prediction, frame_record(index, t, prediction, roi), roi, fps)

    @property
    def annotated(self) -> np.ndarray:
        """The annotated frame, drawn once however many sinks ask for it."""
        if self._annotated is None:
            from edge_quq.sinks.annotate import annotate  # noqa: PLC0415

            self._annotated = (self._annotate or annotate)(self)
        return self._annotated


class Sink:
    name = "sink"
    quit = False  # set by a sink whose user asked to end the run (the --display window's q key)
    _rendered = 0

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
