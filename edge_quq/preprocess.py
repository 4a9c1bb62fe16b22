"""Image in, model input out, exactly as the bundle's manifest says.

decode (any size; gray, BGR or BGRA; 8 or 16 bit) -> color conversion -> optional center crop -> resize ->
(pixel * pixel_scale - mean) / std -> the backbone's own input quantization.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from edge_quq.bundle import Preprocess, QuantParams
from edge_quq.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")

_INTERP = {"area": "INTER_AREA", "linear": "INTER_LINEAR", "nearest": "INTER_NEAREST", "cubic": "INTER_CUBIC"}


def _cv2():
    import cv2  # noqa: PLC0415 - heavy import, only when images are touched

    return cv2


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Decode an image file unchanged (bit depth and channels kept); BGR(A) order for color."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an image")
    try:
        data = np.fromfile(str(p), dtype=np.uint8)
    except OSError as e:
        raise InputError(f"{p}: cannot be read ({e.strerror or e})") from None
    if data.size == 0:
        raise InputError(f"{p}: empty file")
    img = _cv2().imdecode(data, _cv2().IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InputError(f"{p}: not a readable image (unknown format or corrupt data)")
    return img


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


def preprocess_image(img: np.ndarray, spec: Preprocess, channel_order: str = "bgr") -> np.ndarray:
    """Model-ready float32 [H, W, C] for one decoded image."""
    cv2 = _cv2()
    f = center_crop(to_pixels(img, spec.color, channel_order), spec.crop_fraction)
    h, w = spec.resize
    if f.shape[0] != h or f.shape[1] != w:
        f = cv2.resize(f, (w, h), interpolation=getattr(cv2, _INTERP[spec.interpolation]))
        if f.ndim == 2:
            f = f[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return ((f * np.float32(spec.pixel_scale) - mean) / std).astype(np.float32)


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
