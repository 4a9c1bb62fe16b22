"""Frame sources addressed by one `--source` string (the jetson-inference URI convention).

    csi://N               Raspberry Pi camera N through Picamera2 (libcamera); Jetson CSI camera N through a
                          GStreamer nvarguscamerasrc pipeline
    v4l2:///dev/videoN    USB/V4L2 camera; also plain `/dev/videoN` or an index `0`
    rtsp://..., http(s)://...   network streams (RTSP, MJPEG over HTTP, HLS) through OpenCV's FFmpeg
    file://PATH or PATH   a video file
    FOLDER or GLOB        image files, in name order
    "... ! appsink"       a raw GStreamer pipeline (needs an OpenCV built with GStreamer)

parse_source() only looks at the string (and the file system for paths); open_source() opens it and raises
EdgeQuqError with one line naming the source when that fails. Every opened source has read() -> BGR uint8
frame or None (end, timeout or error) and close(), is a context manager, and iterates over its frames
until the first None (`with open_source("video.mp4") as src: for img in src: ...`).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union
from urllib.parse import urlsplit

import numpy as np

from edge_quq.errors import EdgeQuqError, InputError, OptionError
from edge_quq.preprocess import IMAGE_SUFFIXES
from edge_quq.redact import redact

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpeg", ".mjpg", ".h264", ".ts", ".mpg", ".mpeg")
NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")
DEFAULT_MAX_DECODE_ERRORS = 100  # undecodable frames a video file may have before the run gives up on it


class DecodeLimitError(EdgeQuqError):
    """A video file has more undecodable frames than --max-decode-errors allows: the run ends with an error."""

    exit_code = 1


@dataclass(frozen=True)
class SourceSpec:
    uri: str  # as the user wrote it
    kind: str  # csi | v4l2 | network | file | images | gstreamer
    target: str  # device path, URL, file path, glob/folder, or pipeline
    index: Optional[int] = None  # csi sensor / v4l2 index
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[float] = None

    @property
    def live(self) -> bool:
        """Live sources are reopened when they stall; files and folders end."""
        return self.kind in ("csi", "v4l2", "network", "gstreamer")


def gstreamer_available() -> bool:
    import cv2  # noqa: PLC0415

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return line.split(":", 1)[1].strip().upper().startswith("YES")
    return False


def parse_source(uri: str, width: Optional[int] = None, height: Optional[int] = None, fps: Optional[float] = None) -> SourceSpec:
    """The kind of source a string names; OptionError for a string that names none."""
    s = uri.strip()
    if not s:
        raise OptionError("--source is empty")
    kw = dict(width=width, height=height, fps=fps)
    if "!" in s:
        # GStreamer's launch syntax links elements with '!'; nothing else a user types here contains one.
        return SourceSpec(uri, "gstreamer", s, **kw)
    if re.fullmatch(r"\d+", s):
        return SourceSpec(uri, "v4l2", f"/dev/video{int(s)}", int(s), **kw)
    if re.fullmatch(r"/dev/video\d+", s):
        return SourceSpec(uri, "v4l2", s, int(s[len("/dev/video"):]), **kw)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", s)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "csi":
            if not re.fullmatch(r"\d+", rest):
                raise OptionError(f"--source {uri}: csi:// wants a camera number, e.g. csi://0")
            return SourceSpec(uri, "csi", rest, int(rest), **kw)
        if scheme == "v4l2":
            dev = rest if rest.startswith("/") else f"/dev/{rest}"
            if re.fullmatch(r"\d+", rest):
                dev = f"/dev/video{rest}"
            mm = re.fullmatch(r"/dev/video(\d+)", dev)
            return SourceSpec(uri, "v4l2", dev, int(mm.group(1)) if mm else None, **kw)
        if scheme in NETWORK_SCHEMES:
            parts = urlsplit(s)
            if not parts.hostname:
                raise OptionError(f"--source {uri}: no host in the URL")
            return SourceSpec(uri, "network", s, **kw)
        if scheme == "file":
            return _path_spec(uri, rest, kw)
        raise OptionError(f"--source {uri}: unsupported scheme {scheme}:// (use csi://, v4l2://, rtsp://, http(s)://, file://, "
                          "a path, a folder or glob of images, or a GStreamer pipeline)")
    return _path_spec(uri, s, kw)


def _path_spec(uri: str, path: str, kw: dict) -> SourceSpec:
    p = Path(os.path.expanduser(path))
    if any(ch in path for ch in "*?["):
        return SourceSpec(uri, "images", str(p), **kw)
    if p.is_dir():
        return SourceSpec(uri, "images", str(p), **kw)
    if not p.exists():
        raise InputError(f"--source {uri}: no such file or folder")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return SourceSpec(uri, "images", str(p), **kw)
    return SourceSpec(uri, "file", str(p), **kw)


# -- opened sources ---------------------------------------------------------------------------------------
class Source:
    spec: SourceSpec
    # Frames per second the source says it delivers (0 when unknown): used for the annotated video file.
    nominal_fps: float = 0.0
    unreadable = 0  # files skipped because they are not readable images (folder sources)
    decode_errors = 0  # frames of a video file skipped because they do not decode (damaged stretches)

    def read(self) -> Optional[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return redact(f"{self.spec.kind} {self.spec.target}")

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            img = self.read()
            if img is None:
                return
            yield img

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CvSource(Source):
    """Anything OpenCV's VideoCapture reads: V4L2, FFmpeg (files, RTSP, HTTP), GStreamer."""

    def __init__(self, spec: SourceSpec, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0,
                 max_decode_errors: int = DEFAULT_MAX_DECODE_ERRORS) -> None:
        import cv2  # noqa: PLC0415

        self.spec = spec
        self.max_decode_errors = max_decode_errors
        self.decode_errors = 0
        self.next_index = 0  # of the next frame of a video file
        params: List[int] = []
        if spec.kind == "network":
            # Without these a frozen IP camera blocks read() for FFmpeg's default 30 s; with them the capture
            # thread gets a failed read and reopens.
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)]
        if spec.kind == "v4l2":
            target, api = (spec.index if spec.index is not None else spec.target), cv2.CAP_V4L2
        elif spec.kind == "gstreamer" or spec.kind == "csi":
            target, api = spec.target, cv2.CAP_GSTREAMER
        else:
            target, api = spec.target, cv2.CAP_FFMPEG
        cap = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            raise InputError(f"--source {redact(spec.uri)}: cannot be opened ({_why_not(spec)})")
        if spec.kind == "v4l2":
            if spec.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, spec.width)
            if spec.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, spec.height)
            if spec.fps:
                cap.set(cv2.CAP_PROP_FPS, spec.fps)
            # Keep the driver's queue short so a slow loop sees recent frames, not a backlog.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.nominal_fps = float(fps) if fps and 0 < fps < 1000 else 0.0
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT) if spec.kind == "file" else 0
        self.frame_count = int(count) if count and 0 < count < 1e9 else 0
        self.cap: Any = cap

    def read(self) -> Optional[np.ndarray]:
        if self.cap is None:
            return None
        ok, frame = self.cap.read()
        if ok and frame is not None and frame.size:
            self.next_index += 1
            return frame
        return self._skip_damage() if self.frame_count else None

    def _skip_damage(self) -> Optional[np.ndarray]:
        """A video file whose read fails before its last frame is damaged there, not ended. FFmpeg stays
        stuck at the damage, so seek past it frame by frame (each seek decodes from the keyframe before it)
        until a frame decodes; every frame skipped counts as a decode error, and more than
        max_decode_errors of them end the run (DecodeLimitError)."""
        import cv2  # noqa: PLC0415

        target = self.next_index
        while target < self.frame_count - 1:
            self.decode_errors += 1
            if self.decode_errors > self.max_decode_errors:
                raise DecodeLimitError(f"--source {redact(self.spec.uri)}: more than {self.max_decode_errors} undecodable frames "
                                       f"(the last at frame {target} of {self.frame_count}); the file is damaged "
                                       "(raise --max-decode-errors to read on)")
            target += 1
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, target)
            ok, frame = self.cap.read()
            if ok and frame is not None and frame.size:
                self.next_index = target + 1
                return frame
        return None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def _why_not(spec: SourceSpec) -> str:
    if spec.kind == "v4l2":
        return f"{spec.target} missing, busy, or not a capture device" if os.path.exists(spec.target) else f"{spec.target} does not exist"
    if spec.kind == "network":
        return "stream unreachable, refused, or in a format FFmpeg cannot read"
    if spec.kind == "file":
        return "not a video FFmpeg can read"
    return "GStreamer could not start the pipeline"


