"""One tester for every registered head sampler (the XNNPACK habit: one test per kernel family).

Every sampler in edge_quq.samplers.SAMPLER_TABLE that can run here goes through the same checks, on a
sigmoid and a softmax head with one and with two hidden layers (tests/heads.py):
- seeded reproducibility, and reseed() restarts the stream;
- a batch [N, F] gives what N single calls give (a sample is a batch of one);
- the eval output (deterministic, logits) is the head's deterministic pass;
- the temperature: probabilities are activation(logits / T), logits stay raw;
- agreement with the numpy reference: the same masks for samplers on the shared stream, caller-given masks
  for samplers that take them, and the closed form's exact temperature folding.
The exported-head samplers (tflite, onnx) run head models converted here from the same weights.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Tuple

import numpy as np
import pytest

from edge_quq.head import HeadWeights
from edge_quq.samplers import BUNDLE_SAMPLERS, SAMPLER_NAMES, make_sampler, sampler_class
from edge_quq.samplers import native
from edge_quq.samplers.base import draw_batch_masks
from edge_quq.samplers.reference import NumpySampler
from heads import PARITY_IDS, parity_head, relu_rows

TOL = 2e-5  # float32 products in another order (C kernel, XNNPACK, MLAS) against the numpy reference
N, T = 4, 24
TEMPERATURE = 2.5


def _applies(name: str, shape: str) -> bool:
    # Combinations a sampler does not handle by design are left out rather than skipped: tests/run.sh turns
    # every skip into a failure. A native kernel that is not built at all still skips (and so fails there).
    if name == "native" and native.available():
        return native.supports(parity_head(shape))
    return True


EVERY_SAMPLER_AND_HEAD = pytest.mark.parametrize(
    "name,shape", [(n, s) for n in SAMPLER_NAMES for s in PARITY_IDS if _applies(n, s)])
# The closed form draws no masks (tests/test_analytic.py compares it with MC).
MASKED_SAMPLER_AND_HEAD = pytest.mark.parametrize(
    "name,shape", [(n, s) for n in SAMPLER_NAMES for s in PARITY_IDS
                   if _applies(n, s) and (sampler_class(n).same_stream or sampler_class(n).takes_masks)])


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(shape id, kind) -> exported head model file for that parity head, converted on first use."""
    cache: Dict[Tuple[str, str], object] = {}
    folder = tmp_path_factory.mktemp("heads")

    def get(shape: str, kind: str):
        if (shape, kind) not in cache:
            head = parity_head(shape)
            path = folder / f"{shape}.{kind}"
            if kind == "onnx":
                pytest.importorskip("onnxruntime")
                onnx = pytest.importorskip("onnx")
                from edge_quq_export.convert import onnx_head

                onnx.save(onnx_head(head), str(path))
            else:
                pytest.importorskip("tensorflow")
                from edge_quq.backends import tflite_available
                from edge_quq_export.convert import tflite_head

                if not tflite_available():
                    pytest.skip("no TFLite interpreter here")
                path.write_bytes(tflite_head(head))
            cache[(shape, kind)] = path
        return cache[(shape, kind)]

    return get


@pytest.fixture
def build(model_files):
    def make(name: str, shape: str, seed=None, temperature: float = 1.0):
        head = parity_head(shape)
        if temperature != 1.0:
            head = replace(head, temperature=temperature)
        if name == "native" and not (native.available() and native.supports(head)):
            pytest.skip("the native kernel is not built here")
        if name in BUNDLE_SAMPLERS:
            return sampler_class(name)(head, seed, path=model_files(shape, name), threads=1)
        return make_sampler(name, head, seed=seed)

    return make


def rows(head: HeadWeights) -> np.ndarray:
    return relu_rows(N, head.feature_size, 11)


def close(a, b, tol=TOL):
    for f in ("mean", "std", "deterministic"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=tol, err_msg=f)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4, err_msg="logits")
    np.testing.assert_allclose(a.expected_entropy, b.expected_entropy, atol=1e-4, err_msg="expected_entropy")


