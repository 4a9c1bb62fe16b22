"""Where the camera loop's results go. Every sink gets the same FrameResult per processed frame, the same
stats dict at every stats interval, and close() at the end (which must flush).

    files.py      JSON lines to stdout or a file, annotated video file, snapshots of ignored frames,
                  --display window
    annotate.py   the overlay drawn once per frame for the video, the window and the HTTP stream
    http.py       --serve: MJPEG stream, page, JSON status
    mqtt.py       --mqtt: Frigate / Home Assistant style topics
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np

from edge_quq.result import Prediction


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

    @property
    def annotated(self) -> np.ndarray:
        """The annotated frame, drawn once however many sinks ask for it."""
        if self._annotated is None:
            from edge_quq.sinks.annotate import annotate  # noqa: PLC0415

            self._annotated = (self._annotate or annotate)(self)
        return self._annotated


class Sink:
    name = "sink"

    def emit(self, r: FrameResult) -> None:
        pass

    def stats(self, stats: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