class ImageFolderSource(Source):
    """Image files of a folder or glob, in name order; unreadable files are skipped and counted (the camera
    stats' source_state.unreadable)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        p = Path(spec.target)
        names = sorted(glob.glob(spec.target)) if not p.is_dir() else sorted(str(q) for q in p.iterdir())
        self.files = [f for f in names if Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(f).is_file()]
        if not self.files:
            raise InputError(f"--source {spec.uri}: no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        self.pos = 0
        self.unreadable = 0

    def read(self) -> Optional[np.ndarray]:
        import cv2  # noqa: PLC0415

        while self.pos < len(self.files):
            f = self.files[self.pos]
            self.pos += 1
            img = cv2.imread(f, cv2.IMREAD_COLOR)
            if img is not None and img.size:
                return img
            self.unreadable += 1
        return None


class Picamera2Source(Source):
    """Raspberry Pi camera through Picamera2 (Debian's python3-picamera2; OpenCV cannot read libcamera)."""

    def __init__(self, spec: SourceSpec) -> None:
        from picamera2 import Picamera2  # type: ignore  # noqa: PLC0415

        self.spec = spec
        try:
            cam = Picamera2(spec.index or 0)
            size = (spec.width or 640, spec.height or 480)
            controls = {"FrameRate": float(spec.fps)} if spec.fps else {}
            # libcamera's "RGB888" is B,G,R in memory: what OpenCV calls BGR.
            cfg = cam.create_video_configuration(main={"size": size, "format": "RGB888"}, controls=controls)
            cam.configure(cfg)
            cam.start()
        except Exception as e:  # Picamera2 raises RuntimeError/IndexError/OSError depending on the failure
            raise InputError(f"--source {spec.uri}: Picamera2 cannot open camera {spec.index} ({e})") from None
        self.cam: Any = cam
        self.nominal_fps = float(spec.fps or 30.0)

    def read(self) -> Optional[np.ndarray]:
        try:
            return np.ascontiguousarray(self.cam.capture_array("main"))
        except Exception:
            return None

    def close(self) -> None:
        cam, self.cam = self.cam, None
        if cam is None:
            return
        try:
            cam.stop()
            cam.close()
        except Exception:
            pass


def is_jetson() -> bool:
    if os.path.exists("/etc/nv_tegra_release"):
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="replace").lower()
    except OSError:
        return False


