"""Image in, model input out, exactly as the bundle's manifest says.

header check (pixel limit) -> decode (any size; gray, BGR or BGRA; 8 or 16 bit; large JPEGs at a reduced
scale) -> optional center crop -> shrink of very large images in their own dtype -> color conversion to
float -> resize -> (pixel * pixel_scale - mean) / std -> the backbone's own input quantization.

Memory stays bounded on a 1 GB board: the pixel count is read from the file's header and refused above
`max_pixels` before anything is decoded, and a large image is shrunk before any float copy is made.
"""
from __future__ import annotations

import errno
import os
import struct
import stat
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from edge_quq.bundle import Preprocess, QuantParams
from edge_quq.defaults import DEFAULT_MAX_PIXELS
from edge_quq.errors import InputError
from edge_quq.imageheader import image_size

# An encoded file larger than this is refused unread (no real photo is near it).
MAX_FILE_BYTES = 256 * 2**20
# Large images are shrunk in their own dtype to this multiple of the model's input before the float copy.
_OVERSAMPLE = 2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")

_U8 = np.dtype(np.uint8)

try:  # the C table look-up for 8-bit frames (Preprocessor); numpy's take, its reference, without the extension
    from edge_quq._headkernel import lut8 as _lut8  # type: ignore[attr-defined]
except ImportError:
    _lut8 = None

_INTERP = {"area": "INTER_AREA", "linear": "INTER_LINEAR", "nearest": "INTER_NEAREST", "cubic": "INTER_CUBIC"}


def _cv2():
    import cv2  # noqa: PLC0415 - heavy import, only when images are touched

    return cv2


