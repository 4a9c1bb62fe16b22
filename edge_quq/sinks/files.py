"""Local sinks: JSON lines, annotated video file, snapshots of ignored frames, the stats file, the display window."""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Deque, Dict

from edge_quq.errors import OptionError
from edge_quq.sinks.base import FrameResult, Sink


VIDEO_FOURCC = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "XVID"}


def check_video_path(path: str, label: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FOURCC:
        raise OptionError(f"{label}: unknown container {suffix or '(none)'} (use .avi, .mp4, .mkv)")


def check_parent(path: str, label: str) -> None:
    if not Path(path).parent.is_dir():
        raise OptionError(f"{label}: folder {Path(path).parent} does not exist")


class JsonLinesSink(Sink):
    """One JSON object per processed frame; '-' is stdout. Flushed per line: a reader (or journald) sees
    each frame as it happens, and a kill loses at most the line being written."""

    name = "jsonl"

    def __init__(self, dest: str, label: str = "") -> None:
        self.dest = dest
        self.lines = 0
        # A file this run creates and never writes to (refused ROI, a source that ends before its first
        # frame) is removed at close, so a failed start leaves nothing behind.
        self.created = dest != "-" and not Path(dest).exists()
        if dest == "-":
            self.fh: IO[str] = sys.stdout
        else:
            try:
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(dest, "a", encoding="utf-8")
            except OSError as e:
                raise OptionError(f"{label or '--jsonl ' + dest}: cannot be written ({e.strerror})") from None

    def emit(self, r: FrameResult) -> None:
        self.fh.write(json.dumps(r.record, separators=(",", ":")) + "\n")
        self.fh.flush()
        self.lines += 1

    def close(self) -> None:
        try:
            self.fh.flush()
        except (OSError, ValueError):
            pass
        if self.fh is not sys.stdout:
            self.fh.close()
            if self.created and self.lines == 0:
                try:
                    os.unlink(self.dest)
                except OSError:
                    pass


class VideoSink(Sink):
    """Annotated frames to a video file (.avi: MJPG, .mp4/.m4v/.mov: mp4v, .mkv: XVID)."""

    name = "video"
    def __init__(self, path: str, fps: float, label: str = "") -> None:
        self.label = label or f"--video-out {path}"
        check_video_path(path, self.label)
        check_parent(path, self.label)
        self.path = Path(path)
        self.fps = fps if fps > 0 else 10.0
        self.writer = None
        self.size = None
        self.frames = 0

    def emit(self, r: FrameResult) -> None:
        import cv2  # noqa: PLC0415

        img = r.annotated
        if self.writer is None:
            self.size = (img.shape[1], img.shape[0])
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()]), self.fps, self.size)
            if not self.writer.isOpened():
                raise OptionError(f"{self.label}: OpenCV cannot write this file")
        if (img.shape[1], img.shape[0]) != self.size:
            img = cv2.resize(img, self.size)  # a stream that changes resolution mid-run
        self.writer.write(img)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class SnapshotSink(Sink):
    """Ignored frames (the ones a person should review) as PNG + the prediction as JSON, newest `limit` kept."""

    name = "snapshots"

    def __init__(self, folder: str, limit: int = 200, label: str = "") -> None:
        label = label or f"--snapshots {folder}"
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptionError(f"{label}: cannot create ({e.strerror})") from None
        if not os.access(self.folder, os.W_OK):
            raise OptionError(f"{label}: not writable")
        self.limit = limit
        self.saved: Deque[Path] = deque()
        self.total = 0

    def emit(self, r: FrameResult) -> None:
        import cv2  # noqa: PLC0415

        if r.prediction.keep:
            return
        stem = self.folder / f"ignored_{int(r.time)}_{r.index:08d}"
        cv2.imwrite(str(stem.with_suffix(".png")), r.image)
        stem.with_suffix(".json").write_text(json.dumps(r.record, separators=(",", ":")) + "\n", encoding="utf-8")
        self.saved.append(stem)
        self.total += 1
        while len(self.saved) > self.limit:
            old = self.saved.popleft()
            for suffix in (".png", ".json"):
                try:
                    old.with_suffix(suffix).unlink()
                except OSError:
                    pass


class DisplaySink(Sink):
    """A window with the annotated frames; `q` or Esc in it ends the run."""

    name = "display"

    def __init__(self, label: str = "--display") -> None:
        import cv2  # noqa: PLC0415

        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise OptionError(f"{label}: no screen here (DISPLAY/WAYLAND_DISPLAY unset); use --serve to watch from a browser")
        try:
            cv2.namedWindow("edge-quq", cv2.WINDOW_NORMAL)
        except cv2.error:
            raise OptionError(f"{label}: this OpenCV has no GUI (opencv-python-headless); install Debian's python3-opencv "
                              "in a venv made with --system-site-packages, or use --serve") from None
        self.quit = False

    def emit(self, r: FrameResult) -> None:
        import cv2  # noqa: PLC0415

        cv2.imshow("edge-quq", r.annotated)
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.quit = True

    def close(self) -> None:
        import cv2  # noqa: PLC0415

        try:
            cv2.destroyAllWindows()
        except cv2.error:
            pass


class StatsFileSink(Sink):
    """The stats JSON, rewritten at every stats interval and at the end (what `edge-quq health` reads).
    A failed write is a warning, not the end of this output: the next interval tries again."""

    name = "stats"

    def __init__(self, path: str, label: str = "", log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
        self.path = Path(path)
        self.label = label or f"--stats-file {path}"
        self.log = log

    def stats(self, stats: Dict[str, Any]) -> None:
        try:
            atomic_write_json(self.path, stats)
        except OSError as e:
            self.log(f"warning: cannot write {self.label}: {e.strerror}")


def atomic_write_json(path: Path, obj: Dict[str, Any]) -> None:
    """Write, fsync-free but rename-atomic: a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)
