"""Closed-form head gradients against numerical differentiation of the head."""
from __future__ import annotations

import numpy as np
import pytest

from edge_quq.errors import OptionError
from edge_quq.gradients import GradientSettings, gradient_score, layer_gradient_norms, layer_weights
from edge_quq.head import HIDDEN_ACTIVATIONS, HeadWeights


def head64(activation, f=6, h=5, c=4, seed=0, hidden="relu"):
    rng = np.random.default_rng(seed)
    return HeadWeights(
        kernels=(rng.normal(size=(f, h)), rng.normal(size=(h, c)) * 0.7),
        biases=(rng.normal(size=h) * 0.1, rng.normal(size=c) * 0.1),
        rates=(0.2, 0.4),
        activation=activation,
        hidden=(hidden,),
    )


def _act(a, kind):
    """The hidden activations written out independently of edge_quq.head (GELU through scipy's erf)."""
    from scipy.special import erf

    return {"relu": lambda: np.maximum(a, 0), "hardswish": lambda: a * np.clip(a + 3, 0, 6) / 6,
            "silu": lambda: a / (1 + np.exp(-a)), "gelu": lambda: 0.5 * a * (1 + erf(a / np.sqrt(2)))}[kind]()


def log_probs(head: HeadWeights, x, kernels, biases):
    a = x
    for i, (k, b) in enumerate(zip(kernels, biases)):
        a = a @ k + b
        if i < len(kernels) - 1:
            a = _act(a, head.hidden_activations[i])
    if head.activation == "softmax":
        a = a - a.max()
        return a - np.log(np.exp(a).sum())
    return -np.logaddexp(0.0, -a)  # log sigmoid


def numeric_norms(head, x, eps=1e-6):
    ks = [k.astype(np.float64).copy() for k in head.kernels]
    bs = [b.astype(np.float64).copy() for b in head.biases]
    c = ks[-1].shape[1]
    out = np.zeros((len(ks), c))
    for l in range(len(ks)):
        grads = np.zeros((c, ks[l].size + bs[l].size))
        for j, (arr, idx) in enumerate([(ks[l], i) for i in np.ndindex(ks[l].shape)] + [(bs[l], i) for i in np.ndindex(bs[l].shape)]):
            old = arr[idx]
            arr[idx] = old + eps
            up = log_probs(head, x, ks, bs)
            arr[idx] = old - eps
            down = log_probs(head, x, ks, bs)
            arr[idx] = old
            grads[:, j] = (up - down) / (2 * eps)
        out[l] = np.linalg.norm(grads, axis=1)
    return out


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_matches_numerical_differentiation(activation, seed):
    head = head64(activation, seed=seed)
    x = np.random.default_rng(10 + seed).normal(size=6)
    assert np.allclose(layer_gradient_norms(head, x), numeric_norms(head, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hidden", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_every_hidden_activation_matches_numerical_differentiation(hidden, activation):
    """The closed form uses each activation's own derivative; pre-activations here span the kinks of
    Hardswish (+-3) and the curved parts of SiLU and GELU."""
    for seed in range(3):
        head = head64(activation, seed=seed, hidden=hidden)
        x = np.random.default_rng(20 + seed).normal(size=6) * 2.0
        assert np.allclose(layer_gradient_norms(head, x), numeric_norms(head, x), rtol=1e-5, atol=1e-7), (hidden, seed)


def test_activation_derivatives_match_finite_differences():
    from edge_quq.gradients import activation_derivative
    from edge_quq.head import hidden_activation

    z = np.linspace(-6, 6, 1201) + 1e-3  # off the kinks at 0 and +-3
    for kind in HIDDEN_ACTIVATIONS:
        num = (_act(z + 1e-6, kind) - _act(z - 1e-6, kind)) / 2e-6
        assert np.allclose(activation_derivative(z, kind), num, atol=1e-6), kind
        assert np.allclose(hidden_activation(z, kind), _act(z, kind), atol=1e-6), kind


def test_three_layer_head_matches_numerical():
    rng = np.random.default_rng(5)
    head = HeadWeights(kernels=(rng.normal(size=(4, 6)), rng.normal(size=(6, 5)), rng.normal(size=(5, 3))),
                       biases=(rng.normal(size=6) * 0.1, rng.normal(size=5) * 0.1, rng.normal(size=3) * 0.1),
                       rates=(0.2, 0.2, 0.2), activation="softmax")
    x = rng.normal(size=4)
    assert np.allclose(layer_gradient_norms(head, x), numeric_norms(head, x), rtol=1e-5, atol=1e-7)


def test_layer_weights_grow_with_depth_and_sum_to_one():
    w = layer_weights(3, 2.0)
    assert np.allclose(w, [1 / 7, 2 / 7, 4 / 7])
    assert np.allclose(layer_weights(2, 1.0), [0.5, 0.5])


def test_score_is_positive_reproducible_and_smoothing_is_seeded():
    head = head64("sigmoid")
    x = np.random.default_rng(3).normal(size=6)
    s = gradient_score(head, x)
    assert s > 0
    st = GradientSettings(perturbations=4, noise=0.1, seed=1)
    assert gradient_score(head, x, st) == gradient_score(head, x, st)
    for how in ("prob", "uniform"):
        assert gradient_score(head, x, GradientSettings(class_weighting=how)) > 0


def test_bad_settings_are_refused():
    with pytest.raises(OptionError):
        GradientSettings(class_weighting="max").validate()
    with pytest.raises(OptionError):
        GradientSettings(layer_base=0).validate()


@pytest.mark.parametrize("hidden", ["hardswish", "silu", "gelu"])
def test_every_detector_fits_and_scores_on_a_non_relu_head(hidden):
    """All detectors, gradient and ReAct included, on a head with another hidden activation: finite scores, the
    gradient detector equal to gradient_scores (which the closed-form test above checks), and ReAct's clip
    acting on the head's input features only (features below the clip score as the plain energy)."""
    from edge_quq.detectors import DETECTOR_NAMES, fit_detectors
    from edge_quq.gradients import gradient_scores
    from edge_quq.scores import energy

    rng = np.random.default_rng(4)
    head = head64("softmax", f=8, h=12, c=4, seed=1, hidden=hidden)
    feats = np.abs(rng.normal(size=(400, 8))).astype(np.float32)
    labels = np.argmax(head.logits(feats), axis=1)
    dset = fit_detectors(feats, labels, head, DETECTOR_NAMES, seed=0)
    test = np.abs(rng.normal(size=(50, 8))).astype(np.float32)
    scores = dset.score_all(test, head)
    assert set(scores) == set(DETECTOR_NAMES) and all(np.all(np.isfinite(s)) for s in scores.values())
    np.testing.assert_allclose(scores["gradient"], gradient_scores(head, test, GradientSettings(perturbations=0)), rtol=1e-3)
    clip = float(dset.detectors["react"].arrays["clip"][0])
    small = test[np.all(test <= clip, axis=1)]
    assert len(small) >= 5
    np.testing.assert_allclose(dset.detectors["react"].score(small, head),
                               energy(head.logits(small).astype(np.float64), "softmax"), rtol=1e-5)
