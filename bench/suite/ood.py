"""Far-OOD image sets built offline (uint8 [N, H, W], grayscale), seeded.

No MNIST digits ship in Debian (`apt-cache search mnist` finds only dataset-fashion-mnist) and nothing can
be downloaded, so the digit set is drawn: digits 0-9 in OpenCV's Hershey fonts at random size, stroke and
offset, rendered at 2x and area-downsampled like MNIST's anti-aliased strokes. It is the classic
Fashion-MNIST far-OOD pairing (MNIST) as close as offline allows. Noise and textures test the other end:
inputs with no object at all.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import cv2
import numpy as np


def drawn_digits(n: int, rng: np.random.Generator, h: int = 28, w: int = 28) -> Tuple[np.ndarray, np.ndarray]:
    """(images [n, h, w] uint8, the digit drawn in each [n]); `digits` is the same set without the labels."""
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
             cv2.FONT_HERSHEY_SCRIPT_SIMPLEX]
    out = np.zeros((n, h, w), np.uint8)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        img = np.zeros((2 * h, 2 * w), np.uint8)
        labels[i] = int(rng.integers(10))
        d = str(labels[i])
        font = fonts[int(rng.integers(len(fonts)))]
        scale = float(rng.uniform(1.3, 1.9)) * h / 28
        thick = int(rng.integers(3, 7))
        (tw, th), _ = cv2.getTextSize(d, font, scale, thick)
        x = int((2 * w - tw) / 2 + rng.integers(-4, 5))
        y = int((2 * h + th) / 2 + rng.integers(-4, 5))
        cv2.putText(img, d, (x, y), font, scale, 255, thick, cv2.LINE_AA)
        out[i] = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return out, labels


def digits(n: int, rng: np.random.Generator, h: int = 28, w: int = 28) -> np.ndarray:
    return drawn_digits(n, rng, h, w)[0]


def uniform_noise(n: int, rng: np.random.Generator, h: int = 28, w: int = 28) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8)


def smooth_noise(n: int, rng: np.random.Generator, h: int = 28, w: int = 28) -> np.ndarray:
    low = rng.uniform(0, 255, (n, max(2, h // 4), max(2, w // 4))).astype(np.float32)
    return np.stack([cv2.resize(a, (w, h), interpolation=cv2.INTER_CUBIC) for a in low]).clip(0, 255).astype(np.uint8)


def checkerboards(n: int, rng: np.random.Generator, h: int = 28, w: int = 28) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((n, h, w), np.uint8)
    for i in range(n):
        p = int(rng.integers(2, 8))
        ox, oy = rng.integers(0, p, 2)
        lo, hi = sorted(int(v) for v in rng.integers(0, 256, 2))
        out[i] = np.where((((xx + ox) // p) + ((yy + oy) // p)) % 2 == 0, hi, lo)
    return out


FAR_OOD: Dict[str, Callable[..., np.ndarray]] = {
    "digits (Hershey fonts)": digits,
    "uniform noise": uniform_noise,
    "smooth noise": smooth_noise,
    "checkerboards": checkerboards,
}


def far_ood_rng(name: str, seed: int) -> np.random.Generator:
    """The generator far_ood_sets draws the set `name` with (so a set can be drawn again on its own)."""
    return np.random.default_rng([seed, 1000 + list(FAR_OOD).index(name)])


def far_ood_sets(n: int, seed: int, h: int = 28, w: int = 28, channels: int = 1) -> Dict[str, np.ndarray]:
    out = {}
    for name, fn in FAR_OOD.items():
        x = fn(n, far_ood_rng(name, seed), h, w)
        out[name] = np.repeat(x[..., None], channels, axis=-1) if channels > 1 else x
    return out


# --- real photographs that packages ship -----------------------------------------------------------------------

# scikit-image's photographs and micrographs (its synthetic images, logo and binary shapes are left out)
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "moon",
                  "page", "text", "coins", "clock", "grass", "gravel", "brick", "retina", "cat", "microaneurysms", "cell")
PATCH = 64  # side of the stored patches; the bundle's own preprocessing then resizes them to its input


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (img * 255 if img.max() <= 1.0 else img).clip(0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3]


def photo_sources() -> Dict[str, list]:
    """Set name -> list of RGB uint8 photographs, for each package that is installed."""
    out: Dict[str, list] = {}
    try:
        import skimage.data as sd

        imgs = []
        for name in SKIMAGE_PHOTOS:
            try:
                imgs.append(_rgb(getattr(sd, name)()))
            except Exception:  # noqa: BLE001 - an image that needs a download (pooch) is skipped offline
                pass
        if imgs:
            out["photos (skimage.data)"] = imgs
    except ImportError:
        pass
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
        out["photo (matplotlib grace_hopper.jpg)"] = [img[..., ::-1].copy()]
    except (ImportError, OSError, TypeError):
        pass
    try:
        from sklearn.datasets import load_sample_images

        out["photos (sklearn sample images)"] = [_rgb(i) for i in load_sample_images().images]
    except ImportError:
        pass
    return out


def patches(images: list, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random square crops (side 1/8 to all of the shorter edge, random place, random mirror) as
    [n, PATCH, PATCH, 3] uint8 RGB, area-resized."""
    out = np.empty((n, PATCH, PATCH, 3), np.uint8)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        h, w = img.shape[:2]
        side = int(rng.integers(max(8, min(h, w) // 8), min(h, w) + 1))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y0:y0 + side, x0:x0 + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = cv2.resize(np.ascontiguousarray(crop), (PATCH, PATCH), interpolation=cv2.INTER_AREA)
    return out


def photo_sets(n: int, seed: int) -> Dict[str, np.ndarray]:
    return {name: patches(imgs, n, np.random.default_rng([seed, 2000 + i])) for i, (name, imgs) in enumerate(photo_sources().items())}


def handwritten_sets(h: int = 28, w: int = 28, channels: int = 1) -> Dict[str, np.ndarray]:
    """scikit-learn's 1797 real handwritten digits (13 writers, 8x8 upscaled), filling the frame and in MNIST's
    centred 20-px layout; {} without scikit-learn. Fixed sets: no seed, every image is used."""
    from edge_quq_export.datasets import DIGIT_LAYOUTS, real_handwritten_digits

    out = {}
    for layout in DIGIT_LAYOUTS:
        imgs, _ = real_handwritten_digits(layout, max(h, w))
        if not imgs:
            return {}
        x = np.stack([cv2.resize(i, (w, h), interpolation=cv2.INTER_AREA) if i.shape != (h, w) else i for i in imgs])
        out[f"real handwritten digits ({layout.replace('_', ' ')})"] = np.repeat(x[..., None], channels, -1) if channels > 1 else x
    return out

