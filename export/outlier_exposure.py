"""Outlier exposure (Hendrycks et al. 2019) for the reference recipe: fine-tune a trained model on its own
training images plus generated outliers with all-zero sigmoid targets, so that no class fires on inputs
that are not clothing.

    python -m edge_quq_export.train --from-model bench/models/reference.keras --outlier-exposure 3 ...

Why: the shipped detectors separate photographs and noise from Fashion-MNIST, but real handwritten digits
land inside the clothing clusters (the bundle ignored 79% of scikit-learn's digits, no detector pair more
than 90%). A model that has seen glyphs and strokes labelled "none of the classes" moves them away.

The outlier pool is built from formulas and fonts only, and shares no generator with any set the suite or
the exporter's gate validation measures on: glyphs come from the TrueType fonts matplotlib ships (the
suite's drawn digits use OpenCV's Hershey fonts, which are left out here), the textures are gradients,
line segments, circle outlines and pen scribbles (the suite's uniform and smooth noise, checkerboards,
and the validation's rings and stripes are left out), and no photograph is used.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

OE_SEED = 7741  # differs from every seed the suite and the exporter draw their sets with
# matplotlib's fonts whose digits and letters render (Display, NonUni, Siz* and the cm symbol fonts draw none)
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-=#%&@?*<>/$"
# Share of the pool: digits, letters and symbols, then textures and scribbles (the rest).
MIX = (0.5, 0.25)
CANVAS = 64  # glyphs are drawn at this scale, then fitted into 28 x 28


def font_paths() -> List[Path]:
    """The pool's TrueType fonts, from matplotlib's data folder (host side: matplotlib is in the export extra)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - the export extra installs it
        raise RuntimeError("outlier exposure draws its glyphs with matplotlib's fonts: pip install matplotlib") from exc
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = [folder / f for f in FONT_FILES if (folder / f).is_file()]
    if not found:
        raise RuntimeError(f"no TrueType fonts found in {folder}")
    return found


