"""Scores against hand-computed values; preprocessing of gray/color, 8/16-bit images against the spec."""
from __future__ import annotations

import dataclasses
import math
import re

import cv2
import numpy as np
import pytest

from edge_quq.bundle import Preprocess, QuantParams
from edge_quq.errors import InputError
from edge_quq import preprocess
from edge_quq.preprocess import Preprocessor, dequantize, preprocess_image, quantize, read_image
from edge_quq.scores import compute_scores, energy, entropy


def test_softmax_entropy_and_energy_by_hand():
    p = np.array([0.5, 0.25, 0.25])
    assert entropy(p, "softmax") == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    z = np.array([1.0, 2.0, 3.0])
    assert energy(z, "softmax") == pytest.approx(-math.log(math.e + math.e**2 + math.e**3))


def test_sigmoid_entropy_and_joint_energy_by_hand():
    p = np.array([0.5, 0.9])
    h = -(0.5 * math.log(0.5) * 2) - (0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert entropy(p, "sigmoid") == pytest.approx(h)
    assert energy(np.array([0.0, 2.0]), "sigmoid") == pytest.approx(-(math.log(2) + math.log(1 + math.e**2)))
    # no overflow for huge logits
    assert np.isfinite(energy(np.array([1000.0, -1000.0]), "sigmoid"))


def test_compute_scores_fields_and_mutual_information():
    mean = np.array([0.7, 0.2, 0.1])
    std = np.array([0.1, 0.2, 0.0])
    s = compute_scores(mean, std, np.log(mean), expected_entropy=0.5, activation="softmax")
    assert s["max_prob"] == pytest.approx(0.7)
    assert s["mean_variance"] == pytest.approx((0.01 + 0.04) / 3)
    assert s["mutual_information"] == pytest.approx(entropy(mean, "softmax") - 0.5)
    assert set(s) == {"max_prob", "predictive_entropy", "mutual_information", "mean_variance", "energy"}


def test_scores_are_batched_and_a_sample_is_a_batch_of_one():
    rng = np.random.default_rng(0)
    for act in ("softmax", "sigmoid"):
        z = rng.normal(size=(6, 4))
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) if act == "softmax" else 1.0 / (1.0 + np.exp(-z))
        std, ee = rng.random((6, 4)) * 0.1, rng.random(6) * 0.1
        batch = compute_scores(p, std, z, ee, act, gradient=np.arange(6.0))
        for i in range(6):
            one = compute_scores(p[i], std[i], z[i], ee[i], act, gradient=np.float64(i))
            assert {k: float(v) for k, v in one.items()} == pytest.approx({k: float(v[i]) for k, v in batch.items()})


GRAY = Preprocess(color="gray", resize=(4, 4), interpolation="area", pixel_scale=1 / 255, mean=(0.0,), std=(1.0,))


def test_gray_8bit_identity_size():
    img = (np.arange(16, dtype=np.uint8) * 16).reshape(4, 4)
    x = preprocess_image(img, GRAY)
    assert x.shape == (4, 4, 1) and x.dtype == np.float32
    assert np.allclose(x[..., 0], img / 255.0)


def test_16bit_and_8bit_give_the_same_input():
    img8 = (np.arange(16, dtype=np.uint8) * 16).reshape(4, 4)
    img16 = img8.astype(np.uint16) * 257
    assert np.allclose(preprocess_image(img8, GRAY), preprocess_image(img16, GRAY), atol=1e-6)


def test_color_to_gray_and_channel_order():
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200  # red in BGR
    x_bgr = preprocess_image(bgr, GRAY, "bgr")
    x_rgb = preprocess_image(bgr[..., ::-1].copy(), GRAY, "rgb")
    assert np.allclose(x_bgr, x_rgb)
    assert np.allclose(x_bgr, 0.299 * 200 / 255, atol=2e-3)  # BT.601 luma of pure red


def test_rgb_model_mean_std_and_crop():
    spec = Preprocess(color="rgb", resize=(2, 2), interpolation="nearest", crop_fraction=0.5, pixel_scale=1.0,
                      mean=(10.0, 20.0, 30.0), std=(2.0, 2.0, 2.0))
    img = np.zeros((8, 12, 3), np.uint8)
    img[2:6, 4:8] = (30, 20, 10)  # BGR in the centre square
    x = preprocess_image(img, spec, "bgr")
    assert x.shape == (2, 2, 3)
    assert np.allclose(x[0, 0], [(10 - 10) / 2, (20 - 20) / 2, (30 - 30) / 2])