@EVERY_SAMPLER_AND_HEAD
def test_seeded_runs_repeat_and_reseed_restarts(build, name, shape):
    s = build(name, shape, seed=5)
    x = rows(s.head)
    first = s.sample(x, T)
    again = build(name, shape, seed=5).sample(x, T)
    close(first, again, tol=0.0)
    s.reseed(5)
    close(s.sample(x, T), first, tol=0.0)


@EVERY_SAMPLER_AND_HEAD
def test_a_batch_equals_single_samples_in_order(build, name, shape):
    batch_sampler, one_sampler = build(name, shape, seed=7), build(name, shape, seed=7)
    x = rows(batch_sampler.head)
    batch = batch_sampler.sample(x, T)
    assert batch.mean.shape == (N, batch_sampler.head.num_classes) and np.shape(batch.expected_entropy) == (N,)
    for i in range(N):
        one = one_sampler.sample(x[i], T)
        assert one.mean.shape == (batch_sampler.head.num_classes,) and isinstance(one.expected_entropy, float)
        close(batch.row(i), one)


@EVERY_SAMPLER_AND_HEAD
def test_eval_output_is_the_heads_deterministic_pass(build, name, shape):
    s = build(name, shape, seed=0)
    x = rows(s.head)
    m = s.sample(x, T)
    np.testing.assert_allclose(m.deterministic, s.head.probs(x), atol=TOL)
    np.testing.assert_allclose(m.logits, s.head.logits(x), rtol=1e-4, atol=1e-4)


@EVERY_SAMPLER_AND_HEAD
def test_temperature_tempers_probabilities_not_logits(build, name, shape):
    s = build(name, shape, seed=3, temperature=TEMPERATURE)
    x = rows(s.head)
    m = s.sample(x, T)
    raw = replace(s.head, temperature=1.0)
    np.testing.assert_allclose(m.logits, raw.logits(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.deterministic, s.head.probs(x), atol=TOL)
    assert not np.allclose(m.deterministic, raw.probs(x), atol=1e-3)
    if name == "analytic":  # closed form: exactly the head with T folded into its last layer
        k, b = list(raw.kernels), list(raw.biases)
        k[-1], b[-1] = k[-1] / np.float32(TEMPERATURE), b[-1] / np.float32(TEMPERATURE)
        folded = make_sampler("analytic", replace(raw, kernels=tuple(k), biases=tuple(b))).sample(x, 0)
        np.testing.assert_allclose(m.mean, folded.mean, atol=1e-6)
        np.testing.assert_allclose(m.std, folded.std, atol=1e-6)
    else:
        ref = NumpySampler(s.head, seed=3)
        want = ref.sample(x, T) if s.same_stream else ref.sample_with_masks(x, draw_batch_masks(np.random.default_rng(9), s.head, N, T))
        got = m if s.same_stream else s.sample_with_masks(x, draw_batch_masks(np.random.default_rng(9), s.head, N, T))
        close(got, want)


@MASKED_SAMPLER_AND_HEAD
def test_agrees_with_the_reference_on_the_same_masks(build, name, shape):
    s = build(name, shape, seed=21)
    x = rows(s.head)
    if s.same_stream:
        close(s.sample(x, T), NumpySampler(s.head, seed=21).sample(x, T))
    if s.takes_masks:
        masks = draw_batch_masks(np.random.default_rng(4), s.head, N, T)
        close(s.sample_with_masks(x, masks), NumpySampler(s.head).sample_with_masks(x, masks))
        close(s.sample_with_masks(x[1], [None if m is None else m[T:2 * T] for m in masks]),
              NumpySampler(s.head).sample_with_masks(x, masks).row(1))


def test_the_table_lists_every_sampler_and_imports_none_until_asked():
    import subprocess
    import sys

    code = ("import sys, edge_quq.samplers as s; "
            "assert not [m for m in sys.modules if m.startswith('edge_quq.samplers.')], sorted(sys.modules); "
            "print(','.join(s.SAMPLER_CHOICES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "auto,numpy,native,analytic,tflite,onnx"
    for name in SAMPLER_NAMES:
        assert sampler_class(name).name == name
