"""The capture thread: reads a source as fast as it delivers, hands the loop the newest frame.

Live sources (cameras, streams) go through a one-slot queue that always holds the newest frame: when the
loop is slower than the camera, older frames are replaced and counted as dropped, so the loop never works
through a backlog and memory stays flat. A live source that errors, ends or delivers nothing for
`stall_timeout_s` is closed and reopened with exponential backoff; the loop keeps running and reports it.
Files and folders are read at the loop's pace (nothing dropped) and end cleanly.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from edge_quq.errors import EdgeQuqError
from edge_quq.redact import redact
from edge_quq.sources import DecodeLimitError, Source, SourceSpec


@dataclass
class Frame:
    index: int  # 0-based count of frames read from the source (across reopens)
    time: float  # unix time when it was read
    image: np.ndarray


class Capture:
    def __init__(self, spec: SourceSpec, opener: Callable[[], Source], first: Source, *, stall_timeout_s: float = 5.0,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 5.0, loop: bool = False, pace_s: float = 0.0) -> None:
        self.spec = spec
        self.live = spec.live
        self.opener = opener
        self.source: Optional[Source] = first
        self.stall_timeout_s = stall_timeout_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.loop = loop  # files/folders: start again at the end (demos, soak tests)
        self.pace_s = pace_s  # files/folders: at least this long between frames (--max-fps on a file)
        self.nominal_fps = first.nominal_fps
        self._cond = threading.Condition()
        self._slot: Optional[Frame] = None
        self._stop = threading.Event()
        self.ended = False  # file/folder exhausted (or stopped)
        self.fatal: Optional[EdgeQuqError] = None  # why a file ended early, when the run must fail (too damaged)
        # Counters, read by the loop for its stats (ints are updated under the condition's lock).
        self.seen = 0
        self.dropped = 0
        self.reopens = 0
        self.failures = 0  # read errors, ends and stalls of a live source
        self.last_error: Optional[str] = None
        self.last_frame_time = time.time()
        self._unreadable_closed = 0  # unreadable files of the sources already closed (a --loop folder reopens)
        self._decode_errors_closed = 0
        self._thread = threading.Thread(target=self._run, name="edge-quq-capture", daemon=True)

    # -- consumer side ---------------------------------------------------------------------------------
    def start(self) -> "Capture":
        self._thread.start()
        return self

    def get(self, timeout: float) -> Optional[Frame]:
        """The newest unread frame, or None after `timeout` s (check .ended)."""
        with self._cond:
            if self._slot is None and not self.ended:
                self._cond.wait(timeout)
            f, self._slot = self._slot, None
            self._cond.notify_all()  # a file reader waits for the slot to empty
            return f

    def stalled(self, now: Optional[float] = None) -> bool:
        """No frame for stall_timeout_s on a live source (also while it is being reopened)."""
        t = time.time() if now is None else now
        return self.live and not self.ended and (t - self.last_frame_time) > self.stall_timeout_s

    @property
    def unreadable(self) -> int:
        """Files of a folder source that could not be read as images (skipped)."""
        src = self.source
        return self._unreadable_closed + (src.unreadable if src is not None else 0)

    @property
    def decode_errors(self) -> int:
        """Frames of a video file skipped because they do not decode."""
        src = self.source
        return self._decode_errors_closed + (src.decode_errors if src is not None else 0)

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, join_s: float = 1.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        # A network read can block up to its timeout: do not wait for it longer than asked (daemon thread).
        self._thread.join(join_s)

    # -- producer side ---------------------------------------------------------------------------------
    def _put(self, img: np.ndarray) -> None:
        with self._cond:
            if not self.live:
                while self._slot is not None and not self._stop.is_set():
                    self._cond.wait(0.1)
            elif self._slot is not None:
                self.dropped += 1
            self._slot = Frame(self.seen, time.time(), img)
            self.seen += 1
            self.last_frame_time = time.time()
            self._cond.notify_all()

    def _finish(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def _close(self) -> None:
        if self.source is not None:
            self._unreadable_closed += self.source.unreadable
            self._decode_errors_closed += self.source.decode_errors
            try:
                self.source.close()
            except Exception:  # closing a broken capture must not kill the thread
                pass
            self.source = None

    def _reopen(self) -> bool:
        delay = self.backoff_min_s
        while not self._stop.is_set():
            try:
                self.source = self.opener()
                self.reopens += 1
                return True
            except EdgeQuqError as e:
                self.last_error = redact(str(e))
            except Exception as e:  # a driver error while reopening is reported, then retried
                self.last_error = redact(f"{type(e).__name__}: {e}")
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_max_s)
        return False

    def _run(self) -> None:
        try:
            last_put = 0.0
            while not self._stop.is_set():
                if self.source is None:
                    if not self._reopen():
                        break
                if self.pace_s and not self.live:
                    wait = last_put + self.pace_s - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        break
                t0 = time.time()
                try:
                    img = self.source.read() if self.source is not None else None
                except DecodeLimitError as e:
                    self.fatal = e
                    self.last_error = str(e)
                    break
                except Exception as e:  # an exception from a driver is a failed read, not the end of the loop
                    self.last_error = redact(f"read failed: {type(e).__name__}: {e}")
                    img = None
                if self._stop.is_set():
                    break
                if img is not None:
                    last_put = time.monotonic()
                    self._put(img)
                    continue
                if not self.live:
                    if self.loop and self.seen > 0:
                        self._close()
                        continue
                    break
                # A live source failed: count it, close it, reopen after a short pause (an instant failure
                # loop would spin a core).
                self.failures += 1
                self.last_error = f"no frame from {redact(self.spec.uri)} (read failed or stream ended after {time.time() - t0:.1f} s); reopening"
                self._close()
                self._stop.wait(self.backoff_min_s)
        finally:
            self._close()
            self._finish()