def test_gray_image_for_rgb_model_is_replicated():
    spec = Preprocess(color="rgb", resize=(3, 3), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x = preprocess_image(np.full((3, 3), 51, np.uint8), spec)
    assert np.allclose(x, 0.2)


_SPECS = [
    Preprocess(color="gray", resize=(8, 8)),
    Preprocess(color="gray", resize=(7, 7), crop_fraction=0.875, pixel_scale=1.0, mean=(127.5,), std=(0.3,)),
    Preprocess(color="rgb", resize=(8, 8), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    Preprocess(color="bgr", resize=(8, 8), pixel_scale=1.0, mean=(0.5,), std=(3.0,)),
    Preprocess(color="rgb", resize=(4, 4), interpolation="linear"),  # every image below needs a resize
    Preprocess(color="gray", resize=(8, 8), mean=(0.1, 0.2, 0.3)),  # broadcasts to 3 channels: no tables
]


def _images(rng):
    for shape in [(8, 8), (8, 8, 1), (8, 8, 3), (8, 8, 4), (9, 8, 3), (8, 9), (8, 8, 2), (16, 16, 3)]:
        yield shape, rng.integers(0, 256, shape, dtype=np.uint8)
    color = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    yield "flipped view", color[::-1, ::-1]
    yield "strided view", rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)[:, ::2]
    yield "uint16", rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    yield "float", rng.random((8, 8))


@pytest.mark.parametrize("spec", _SPECS, ids=lambda s: f"{s.color}-{s.resize[0]}-{len(s.mean)}")
@pytest.mark.parametrize("order", ["bgr", "rgb"])
def test_preprocessor_tables_match_preprocess_image_bit_for_bit(spec, order):
    """Preprocessor (cv2.LUT tables for 8-bit images of the model's size) against preprocess_image, its
    reference: the same array, dtype and layout, or the same error, for every 8-bit value and every layout."""
    prep = Preprocessor(spec)
    assert (prep._table is None) == (len(spec.mean) == 3 and spec.color == "gray")  # the tables are tested
    for name, img in _images(np.random.default_rng(7)):
        try:
            want = preprocess_image(img, spec, order)
        except InputError as e:
            with pytest.raises(InputError, match=re.escape(str(e))):
                prep(img, order)
            continue
        got = prep(img, order)
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous, name
        assert np.array_equal(got, want), name
    all_values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    whole = Preprocessor(dataclasses.replace(spec, resize=(16, 16), crop_fraction=1.0))
    assert np.array_equal(whole(all_values, order), preprocess_image(all_values, whole.spec, order))


@pytest.mark.skipif(preprocess._lut8 is None, reason="the C extension edge_quq._headkernel is not built")
def test_c_lookup_matches_numpy_take():
    """_headkernel.lut8 against its reference, numpy's take: every 8-bit value, and what it refuses."""
    rng = np.random.default_rng(3)
    table = rng.normal(size=256).astype(np.float32)
    src = np.concatenate([np.arange(256, dtype=np.uint8), rng.integers(0, 256, 768, dtype=np.uint8)]).reshape(32, 32)
    out = np.full((32, 32, 1), np.nan, np.float32)
    assert preprocess._lut8(src, table, out) is None
    assert np.array_equal(out[:, :, 0], table.take(src))
    for bad in [(src[:, ::2], table, np.empty((32, 16), np.float32)), (src, table[:255], out),
                (src, table.astype(np.float64), out), (src.astype(np.int16), table, out), (src, table, out[:16])]:
        with pytest.raises((ValueError, BufferError)):
            preprocess._lut8(*bad)


def test_preprocessor_checks_the_pixel_limit_first():
    prep = Preprocessor(Preprocess(color="gray", resize=(8, 8)))
    with pytest.raises(InputError, match="more than the limit"):
        prep(np.zeros((8, 8), np.uint8), "bgr", max_pixels=63)


def test_quantize_roundtrip_and_saturation():
    q = QuantParams("int8", scale=1 / 255, zero_point=-128)
    v = quantize(np.array([0.0, 0.6, 1.0, 2.0, -1.0], np.float32), q)
    assert v.dtype == np.int8 and v.tolist() == [-128, 25, 127, 127, -128]
    assert np.allclose(dequantize(v[:3], q), [0.0, 153 / 255, 255 / 255], atol=1e-6)


def test_read_image_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_image(empty)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(junk)
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.png")
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), np.zeros((5, 7, 3), np.uint16))
    assert read_image(good).dtype == np.uint16
