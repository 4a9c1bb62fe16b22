"""Data the exporter reads: Fashion-MNIST IDX files, CIFAR-100 (python pickle) and CIFAR-100-C (.npy), and
quantization / held-out input given as an image folder or an array file.

Nothing here downloads: the machines this runs on are offline, so every loader reads files that are already
on disk and says which file is missing or malformed.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_quq.bundle import Preprocess
from edge_quq.errors import EdgeQuqError, ExportError
from edge_quq.preprocess import IMAGE_SUFFIXES, preprocess_image, read_image

PathLike = Union[str, Path]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR100_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)


# --- IDX (MNIST family) -------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike) -> np.ndarray:
    """One IDX file (optionally gzipped) as an array of its declared shape."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: no such IDX file (Fashion-MNIST: apt-get install dataset-fashion-mnist)")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ExportError(f"{p}: cannot be read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ExportError(f"{p}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    body = data[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ExportError(f"{p}: IDX body has {len(body)} bytes, header promises {count * dtype.itemsize}; truncated?")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: PathLike = FASHION_MNIST_DIR) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' (60k) or 'test' (10k)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ExportError(f"Fashion-MNIST split {split!r} is not 'train' or 'test'")
    root = Path(root)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        return root / f"{stem}.gz"

    x = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    y = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ExportError(f"{root}: Fashion-MNIST {split} images {x.shape} and labels {y.shape} do not pair up")
    return x, y


# The reference recipe trains on the first 55k Fashion-MNIST training images and validates on the last 5k:
# those 5k are held out from training and are where temperatures are fitted.
FMNIST_VAL = 5000


def fashion_mnist_val(root: PathLike, spec: Preprocess, shape: Sequence[int], limit: Optional[int] = None,
                      seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The reference recipe's validation split (last 5k training images), preprocessed."""
    x, y = load_fashion_mnist("train", root)
    x, y = x[-FMNIST_VAL:], y[-FMNIST_VAL:]
    if limit is not None and limit < len(x):
        keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
        x, y = x[keep], y[keep]
    return preprocess_array(x, shape, spec, "Fashion-MNIST"), y


# --- CIFAR-100 / CIFAR-100-C ----------------------------------------------------------------------------

def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path}: no such CIFAR-100 file (expected the python version: train, test, meta)")
    try:
        with open(path, "rb") as f:
            # The official files were pickled by Python 2; latin1 keeps their byte strings intact.
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ExportError(f"{path}: not a CIFAR-100 pickle ({e})") from None


def _key(d: dict, *names: str):
    for n in names:
        if n in d:
            return d[n]
        if n.encode() in d:
            return d[n.encode()]
    return None


def load_cifar100(root: PathLike, split: str = "train", label_mode: str = "fine") -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """(images uint8 [N, 32, 32, 3] RGB, labels int64 [N], class names) from `cifar-100-python/`.

    The pickles store rows of 3072 bytes: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    """
    if split not in ("train", "test"):
        raise ExportError(f"CIFAR-100 split {split!r} is not 'train' or 'test'")
    if label_mode not in ("fine", "coarse"):
        raise ExportError(f"CIFAR-100 label mode {label_mode!r} is not 'fine' or 'coarse'")
    root = Path(root)
    d = _unpickle(root / split)
    data = _key(d, "data")
    labels = _key(d, f"{label_mode}_labels")
    if data is None or labels is None:
        raise ExportError(f"{root / split}: lacks 'data' or '{label_mode}_labels'")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ExportError(f"{root / split}: data has shape {data.shape}, expected [N, 3072]")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    y = np.asarray(labels, dtype=np.int64)
    meta = _unpickle(root / "meta")
    names = _key(meta, f"{label_mode}_label_names")
    if names is None:
        raise ExportError(f"{root / 'meta'}: lacks '{label_mode}_label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= len(names))):
        raise ExportError(f"{root / split}: {len(x)} images, {len(y)} labels, {len(names)} class names do not fit together")
    return x, y, names


def load_cifar100c(root: PathLike, corruption: str, severity: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) of one CIFAR-100-C corruption.

    Each `<corruption>.npy` stacks the 10k test images at severities 1..5 in that order; `labels.npy` repeats
    the labels accordingly. severity=None returns all of them.
    """
    root = Path(root)
    xp, yp = root / f"{corruption}.npy", root / "labels.npy"
    for p in (xp, yp):
        if not p.is_file():
            raise ExportError(f"{p}: no such CIFAR-100-C file")
    try:
        x = np.load(xp, allow_pickle=False)
        y = np.load(yp, allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as e:
        raise ExportError(f"{xp.parent}: cannot read CIFAR-100-C arrays ({e})") from None
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ExportError(f"{xp}: images {x.shape} / labels {y.shape} are not [N, 32, 32, 3] / [N]")
    x = x.astype(np.uint8, copy=False)
    if severity is None:
        return x, y
    if not 1 <= severity <= 5 or len(x) % 5:
        raise ExportError(f"{xp}: severity {severity} not in 1..5 (or the file does not hold 5 equal blocks)")
    n = len(x) // 5
    sl = slice((severity - 1) * n, severity * n)
    return x[sl], y[sl]


# --- quantization / held-out input -----------------------------------------------------------------------

def list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def preprocess_array(x: np.ndarray, shape: Sequence[int], spec: Preprocess, what: str) -> np.ndarray:
    """Model-ready float32 [N, H, W, C] from an array.

    Integer arrays (uint8, uint16) are raw pixels, RGB if they have 3 channels, and get the manifest's
    preprocessing. Float arrays are taken as already model-ready and must match the input shape exactly:
    guessing whether a float array is 0..1 pixels or normalized input would silently skew the int8 ranges.
    """
    h, w, c = (int(v) for v in shape)
    if x.ndim == 3:
        x = x[..., None] if c == 1 or x.shape[-1] not in (3, 4) else x[None]
    if x.ndim != 4 or len(x) == 0:
        raise ExportError(f"{what}: array has shape {tuple(x.shape)}; expected [N, H, W] or [N, H, W, C] with N >= 1")
    if np.issubdtype(x.dtype, np.floating):
        if tuple(x.shape[1:]) != (h, w, c):
            raise ExportError(f"{what}: float array has shape {tuple(x.shape)}, the model takes [N, {h}, {w}, {c}] "
                              "(give uint8 pixels to have them resized and preprocessed)")
        if not np.all(np.isfinite(x)):
            raise ExportError(f"{what}: float array contains NaN or infinity")
        return x.astype(np.float32)
    if x.dtype not in (np.uint8, np.uint16):
        raise ExportError(f"{what}: array dtype {x.dtype} is not supported (uint8 or uint16 pixels, or float32 model input)")
    if x.shape[-1] not in (1, 3, 4):
        raise ExportError(f"{what}: array has {x.shape[-1]} channels; expected 1, 3 or 4")
    try:
        return np.stack([preprocess_image(img, spec, channel_order="rgb") for img in x]).astype(np.float32)
    except EdgeQuqError as e:
        raise ExportError(f"{what}: {e}") from None


def _load_array_file(path: Path, what: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    try:
        obj = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ExportError(f"{path}: {what} is not a readable .npy/.npz array ({e})") from None
    if isinstance(obj, np.lib.npyio.NpzFile):
        with obj:
            keys = list(obj.files)
            xk = next((k for k in ("x", "images", "x_test", "data") if k in keys), keys[0] if len(keys) == 1 else None)
            if xk is None:
                raise ExportError(f"{path}: {what} .npz has arrays {keys}; name the images 'x' (and labels 'y')")
            yk = next((k for k in ("y", "labels", "y_test") if k in keys), None)
            return obj[xk], (obj[yk] if yk else None)
    return obj, None


def load_inputs(path: PathLike, shape: Sequence[int], spec: Preprocess, what: str = "quantization data",
                limit: Optional[int] = None, seed: int = 0, classes: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(model-ready float32 [N, H, W, C], labels or None) from a folder of images or a .npy/.npz file.

    A folder's images are decoded with OpenCV and preprocessed like the runtime does. When `classes` is given
    and the folder has one sub-folder per class name, the sub-folder gives the label. `limit` keeps a random
    (seeded) subset so that a large quantization set does not slow the converters down for nothing.
    """
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: {what} not found")
    rng = np.random.default_rng(seed)
    labels: Optional[np.ndarray] = None
    if p.is_dir():
        files = list_images(p)
        if not files:
            raise ExportError(f"{p}: {what} folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if limit is not None and len(files) > limit:
            files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
        if classes is not None:
            idx = {c: i for i, c in enumerate(classes)}
            subs = [f.relative_to(p).parts[0] if len(f.relative_to(p).parts) > 1 else None for f in files]
            if all(s in idx for s in subs):
                labels = np.array([idx[s] for s in subs], dtype=np.int64)
        try:
            x = np.stack([preprocess_image(read_image(f), spec) for f in files]).astype(np.float32)
        except EdgeQuqError as e:
            raise ExportError(f"{what}: {e}") from None
        if tuple(x.shape[1:]) != tuple(shape):
            raise ExportError(f"{p}: preprocessed images have shape {x.shape[1:]}, the model takes {tuple(shape)}")
        return x, labels
    if p.suffix.lower() not in (".npy", ".npz"):
        raise ExportError(f"{p}: {what} must be a folder of images or a .npy/.npz array")
    x, labels = _load_array_file(p, what)
    x = np.asarray(x)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(labels) != len(x):
            raise ExportError(f"{p}: {len(x)} images but {len(labels)} labels")
    if limit is not None and len(x) > limit:
        keep = np.sort(rng.choice(len(x), limit, replace=False))
        x = x[keep]
        labels = labels[keep] if labels is not None else None
    return preprocess_array(x, shape, spec, f"{p} ({what})"), labels


def load_labels(path: PathLike, n: int) -> np.ndarray:
    """Integer labels from .npy or a text file with one integer per line."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: labels file not found")
    try:
        y = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as e:
        raise ExportError(f"{p}: labels are not readable integers ({e})") from None
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(y) != n:
        raise ExportError(f"{p}: {len(y)} labels for {n} test images")
    return y


# --- OOD and shift data the exporter can make offline (the gate's validation, docs/decisions.md) ------------

# skimage.data images shipped inside the scikit-image wheel (the others need a download).
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "brick",
                  "grass", "gravel", "horse", "clock", "hubble_deep_field", "immunohistochemistry", "retina",
                  "cat")  # not logo or colorwheel: graphics, not photographs (the gate keeps the colorwheel)


def package_photos() -> Dict[str, List[np.ndarray]]:
    """Real photographs that packages ship, as RGB/gray uint8 arrays, per source; a missing package gives
    no entry (scikit-image, matplotlib and scikit-learn are in the test and export extras)."""
    out: Dict[str, List[np.ndarray]] = {}
    try:
        import skimage.data as skd

        imgs = []
        for name in SKIMAGE_PHOTOS:
            try:
                imgs.append(np.asarray(getattr(skd, name)()))
            except Exception:  # an image that needs a download (no network here) is skipped, not an error
                continue
        out["photos_skimage"] = [i[..., :3] if i.ndim == 3 else i for i in imgs if i.dtype == np.uint8]
    except ImportError:
        pass
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            import matplotlib.image as mpimg

            out["photos_matplotlib"] = [np.asarray(mpimg.imread(f, format="jpg"))]
    except (ImportError, OSError, ValueError):
        pass
    try:
        from sklearn.datasets import load_sample_images

        out["photos_sklearn"] = [np.asarray(i) for i in load_sample_images().images]
    except ImportError:
        pass
    return {k: v for k, v in out.items() if v}


# How a real handwritten digit reaches the model: filling the frame (a camera close to a digit on paper),
# or MNIST's layout (the digit in the 20x20 centre of 28x28, white on black like Fashion-MNIST).
DIGIT_LAYOUTS: Tuple[str, ...] = ("full_frame", "centred")


def real_handwritten_digits(layout: str = "full_frame", size: int = 28) -> Tuple[List[np.ndarray], np.ndarray]:
    """scikit-learn's 1797 real handwritten digits (UCI optdigits' test set: 13 writers, 8x8, 0..16) as uint8 gray
    images, bilinearly upscaled; ([], empty) without scikit-learn."""
    import cv2

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return [], np.zeros(0, np.int64)
    d = load_digits()
    inner = size if layout == "full_frame" else round(size * 20 / 28)
    pad = (size - inner) // 2
    out = []
    for im in d.images:
        canvas = np.zeros((size, size), np.uint8)
        canvas[pad:pad + inner, pad:pad + inner] = cv2.resize((im * (255.0 / 16.0)).astype(np.uint8), (inner, inner),
                                                              interpolation=cv2.INTER_LINEAR)
        out.append(canvas)
    return out, np.asarray(d.target, np.int64)


def photo_patches(photos: Sequence[np.ndarray], count: int, rng: np.random.Generator) -> List[np.ndarray]:
    """The whole photos plus random square crops (side 15-100% of the shorter edge), `count` in all."""
    out = list(photos)
    while len(out) < count:
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.15, 1.0) * min(h, w))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        out.append(np.ascontiguousarray(img[y : y + side, x : x + side]))
    return out[:count]


def synthetic_ood(count: int, rng: np.random.Generator, size: int = 56) -> Dict[str, List[np.ndarray]]:
    """Far-OOD images made from formulas: uniform noise, checkerboards, rings, stripes (uint8 gray)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    sets: Dict[str, List[np.ndarray]] = {"noise": [], "checkerboard": [], "rings": [], "stripes": []}
    for _ in range(count):
        sets["noise"].append(rng.integers(0, 256, (size, size), dtype=np.uint8))
        period = rng.uniform(2, 16)
        board = ((np.floor((yy + rng.uniform(0, period)) / period) + np.floor((xx + rng.uniform(0, period)) / period)) % 2)
        sets["checkerboard"].append((board * rng.uniform(100, 255)).astype(np.uint8))
        cy, cx = rng.uniform(0, size, 2)
        r = np.hypot(yy - cy, xx - cx)
        sets["rings"].append((127.5 * (1 + np.sin(r * rng.uniform(0.3, 2.0)))).astype(np.uint8))
        theta = rng.uniform(0, np.pi)
        sets["stripes"].append((127.5 * (1 + np.sign(np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * rng.uniform(0.3, 2.0))))).astype(np.uint8))
    return sets


def corrupt(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A few corruptions of model-ready images in [0, 1] ([N, H, W, C]): shift data, reported, not required."""
    if kind == "gaussian_noise":
        return np.clip(x + rng.normal(0, 0.25, x.shape), 0, 1).astype(np.float32)
    if kind == "low_contrast":
        return ((x - x.mean(axis=(1, 2, 3), keepdims=True)) * 0.3 + x.mean(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
    if kind == "brightness":
        return np.clip(x + 0.45, 0, 1).astype(np.float32)
    if kind == "invert":
        return (1.0 - x).astype(np.float32)
    raise ExportError(f"unknown corruption {kind!r}")


CORRUPTIONS = ("gaussian_noise", "low_contrast", "brightness", "invert")
