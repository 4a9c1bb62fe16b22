"""Real in-distribution data for the gate/risk/drift tests: the embedded default bundle's features of
Fashion-MNIST test images (never used to fit the bundle), with detector scores and head confidences."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")
NUM_IMAGES = 4000  # ~2 s of backbone time on this machine


@lru_cache(maxsize=1)
def _predictor():
    from edge_quq.predictor import Predictor

    return Predictor.from_bundle(backend="onnx", seed=0)


def features_of(images: np.ndarray) -> np.ndarray:
    """Backbone features [N, F] of uint8 images [N, 28, 28] through the default bundle."""
    pred = _predictor()
    return pred.features(np.stack([pred.load_input(im) for im in images]))


def detector_scores(feats: np.ndarray, name: str) -> np.ndarray:
    pred = _predictor()
    return pred.detectors.score_all(feats, pred.head)[name]


@lru_cache(maxsize=1)
def test_images() -> np.ndarray:
    from edge_quq_export.datasets import load_fashion_mnist

    return load_fashion_mnist("test")[0]


@lru_cache(maxsize=1)
def _real() -> Dict[str, np.ndarray]:
    from edge_quq_export.datasets import load_fashion_mnist

    pred = _predictor()
    x, y = load_fashion_mnist("test")
    feats = features_of(x[:NUM_IMAGES])
    # Eval-mode max probability (dropout off): a cheap stand-in for the MC mean in these tests.
    probs = pred.head.probs(feats)
    out = {"features": feats, "labels": y[:NUM_IMAGES], "confidence": probs.max(axis=1),
           "correct": probs.argmax(axis=1) == y[:NUM_IMAGES]}
    for name, s in pred.detectors.score_all(feats, pred.head).items():
        out["score_" + name] = s
    return out


def real_id_data() -> Dict[str, np.ndarray]:
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")
    return _real()


def real_images() -> np.ndarray:
    """All 10 000 Fashion-MNIST test images (the first NUM_IMAGES are real_id_data's)."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")
    return test_images()
