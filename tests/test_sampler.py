"""The numpy reference sampler: exact expectation on a tiny head, seeds, masks, moments."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_quq.head import HeadWeights, output_activation
from edge_quq.samplers import make_sampler
from edge_quq.samplers.reference import NumpySampler
from edge_quq.scores import entropy as sample_entropy
from edge_quq.errors import OptionError


def tiny_head(activation="sigmoid", f=3, h=2, c=2, rates=(0.3, 0.5), seed=1) -> HeadWeights:
    rng = np.random.default_rng(seed)
    return HeadWeights(
        kernels=(rng.normal(size=(f, h)).astype(np.float32), rng.normal(size=(h, c)).astype(np.float32)),
        biases=(rng.normal(size=h).astype(np.float32) * 0.1, rng.normal(size=c).astype(np.float32) * 0.1),
        rates=rates,
        activation=activation,
    )


def exact_moments(head: HeadWeights, x: np.ndarray):
    """Enumerate every keep mask of a tiny head: the exact MC-dropout mean and std."""
    f, h = head.kernels[0].shape
    p0, p1 = head.rates
    mean = np.zeros(head.num_classes)
    second = np.zeros(head.num_classes)
    for m0 in itertools.product([0, 1], repeat=f):
        for m1 in itertools.product([0, 1], repeat=h):
            w = np.prod([(1 - p0) if k else p0 for k in m0]) * np.prod([(1 - p1) if k else p1 for k in m1])
            out = head.probs(x[None], [np.array([m0], np.float32), np.array([m1], np.float32)])[0].astype(np.float64)
            mean += w * out
            second += w * out**2
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_mc_mean_converges_to_exact_expectation(activation):
    head = tiny_head(activation)
    x = np.array([0.8, -0.4, 1.3], np.float32)
    exact_mean, exact_std = exact_moments(head, x)
    errors = []
    for t in (100, 10_000, 400_000):
        m = NumpySampler(head, seed=3).sample(x, t)
        errors.append(np.max(np.abs(m.mean - exact_mean)))
    # Error shrinks as 1/sqrt(T); at T=400k it is within a few standard errors of zero.
    assert errors[2] < errors[0]
    assert errors[2] < 5 * exact_std.max() / np.sqrt(400_000) + 1e-6
    m = NumpySampler(head, seed=4).sample(x, 400_000)
    assert np.allclose(m.std, exact_std, atol=5e-3)


def test_fixed_seed_reproduces_and_other_seed_differs():
    head = tiny_head(f=16, h=8, c=4)
    x = np.linspace(-1, 1, 16).astype(np.float32)
    a = NumpySampler(head, seed=7).sample(x, 50)
    b = NumpySampler(head, seed=7).sample(x, 50)
    c = NumpySampler(head, seed=8).sample(x, 50)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std)
    assert not np.array_equal(a.mean, c.mean)


def test_deterministic_output_is_eval_mode_head():
    head = tiny_head("softmax", f=5, h=4, c=3)
    x = np.arange(5, dtype=np.float32) / 5
    m = NumpySampler(head, seed=0).sample(x, 10)
    want = output_activation(head.logits(x[None]).astype(np.float64), "softmax")[0]
    assert np.allclose(m.deterministic, want, atol=1e-6)
    assert np.allclose(m.logits, head.logits(x[None])[0], atol=1e-6)
    assert m.num_samples == 10


def test_sample_with_masks_matches_hand_computation():
    head = tiny_head(f=4, h=3, c=2, rates=(0.25, 0.5))
    x = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
    m0 = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    m1 = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    got = NumpySampler(head).sample_with_masks(x, [m0, m1])
    rows = []
    for i in range(2):
        hdn = np.maximum((x * m0[i] / 0.75) @ head.kernels[0] + head.biases[0], 0)
        z = (hdn * m1[i] / 0.5) @ head.kernels[1] + head.biases[1]
        rows.append(1 / (1 + np.exp(-z)))
    rows = np.array(rows)
    assert np.allclose(got.mean, rows.mean(0), atol=1e-6)
    assert np.allclose(got.std, rows.std(0), atol=1e-6)
    assert got.expected_entropy == pytest.approx(sample_entropy(rows, "sigmoid").mean(), rel=1e-5)


def test_zero_rate_blocks_have_no_spread():
    head = tiny_head(rates=(0.0, 0.0))
    m = NumpySampler(head, seed=1).sample(np.ones(3, np.float32), 20)
    assert np.allclose(m.std, 0.0) and np.allclose(m.mean, m.deterministic, atol=1e-6)


def test_unknown_sampler_is_refused():
    with pytest.raises(OptionError, match="not available"):
        make_sampler("gpu", tiny_head())