def jetson_csi_pipeline(spec: SourceSpec) -> str:
    w, h, f = spec.width or 1280, spec.height or 720, int(spec.fps or 30)
    return (f"nvarguscamerasrc sensor-id={spec.index or 0} ! video/x-raw(memory:NVMM),width={w},height={h},framerate={f}/1 ! "
            "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")


def check_openable(spec: SourceSpec) -> None:
    """What can be refused before the model loads: a GStreamer string without GStreamer, csi:// on a board
    that has neither Picamera2 nor a Jetson."""
    if spec.kind == "gstreamer" and not gstreamer_available():
        raise OptionError(f"--source {spec.uri!r}: a GStreamer pipeline, but this OpenCV was built without GStreamer "
                          "(cv2.getBuildInformation(): GStreamer NO); use Debian's python3-opencv in a venv made with --system-site-packages")
    if spec.kind == "csi":
        try:
            import picamera2  # type: ignore  # noqa: F401, PLC0415

            return
        except ImportError:
            pass
        if not is_jetson():
            raise OptionError(f"--source {spec.uri}: no Picamera2 here (Raspberry Pi: apt install python3-picamera2 and a venv made "
                              "with --system-site-packages) and not a Jetson (nvarguscamerasrc)")
        if not gstreamer_available():
            raise OptionError(f"--source {spec.uri}: Jetson CSI cameras need an OpenCV built with GStreamer (Debian/JetPack python3-opencv)")


def open_source(spec: Union[str, SourceSpec], open_timeout_s: float = 10.0, read_timeout_s: float = 5.0,
                max_decode_errors: int = DEFAULT_MAX_DECODE_ERRORS, **kw: Any) -> Source:
    """Open a source (a URI, or a parsed spec); keyword arguments are parse_source's width, height, fps."""
    if isinstance(spec, str):
        spec = parse_source(spec, **kw)
    check_openable(spec)
    if spec.kind == "images":
        return ImageFolderSource(spec)
    if spec.kind == "csi":
        try:
            import picamera2  # type: ignore  # noqa: F401, PLC0415

            return Picamera2Source(spec)
        except ImportError:
            pass
        jspec = SourceSpec(spec.uri, "csi", jetson_csi_pipeline(spec), spec.index, spec.width, spec.height, spec.fps)
        return CvSource(jspec)
    return CvSource(spec, open_timeout_s, read_timeout_s, max_decode_errors)
