"""The closed-form sampler: its building blocks exactly, whole heads exactly where the method is exact, and
close to MC dropout (T = 20000) on small random heads within the tolerances stated here and in docs/samplers.md."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from edge_quq.samplers.analytic import (AnalyticSampler, dropout_moments, erf, logit_moments, probit_moments,
                               relu_moments)
from edge_quq.head import HeadWeights
from edge_quq.samplers import make_sampler
from edge_quq.samplers.reference import NumpySampler
from edge_quq.samplers import native as sampler_native
from heads import PARITY_IDS, parity_head, relu_rows


def random_head(f, h, c, rates, activation, seed=0) -> HeadWeights:
    rng = np.random.default_rng(seed)
    return HeadWeights(
        kernels=((rng.normal(size=(f, h)) * np.sqrt(2.0 / f)).astype(np.float32),
                 (rng.normal(size=(h, c)) * np.sqrt(2.0 / h)).astype(np.float32)),
        biases=((rng.normal(size=h) * 0.1).astype(np.float32), (rng.normal(size=c) * 0.1).astype(np.float32)),
        rates=rates,
        activation=activation,
    )


def features(f, seed):
    return (np.maximum(np.random.default_rng(seed).normal(size=f), 0) * 2).astype(np.float32)


def mc(head, x, t, seed=0):
    # The native kernel when built (T = 20000 on a 2048-wide head is 160 MB of masks in numpy).
    if sampler_native.available():
        return sampler_native.NativeSampler(head, seed=seed).sample(x, t)
    return NumpySampler(head, seed=seed).sample(x, t)


def test_erf_matches_math_erf():
    x = np.linspace(-7, 7, 4001)
    assert np.max(np.abs(erf(x) - np.array([math.erf(v) for v in x]))) < 2e-7


def test_dropout_moments_are_exact_by_enumeration():
    m, v, p = np.array([1.5, -0.3]), np.array([0.2, 0.0]), 0.3
    # E and Var of (m + sqrt(v) Z) * B / (1-p), B ~ Bernoulli(1-p), independent.
    mean = m
    second = (1 - p) * (m**2 + v) / (1 - p) ** 2
    got_m, got_v = dropout_moments(m, v, p)
    np.testing.assert_allclose(got_m, mean)
    np.testing.assert_allclose(got_v, second - mean**2, rtol=1e-12)


@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (1.3, 0.5), (-2.0, 4.0), (0.7, 0.0), (-0.7, 0.0)])
def test_relu_moments_match_quadrature(mu, var):
    got_m, got_v = relu_moments(np.array([mu]), np.array([var]))
    if var == 0:
        assert got_m[0] == max(mu, 0) and got_v[0] == 0
        return
    z = np.linspace(-12, 12, 400_001)  # fine trapezoid: the kink at 0 defeats Gauss-Hermite
    dens = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    r = np.maximum(mu + np.sqrt(var) * z, 0)
    dz = z[1] - z[0]  # Riemann sum; the density is ~0 at both ends (np.trapz/trapezoid differ across numpy 1/2)
    m = np.sum(r * dens) * dz
    s = np.sum(r * r * dens) * dz
    assert got_m[0] == pytest.approx(m, abs=1e-5) and got_v[0] == pytest.approx(s - m * m, abs=1e-5)


def test_probit_moments_close_to_gaussian_sigmoid_moments():
    rng = np.random.default_rng(0)
    mu, var = rng.normal(size=30) * 3, rng.random(30) * 9
    z, w = np.polynomial.hermite_e.hermegauss(120)
    s = 1 / (1 + np.exp(-(mu[:, None] + np.sqrt(var)[:, None] * z)))
    m_true = s @ w / np.sqrt(2 * np.pi)
    sd_true = np.sqrt((s * s) @ w / np.sqrt(2 * np.pi) - m_true**2)
    m, v = probit_moments(mu, var)
    # Measured at worst here: 0.012 for the mean (MacKay), 0.005 for the std (Phi(x/1.702) bivariate form).
    assert np.max(np.abs(m - m_true)) < 0.015
    assert np.max(np.abs(np.sqrt(v) - sd_true)) < 0.008
    m0, v0 = probit_moments(mu, np.zeros_like(mu))  # no spread: exactly Phi(lambda mu), variance 0
    assert np.all(v0 == 0) and np.allclose(m0, 1 / (1 + np.exp(-mu)), atol=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "linear"])
def test_exact_without_dropout(activation):
    head = random_head(33, 17, 6, (0.0, 0.0), activation)
    x = features(33, 1)
    m = AnalyticSampler(head).sample(x, 50)
    np.testing.assert_allclose(m.mean, m.deterministic, atol=1e-6)
    assert np.all(m.std < 1e-9)


def test_linear_output_after_a_deterministic_hidden_layer_is_exact():
    # p0 = 0: hidden units fixed; p1 > 0: independent masks, so the logit variance formula is exact.
    head = random_head(16, 12, 4, (0.0, 0.4), "linear", seed=3)
    x = features(16, 2)
    h = np.maximum(x @ head.kernels[0] + head.biases[0], 0).astype(np.float64)
    w1 = head.kernels[1].astype(np.float64)
    want_mean = h @ w1 + head.biases[1]
    want_std = np.sqrt((h * h * 0.4 / 0.6) @ (w1 * w1))
    got = AnalyticSampler(head).sample(x)
    np.testing.assert_allclose(got.mean, want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.std, want_std, rtol=1e-5)
    # And MC agrees within its sampling error.
    sim = NumpySampler(head, seed=0).sample(x, 200_000)
    assert np.all(np.abs(sim.mean - want_mean) < 5 * want_std / np.sqrt(200_000) + 1e-6)
    np.testing.assert_allclose(sim.std, want_std, rtol=0.01)


def test_first_layer_moments_are_exact_by_enumeration():
    # Through one dropout + dense layer (before any nonlinearity) mean and variance are exact.
    head = HeadWeights(kernels=(np.array([[1.0, -2.0], [0.5, 1.0], [2.0, 0.3]], np.float32),),
                       biases=(np.array([0.1, -0.2], np.float32),), rates=(0.3,), activation="linear")
    x = np.array([1.0, -0.5, 2.0], np.float32)
    vals, probs = [], []
    for keep in itertools.product([0, 1], repeat=3):
        k = np.array(keep, np.float32)
        vals.append(head.logits(x[None], [k[None]])[0])
        probs.append(np.prod([0.7 if b else 0.3 for b in keep]))
    vals, probs = np.array(vals, np.float64), np.array(probs)
    mean = probs @ vals
    var = probs @ (vals - mean) ** 2
    mu, v = logit_moments(head, x)
    np.testing.assert_allclose(mu, mean, rtol=1e-6)
    np.testing.assert_allclose(v, var, rtol=1e-5)


# Stated tolerances against MC with T = 20000 (MC standard error ~0.003 here), max over classes and 4 inputs.
# Softmax is the weak case (the covariance between logits, which the method drops, matters to it).
TOL = {"sigmoid": (0.03, 0.03), "softmax": (0.12, 0.12)}


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_close_to_mc_on_a_small_random_head(activation):
    head = random_head(64, 32, 5, (0.2, 0.4), activation, seed=0)
    for s in range(4):
        x = features(64, s)
        a = AnalyticSampler(head).sample(x)
        m = mc(head, x, 20000, seed=s)
        assert np.max(np.abs(a.mean - m.mean)) < TOL[activation][0]
        assert np.max(np.abs(a.std - m.std)) < TOL[activation][1]
        assert a.expected_entropy == pytest.approx(m.expected_entropy, abs=0.15)
        if activation == "softmax":
            assert a.mean.sum() == pytest.approx(1.0)


# Two hidden layers: the hidden units' covariance, which the method drops, enters twice.
PARITY_TOL = {"sigmoid-1hidden": 0.03, "softmax-1hidden": 0.12, "sigmoid-2hidden": 0.08, "softmax-2hidden": 0.08}


@pytest.mark.parametrize("shape", PARITY_IDS)
def test_close_to_mc_on_every_parity_head(shape):
    """Batched closed form against MC (T = 20000) on sigmoid/softmax heads with one and two hidden layers."""
    head = parity_head(shape, f=64)
    x = relu_rows(4, 64, 1)
    a = make_sampler("analytic", head).sample(x, 0)
    m = NumpySampler(head, seed=0).sample(x, 20000)
    assert np.max(np.abs(a.mean - m.mean)) < PARITY_TOL[shape]
    assert np.max(np.abs(a.std - m.std)) < PARITY_TOL[shape]
    np.testing.assert_allclose(a.expected_entropy, m.expected_entropy, atol=0.2)


@pytest.mark.skipif(not sampler_native.available(), reason="MC at T=20000 on F=2048 needs the native kernel")
def test_close_to_mc_on_the_paper_head_shape():
    head = random_head(2048, 300, 100, (0.2, 0.4), "sigmoid", seed=1)
    x = features(2048, 0)
    a = AnalyticSampler(head).sample(x)
    m = mc(head, x, 20000)
    # Many small contributions: the Gaussian assumptions fit better than on the small head.
    assert np.max(np.abs(a.mean - m.mean)) < 0.015
    assert np.max(np.abs(a.std - m.std)) < 0.015


def test_registered_and_ignores_num_iter():
    head = random_head(8, 4, 3, (0.2, 0.4), "sigmoid")
    s = make_sampler("analytic", head)
    assert isinstance(s, AnalyticSampler)
    x = features(8, 0)
    a, b = s.sample(x, 10), s.sample(x, 1000)
    assert np.array_equal(a.mean, b.mean) and a.num_samples == 0