def _open_regular(p: Path):
    """The file opened for reading, refusing anything that is not a regular file (a FIFO would block
    forever, a device would stream without end) with the reason named."""
    try:
        fd = os.open(str(p), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise InputError(f"{p}: no such file") from None
        if e.errno == errno.ELOOP:
            raise InputError(f"{p}: symbolic link loop") from None
        if e.errno == errno.EISDIR:
            raise InputError(f"{p}: is a folder, not an image") from None
        raise InputError(f"{p}: cannot be read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise InputError(f"{p}: is a folder, not an image")
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
        raise InputError(f"{p}: not a regular file ({kind})")
    return os.fdopen(fd, "rb")


def read_bytes(path: Union[str, os.PathLike]) -> bytes:
    p = Path(path)
    with _open_regular(p) as f:
        try:
            # Read to the end, not st_size bytes: /proc and FUSE files report size 0 and still have content.
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise InputError(f"{p}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise InputError(f"{p}: empty file")
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{p}: larger than {MAX_FILE_BYTES // 2**20} MB, not read")
    return data


def check_pixels(p: object, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(f"{p}: {width}x{height} image has {width * height / 1e6:.1f} MP, more than the limit of "
                         f"{max_pixels / 1e6:g} MP (--max-pixels)")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_chunks(p: object, data: bytes) -> None:
    """Refuse a PNG whose chunk lengths run past the end of the file. OpenCV 5 allocates a chunk's declared
    length before reading it: a 600-byte file whose IDAT claims 3 GB took 2.8 GB of RSS (tests/test_fuzz.py
    found it). A walk over the chunk headers costs microseconds, even for a large image's IDAT chunks."""
    i = len(PNG_SIGNATURE)
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if length > len(data) - i - 12:
            raise InputError(f"{p}: corrupt or truncated PNG ({kind!r} chunk of {length} bytes at offset {i} runs past the end of the file)")
        if kind == b"IEND":
            return
        i += 12 + length


def read_image(path: Union[str, os.PathLike], max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode an image file unchanged (bit depth and channels kept); BGR(A) order for color.

    The pixel count is read from the header and refused above `max_pixels` before decoding. With
    `min_size` (height, width the caller needs), a JPEG far larger than that is decoded at 1/2, 1/4 or 1/8
    scale by the codec itself, which still leaves at least twice `min_size`.
    """
    p = Path(path)
    data = read_bytes(p)
    size = image_size(data[:1 << 16])
    if size is not None:
        check_pixels(p, size[0], size[1], max_pixels)
    if data[:8] == PNG_SIGNATURE:
        check_png_chunks(p, data)
    cv2 = _cv2()
    flags = cv2.IMREAD_UNCHANGED
    if size is not None and min_size is not None and data[:2] == b"\xff\xd8":
        flags = _reduced_jpeg_flag(cv2, size, min_size)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as e:  # OpenCV's own limits (OPENCV_IO_MAX_IMAGE_PIXELS) for formats not parsed above
        raise InputError(f"{p}: not decodable ({str(e).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise InputError(f"{p}: not a readable image (unknown format or corrupt data)")
    if size is None:
        check_pixels(p, img.shape[1], img.shape[0], max_pixels)
    return img


def _reduced_jpeg_flag(cv2, size: Tuple[int, int], min_size: Tuple[int, int]) -> int:
    w, h = size
    need_h, need_w = (_OVERSAMPLE * v for v in min_size)
    for factor in (8, 4, 2):
        if w // factor >= need_w and h // factor >= need_h:
            return getattr(cv2, f"IMREAD_REDUCED_COLOR_{factor}")
    return cv2.IMREAD_UNCHANGED


def to_pixels(img: np.ndarray, color: str, channel_order: str = "bgr") -> np.ndarray:
    """Float32 pixels on the 0..255 scale in the target color layout, [H, W, C]."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"image has shape {a.shape}; expected HxW, HxWx3 or HxWx4")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"image has empty size {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32)
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / np.float32(257.0)
    elif np.issubdtype(a.dtype, np.floating):
        # Float images are taken to be on 0..1 (OpenCV's and most libraries' convention).
        f = np.clip(a.astype(np.float32), 0.0, 1.0) * np.float32(255.0)
    else:
        raise InputError(f"image dtype {a.dtype} is not supported (uint8, uint16 or float)")
    if f.ndim == 3 and f.shape[2] == 4:
        f = f[:, :, :3]
    if f.ndim == 3 and channel_order == "rgb":
        f = f[:, :, ::-1]
    # f is now gray [H, W] or BGR [H, W, 3]
    cv2 = _cv2()
    if color == "gray":
        if f.ndim == 3:
            f = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_BGR2GRAY)
        return f[:, :, None]
    if f.ndim == 2:
        f = np.repeat(f[:, :, None], 3, axis=2)
    return np.ascontiguousarray(f[:, :, ::-1] if color == "rgb" else f)


def center_crop(f: np.ndarray, fraction: float) -> np.ndarray:
    if fraction >= 1.0:
        return f
    h, w = f.shape[:2]
    side = max(1, int(round(min(h, w) * fraction)))
    top, left = (h - side) // 2, (w - side) // 2
    return f[top : top + side, left : left + side]


def shrink_native(a: np.ndarray, target_hw: Tuple[int, int], interpolation: str) -> np.ndarray:
    """An image at least 4x the target in both sides, area-resized in its own dtype to twice the target: the
    float copy that follows is then a few MB whatever the source size. Smaller images pass unchanged, so
    their result is bit-exact with a plain float pipeline."""
    h, w = a.shape[:2]
    th, tw = target_hw
    if h < 4 * th or w < 4 * tw or a.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        return a
    cv2 = _cv2()
    method = cv2.INTER_AREA if interpolation == "area" else getattr(cv2, _INTERP[interpolation])
    out = cv2.resize(np.ascontiguousarray(a), (_OVERSAMPLE * tw, _OVERSAMPLE * th), interpolation=method)
    return out


def preprocess_image(img: np.ndarray, spec: Preprocess, channel_order: str = "bgr",
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Model-ready float32 [H, W, C] for one decoded image."""
    cv2 = _cv2()
    a = np.asarray(img)
    if a.ndim >= 2:
        check_pixels("image", a.shape[1], a.shape[0], max_pixels)
    h, w = spec.resize
    if a.ndim in (2, 3) and a.shape[0] >= 1 and a.shape[1] >= 1:
        a = shrink_native(center_crop(a, spec.crop_fraction), (h, w), spec.interpolation)
    f = to_pixels(a, spec.color, channel_order)
    if f.shape[0] != h or f.shape[1] != w:
        f = cv2.resize(f, (w, h), interpolation=getattr(cv2, _INTERP[spec.interpolation]))
        if f.ndim == 2:
            f = f[:, :, None]
    return _normalize(f, spec)


class Preprocessor:
    """preprocess_image for one bundle's spec, with what it can work out once kept: 8-bit images that already
    have the model's size after the crop (a camera or dataset at the input size, the default bundle's 28x28
    digits) go through a 256-entry table per output channel. Per pixel, the table holds exactly what
    preprocess_image's float32 arithmetic gives for that value, so the result is bit-identical; everything
    else goes to preprocess_image itself, the reference (tests/test_scores_preprocess.py compares the two)."""

    __slots__ = ("spec", "_hw", "_crop", "_table")

    def __init__(self, spec: Preprocess) -> None:
        self.spec = spec
        self._hw = tuple(spec.resize)
        self._crop = spec.crop_fraction < 1.0
        channels = 1 if spec.color == "gray" else 3
        pixels = np.repeat(np.arange(256, dtype=np.float32)[:, None], channels, axis=1)
        table = _normalize(pixels, spec)
        # [256] for gray (the C look-up, else numpy's take: on one small frame either costs less than cv2.LUT,
        # most of all with caches cold after the backbone), [256, 1, 3] for color (cv2.LUT's layout: the three channels in one call);
        # None when mean/std would broadcast to other than the color's channels (preprocess_image then)
        if table.shape != (256, channels):
            self._table = None
        else:
            self._table = table[:, 0].copy() if channels == 1 else table.reshape(256, 1, 3)

    def __call__(self, img: np.ndarray, channel_order: str = "bgr", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        a = img if type(img) is np.ndarray else np.asarray(img)
        shape = a.shape
        if a.dtype is _U8 and self._table is not None and 2 <= len(shape) <= 3:
            if shape[0] * shape[1] > max_pixels:
                check_pixels("image", shape[1], shape[0], max_pixels)
            if self._crop:
                a = center_crop(a, self.spec.crop_fraction)
                shape = a.shape
            out = self._lookup(a, channel_order) if shape[:2] == self._hw else None
            if out is not None:
                return out
        return preprocess_image(img, self.spec, channel_order, max_pixels)

    def _lookup(self, a: np.ndarray, channel_order: str) -> Optional[np.ndarray]:
        """The table path for an 8-bit image of the model's size; None for what it does not cover (a color
        image for a gray model: cvtColor's float weights; a shape to_pixels refuses)."""
        table = self._table
        bands = 1 if a.ndim == 2 else a.shape[2]
        if table.ndim == 1:
            if bands != 1:
                return None
            if _lut8 is not None:
                out = np.empty((a.shape[0], a.shape[1], 1), np.float32)
                try:
                    _lut8(a, table, out)
                    return out
                except (ValueError, BufferError):  # a strided view: numpy's take below
                    pass
            return table.take(a)[:, :, None] if a.ndim == 2 else table.take(a)
        if bands == 1:
            a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
        elif bands in (3, 4):
            # the model's channel k is image channel order[k] (images are BGR unless channel_order is rgb)
            bgr = [2, 1, 0] if channel_order == "rgb" else [0, 1, 2]
            a = a[:, :, bgr[::-1] if self.spec.color == "rgb" else bgr]
        else:
            return None
        return _cv2().LUT(a, table)


def _normalize(f: np.ndarray, spec: Preprocess) -> np.ndarray:
    """(pixel * pixel_scale - mean) / std in float32, for float32 pixels on the 0..255 scale [..., C]."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return ((f * np.float32(spec.pixel_scale) - mean) / std).astype(np.float32)


def to_layout(batch: np.ndarray, layout: str) -> np.ndarray:
    """A preprocessed batch [N, H, W, C] in the backbone's input layout (manifest input.layout): NHWC unchanged,
    NCHW transposed (PyTorch-made models). The preprocess itself always works on [H, W, C] images."""
    if layout == "NHWC":
        return batch
    if layout == "NCHW":
        return np.ascontiguousarray(np.asarray(batch).transpose(0, 3, 1, 2))
    raise InputError(f"input layout {layout!r} is not NHWC or NCHW")


def min_decode_size(spec: Preprocess) -> Tuple[int, int]:
    """The smallest decoded (height, width) that still covers the model input after the center crop."""
    h, w = spec.resize
    c = min(spec.crop_fraction, 1.0)
    return int(np.ceil(h / c)), int(np.ceil(w / c))


def quantize(x: np.ndarray, q: QuantParams) -> np.ndarray:
    """Real values to the model's input dtype with its own scale and zero point (round half to even)."""
    if q.dtype == "float32":
        return x.astype(np.float32, copy=False)
    info = np.iinfo(np.int8 if q.dtype == "int8" else np.uint8)
    v = np.rint(x / np.float32(q.scale)) + q.zero_point
    return np.clip(v, info.min, info.max).astype(info.dtype)


def dequantize(v: np.ndarray, q: QuantParams) -> np.ndarray:
    if q.dtype == "float32":
        return v.astype(np.float32, copy=False)
    return (v.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)