def _draw_glyph(ch: str, font: Path, rng: np.random.Generator) -> np.ndarray:
    """ch in white on black, rotated, sheared and sometimes thickened, cropped to its ink (uint8)."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    s = CANVAS
    pil = Image.new("L", (2 * s, 2 * s))
    face = ImageFont.truetype(str(font), int(rng.integers(40, 70)))
    ImageDraw.Draw(pil).text((s // 2, s // 3), ch, fill=255, font=face, stroke_width=int(rng.integers(0, 5)), stroke_fill=255)
    m = cv2.getRotationMatrix2D((s, s), float(rng.uniform(-25, 25)), 1.0)
    m[0, 1] += rng.uniform(-0.3, 0.3)
    img = cv2.warpAffine(np.asarray(pil), m, (2 * s, 2 * s))
    if rng.random() < 0.3:
        k = int(rng.integers(2, 5))
        img = cv2.dilate(img, np.ones((k, k), np.uint8))
    ys, xs = np.nonzero(img > 20)
    if len(ys) == 0:
        return np.zeros((0, 0), np.uint8)
    return img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _place(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fit ink into 28 x 28: filling the frame (often stretched, as a low-resolution scan scaled up is) or in a
    centred box of 16-22 px; then sometimes reduced to 6-12 px and scaled back up, or blurred."""
    import cv2

    full = rng.random() < 0.5
    box = 28 if full else int(rng.integers(16, 23))
    h, w = ink.shape
    if full and rng.random() < 0.7:
        nh, nw = box, int(np.clip(w / h * box * rng.uniform(1.0, 2.0), 6, box))
    else:
        scale = box / max(h, w)
        nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    canvas = np.zeros((28, 28), np.uint8)
    y0 = int(np.clip((28 - nh) // 2 + (0 if full else int(rng.integers(-2, 3))), 0, 28 - nh))
    x0 = int(np.clip((28 - nw) // 2 + int(rng.integers(-2, 3)), 0, 28 - nw))
    canvas[y0:y0 + nh, x0:x0 + nw] = cv2.resize(ink, (nw, nh), interpolation=cv2.INTER_AREA)
    r = rng.random()
    if r < 0.35:
        side = int(rng.integers(6, 13))
        small = cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA)
        canvas = cv2.resize(small, (28, 28), interpolation=cv2.INTER_LINEAR)
    elif r < 0.6:
        canvas = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.5, 1.5)))
    return canvas


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast and, for a fifth, mild sensor noise; uint8."""
    out = img.astype(np.float32) * (rng.uniform(0.6, 1.0) * 255.0 / max(1.0, float(img.max())))
    if rng.random() < 0.2:
        out += rng.normal(0, rng.uniform(2, 15), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _scribble(rng: np.random.Generator) -> np.ndarray:
    """A pen stroke: a smooth random walk drawn with a round pen (handwriting without any alphabet)."""
    import cv2

    n = int(rng.integers(8, 30))
    heading = np.cumsum(rng.normal(0, 0.5, n)) + rng.uniform(0, 2 * np.pi)
    step = rng.uniform(1.0, 3.0)
    pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * step, 0)
    pts -= pts.min(0)
    pts = pts / max(1.0, float(pts.max())) * rng.uniform(12, 24) + rng.uniform(2, 6, 2)
    img = np.zeros((28, 28), np.float32)
    cv2.polylines(img, [np.round(pts * 4).astype(np.int32)], False, 255.0, int(rng.integers(1, 4)), cv2.LINE_AA, shift=2)
    return img


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Gradients, line segments, circle outlines or a scribble."""
    import cv2

    kind = int(rng.integers(4))
    img = np.zeros((28, 28), np.float32)
    if kind == 0:
        yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
        t = rng.uniform(0, np.pi)
        img = (xx * np.cos(t) + yy * np.sin(t)) * rng.uniform(3, 10) + rng.uniform(-100, 100)
    elif kind == 1:
        for _ in range(int(rng.integers(1, 6))):
            p = [int(v) for v in rng.integers(0, 28, 4)]
            cv2.line(img, (p[0], p[1]), (p[2], p[3]), float(rng.uniform(80, 255)), int(rng.integers(1, 4)), cv2.LINE_AA)
    elif kind == 2:
        for _ in range(int(rng.integers(1, 4))):
            c = [int(v) for v in rng.integers(4, 24, 2)]
            cv2.circle(img, (c[0], c[1]), int(rng.integers(3, 12)), float(rng.uniform(80, 255)), int(rng.integers(1, 4)), cv2.LINE_AA)
    else:
        img = _scribble(rng)
    return np.clip(img, 0, 255).astype(np.uint8)


def outlier_pool(n: int, seed: int = OE_SEED) -> np.ndarray:
    """n outlier images, uint8 [n, 28, 28]: digits and letters/symbols in matplotlib's fonts, then textures and
    scribbles (shares in MIX); half are mirrored. Deterministic for a seed and a matplotlib font set."""
    rng = np.random.default_rng([seed, 99])
    fonts = font_paths()
    out = np.empty((n, 28, 28), np.uint8)
    for i in range(n):
        r = rng.random()
        if r < MIX[0] + MIX[1]:
            ch = str(int(rng.integers(10))) if r < MIX[0] else LETTERS[int(rng.integers(len(LETTERS)))]
            ink = _draw_glyph(ch, fonts[int(rng.integers(len(fonts)))], rng)
            img = _finish(_place(ink, rng), rng) if ink.size else _texture(rng)
        else:
            img = _finish(_texture(rng), rng)
        out[i] = img[:, ::-1] if rng.random() < 0.5 else img
    return out


# -- fine-tuning --------------------------------------------------------------------------------------------

OE_PER_BATCH = 24  # outliers per batch of 128 training images (about 1 in 5.3)
ID_BLUR = 0.15  # share of training images blurred too, so that blur itself does not read as "outlier"
LEARNING_RATE = 2e-4


