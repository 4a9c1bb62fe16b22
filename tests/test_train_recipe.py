"""The reference recipe's augmentation (python -m edge_quq_export.train --augment): each image stays with its
label and becomes a flipped and/or shifted copy of itself."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _is_jittered_copy(img: np.ndarray, src: np.ndarray, shift: int) -> bool:
    for cand in (src, src[:, ::-1]):
        pad = np.pad(cand, shift)  # zero padding, as the pipeline pads
        h, w = src.shape
        if any(np.array_equal(pad[dy:dy + h, dx:dx + w], img) for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)):
            return True
    return False


def test_augmented_batches_are_flipped_or_shifted_copies_with_their_labels():
    from edge_quq_export.train import SHIFT_PX, augmented

    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, (12, 28, 28, 1)).astype(np.float32)  # no zero pixels, so padding is visible
    y = np.eye(12, dtype=np.float32)  # one label per image: the label names its source
    seen, moved = 0, 0
    for xb, yb in augmented(x, y, batch_size=5, seed=0):
        xb, yb = xb.numpy(), yb.numpy()
        assert xb.shape[1:] == (28, 28, 1) and len(xb) == len(yb) <= 5
        for img, lab in zip(xb, yb):
            src = x[int(np.argmax(lab))][..., 0]
            assert _is_jittered_copy(img[..., 0], src, SHIFT_PX)
            moved += not np.array_equal(img[..., 0], src)
            seen += 1
    assert seen == 12 and moved > 0
