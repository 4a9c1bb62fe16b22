"""Local sinks: JSON lines, annotated video file, snapshots of ignored frames, the stats file, the display window."""
from __future__ import annotations

import errno
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

from edge_quq.errors import OptionError
from edge_quq.sinks.base import Failures, FrameResult, Sink, _stderr
from edge_quq.result import dumps

STATS_FILE_MODE = 0o640  # the stats name the source; owner and group (a monitoring user) only


VIDEO_FOURCC = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "XVID"}


def check_video_path(path: str, label: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FOURCC:
        raise OptionError(f"{label}: unknown container {suffix or '(none)'} (use .avi, .mp4, .mkv)")


def check_parent(path: str, label: str) -> None:
    if not Path(path).parent.is_dir():
        raise OptionError(f"{label}: folder {Path(path).parent} does not exist")


def make_dirs(folder: Path) -> List[Path]:
    """mkdir -p, returning the folders it created (innermost last), so a refused run can remove them."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: List[Path]) -> None:
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): it stays
            return


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to an O_APPEND file, all of it or none: a write that fails or comes up short (disk
    full) is cut back off, so a reader never sees half a record."""
    size = os.fstat(fd).st_size
    done = 0
    try:
        while done < len(data):
            n = os.write(fd, data[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
    except OSError:
        if done:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        raise


def write_whole(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file all or nothing: into a temp file beside it, then renamed over it. A failure (disk full)
    removes the temp file and raises; a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # a temp file left by an older run keeps its old mode otherwise
            append_whole(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class JsonLinesSink(Sink):
    """One JSON object per processed frame; '-' is stdout. Each line is written with one append and flushed:
    a reader (or journald) sees each frame as it happens, a kill loses at most the line being written, and a
    full disk loses whole lines (counted in sink_errors), never leaves half of one."""

    name = "jsonl"

    def __init__(self, dest: str, label: str = "", log: Callable[[str], None] = _stderr) -> None:
        self.dest = dest
        self.lines = 0
        self.failures = Failures(self.name, log)
        self.fd: Optional[int] = None
        self.made: List[Path] = []
        # A file this run creates and never writes to (refused ROI, a source that ends before its first
        # frame) is removed at close, so a failed start leaves nothing behind.
        self.created = dest != "-" and not Path(dest).exists()
        if dest != "-":
            try:
                self.made = make_dirs(Path(dest).parent)
                self.fd = os.open(dest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:
                remove_empty(self.made)
                raise OptionError(f"{label or '--jsonl ' + dest}: cannot be written ({e.strerror})") from None

    def emit(self, r: FrameResult) -> None:
        line = dumps(r.record) + "\n"
        if self.fd is None:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.lines += 1
            return
        try:
            append_whole(self.fd, line.encode("utf-8"))
        except OSError as e:
            self.failures.failed(f"cannot write {self.dest} ({e.strerror}); frames are not recorded meanwhile")
            return
        self.failures.ok()
        self.lines += 1

    def discard(self) -> None:
        self.lines = 0 if self.created else self.lines

    def close(self) -> None:
        if self.fd is None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            return
        os.close(self.fd)
        self.fd = None
        if self.created and self.lines == 0:
            try:
                os.unlink(self.dest)
            except OSError:
                pass
            remove_empty(self.made)


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
        self._probe()

    def _probe(self) -> None:
        """Refuse a file OpenCV cannot write now, at start, rather than at the first frame (a run that goes
        on without its video)."""
        import cv2  # noqa: PLC0415

        existed = self.path.exists()
        if existed and not self.path.is_file():
            raise OptionError(f"{self.label}: exists and is not a regular file")
        w = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()]), self.fps, (64, 64))
        ok = w.isOpened()
        w.release()
        if not existed:
            try:
                self.path.unlink()
            except OSError:
                pass
        if not ok:
            raise OptionError(f"{self.label}: OpenCV cannot write this file")

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
    """Ignored frames (the ones a person should review) as PNG + the prediction as JSON, newest `limit` kept.
    Each snapshot is both files or neither: a failed write (disk full) removes what it wrote and is counted."""

    name = "snapshots"

    def __init__(self, folder: str, limit: int = 200, label: str = "", log: Callable[[str], None] = _stderr) -> None:
        label = label or f"--snapshots {folder}"
        self.folder = Path(folder)
        try:
            self.made = make_dirs(self.folder)
        except OSError as e:
            raise OptionError(f"{label}: cannot create ({e.strerror})") from None
        if not os.access(self.folder, os.W_OK):
            remove_empty(self.made)
            raise OptionError(f"{label}: not writable")
        self.limit = limit
        self.saved: Deque[Path] = deque()
        self.total = 0
        self.failures = Failures(self.name, log)

    def emit(self, r: FrameResult) -> None:
        import cv2  # noqa: PLC0415

        if r.prediction.keep:
            return
        stem = self.folder / f"ignored_{int(r.time)}_{r.index:08d}"
        ok, png = cv2.imencode(".png", r.image)
        try:
            if not ok:
                raise OSError(errno.EINVAL, "OpenCV could not encode the frame as PNG")
            write_whole(stem.with_suffix(".png"), png.tobytes())
            try:
                write_whole(stem.with_suffix(".json"), (dumps(r.record) + "\n").encode("utf-8"))
            except OSError:
                _unlink(stem.with_suffix(".png"))
                raise
        except OSError as e:
            self.failures.failed(f"cannot save a snapshot in {self.folder} ({e.strerror})")
            return
        self.failures.ok()
        self.saved.append(stem)
        self.total += 1
        while len(self.saved) > self.limit:
            old = self.saved.popleft()
            for suffix in (".png", ".json"):
                _unlink(old.with_suffix(suffix))

    def discard(self) -> None:
        remove_empty(self.made)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
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
    """The stats JSON, rewritten at every stats interval and at the end (what `edge-quq health` reads), mode
    0640. A failed write is counted and reported (once, then every few minutes while it lasts), not the end
    of this output: the next interval tries again."""

    name = "stats"

    def __init__(self, path: str, label: str = "", log: Callable[[str], None] = _stderr) -> None:
        self.path = Path(path)
        self.label = label or f"--stats-file {path}"
        self.created = not self.path.exists()
        self.failures = Failures(self.name, log)

    def stats(self, stats: Dict[str, Any]) -> None:
        try:
            atomic_write_json(self.path, stats)
        except OSError as e:
            self.failures.failed(f"cannot write {self.label} ({e.strerror})")
            return
        self.failures.ok()

    def discard(self) -> None:
        if self.created:
            _unlink(self.path)


def atomic_write_json(path: Path, obj: Dict[str, Any], mode: int = STATS_FILE_MODE) -> None:
    """Write, fsync-free but rename-atomic: a reader sees the old or the new file, never half of one."""
    write_whole(path, (dumps(obj) + "\n").encode("utf-8"), mode)