def _blur_some(share: float):
    """A tf.data map: blur each image of a batch with probability `share` (gaussian, sigma 0.5-1.5)."""
    import tensorflow as tf

    def fn(xb, yb):
        sig = tf.random.uniform([], 0.5, 1.5)
        r = tf.range(-3, 4, dtype=tf.float32)
        g = tf.exp(-r ** 2 / (2 * sig ** 2))
        g = g / tf.reduce_sum(g)
        blurred = tf.nn.conv2d(xb, tf.reshape(g[:, None] * g[None, :], [7, 7, 1, 1]), 1, "SAME")
        pick = tf.random.uniform([tf.shape(xb)[0], 1, 1, 1]) < share
        return tf.where(pick, blurred, xb), yb

    return fn


def reseed_layers(model, seed: int) -> None:
    """Give every layer that draws random numbers (Keras' Dropout) a generator state derived from `seed` and
    its position. Why: a layer made without a seed takes one from an unseeded generator when it is built, and
    keras.models.load_model builds the layers before any seed can be set, so the dropout masks of a fine-tune
    of a loaded model differed from run to run. That was the cause of the full-size fine-tune's run-to-run
    spread (docs/export.md); a model built after keras.utils.set_random_seed was never affected."""
    for i, layer in enumerate(model.layers):
        gen = getattr(layer, "seed_generator", None)
        if gen is not None:
            gen.state.assign(np.array([np.random.default_rng([seed, i]).integers(1, 2 ** 31), 0], "uint32"))


def finetune(model, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0, batch_size: int = 128,
             validation: Tuple[np.ndarray, np.ndarray] = None, verbose: int = 2) -> Dict[str, object]:
    """Fine-tune `model` in place: batches of `batch_size` augmented training images (x [N, 28, 28, 1] in
    [0, 1], one-hot y) plus OE_PER_BATCH outliers with all-zero targets, binary cross-entropy, BatchNorm frozen
    (the outliers must not move the in-distribution statistics), Adam with cosine decay from LEARNING_RATE.
    Returns the training record."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from edge_quq_export.train import augmented

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    reseed_layers(model, seed)
    steps = int(np.ceil(len(x) / batch_size))
    t0 = time.perf_counter()
    pool = outlier_pool(steps * OE_PER_BATCH)
    pool_seconds = time.perf_counter() - t0
    oe = tf.data.Dataset.from_tensor_slices((pool[..., None].astype(np.float32) / 255.0,
                                             np.zeros((len(pool), y.shape[1]), np.float32)))
    oe = oe.shuffle(len(pool), seed=seed).repeat().batch(OE_PER_BATCH)
    ind = augmented(x, y, batch_size, seed).map(_blur_some(ID_BLUR))
    data = tf.data.Dataset.zip((ind, oe)).map(lambda a, b: (tf.concat([a[0], b[0]], 0), tf.concat([a[1], b[1]], 0)))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    lr = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, decay_steps=epochs * steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="acc")])
    t0 = time.perf_counter()
    hist = model.fit(data.prefetch(2), validation_data=validation, epochs=epochs, verbose=verbose, shuffle=False)
    seconds = time.perf_counter() - t0
    record = {
        "method": "outlier exposure: all-zero sigmoid targets on generated outliers",
        "outliers": f"edge_quq_export.outlier_exposure.outlier_pool({len(pool)}, seed {OE_SEED}): {int(100 * MIX[0])}% digits, "
                    f"{int(100 * MIX[1])}% letters/symbols in {len(font_paths())} matplotlib fonts, the rest gradients, "
                    "lines, circles, scribbles; none from an evaluation set",
        "epochs": epochs, "batch": f"{batch_size} training images + {OE_PER_BATCH} outliers",
        "training_images_blurred": ID_BLUR, "optimizer": f"Adam, cosine decay from {LEARNING_RATE}",
        "batchnorm": "frozen", "pool_seconds": round(pool_seconds, 1), "train_seconds": round(seconds, 1),
    }
    if validation is not None:
        record["val_accuracy"] = [round(float(v), 4) for v in hist.history["val_acc"]]
    return record
