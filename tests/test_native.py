"""The native head kernel against the numpy reference: same masks -> same outputs, for every kernel variant
this CPU has and the plain C path; own PRNG -> same statistics; fixed seed -> same numbers."""
from __future__ import annotations

import itertools
import threading
from typing import Optional, Tuple

import numpy as np
import pytest

from edge_quq.errors import OptionError
from edge_quq.head import HeadWeights
from edge_quq.samplers import make_sampler
from edge_quq.samplers.reference import NumpySampler
from edge_quq.samplers import native as sampler_native
from edge_quq.samplers.native import NativeSampler
from heads import int8_tolerance

pytestmark = pytest.mark.skipif(not sampler_native.available(), reason="edge_quq._headkernel not built (python setup.py build_ext --inplace)")

ISAS = sampler_native.kernel_isas() or ("scalar",)
# Float32 variants match numpy to float32 rounding; the int8 ones (first layer quantised) to int8_tolerance.
FLOAT_ISAS = tuple(i for i in ISAS if not sampler_native.kernel_is_int8(i))
INT8_ISAS = tuple(i for i in ISAS if sampler_native.kernel_is_int8(i)) + ("scalar_i8",)


def random_head(f: int, h: int, c: int, rates: Tuple[float, float], activation: str, seed: int = 0) -> HeadWeights:
    rng = np.random.default_rng(seed)
    # He-style scaling keeps logits O(1) at every size, so one tolerance fits all shapes.
    return HeadWeights(
        kernels=((rng.normal(size=(f, h)) * np.sqrt(2.0 / f)).astype(np.float32),
                 (rng.normal(size=(h, c)) * np.sqrt(2.0 / h)).astype(np.float32)),
        biases=((rng.normal(size=h) * 0.1).astype(np.float32), (rng.normal(size=c) * 0.1).astype(np.float32)),
        rates=rates,
        activation=activation,
    )


def relu_features(f: int, seed: int) -> np.ndarray:
    # Backbone features after ReLU/pooling: non-negative, some exactly zero (the kernel skips those rows).
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=f), 0.0).astype(np.float32) * 2


def keep_masks(rng: np.random.Generator, t: int, f: int, h: int, rates) -> list:
    out = []
    for n, p in ((f, rates[0]), (h, rates[1])):
        # Rate 0: an all-ones mask (the reference ignores masks of rate-0 blocks; None would leave T unknown).
        out.append(np.ones((t, n), np.float32) if p == 0 else (rng.random((t, n)) >= p).astype(np.float32))
    return out


FS = (1, 3, 7, 16, 33, 128, 1280, 2048)
HS = (1, 5, 17, 64, 300)
CS = (1, 2, 10, 100)
TS = (1, 7, 64, 65, 130)
RATES = ((0.0, 0.0), (0.2, 0.4), (0.5, 0.5), (0.7, 0.1), (0.0, 0.6), (0.3, 0.0))


def cases():
    # A deterministic spread of (F, H, C, T, rates): every F, cycling through the other axes.
    for i, f in enumerate(FS):
        yield f, HS[i % len(HS)], CS[i % len(CS)], TS[i % len(TS)], RATES[i % len(RATES)]
        yield f, HS[(i + 2) % len(HS)], CS[(i + 1) % len(CS)], TS[(i + 3) % len(TS)], RATES[(i + 3) % len(RATES)]


CASES = list(cases())


@pytest.mark.parametrize("isa", FLOAT_ISAS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "linear"])
@pytest.mark.parametrize("f,h,c,t,rates", CASES, ids=[f"F{f}-H{h}-C{c}-T{t}-p{r[0]}_{r[1]}" for f, h, c, t, r in CASES])
def test_same_masks_same_outputs_as_numpy(isa, activation, f, h, c, t, rates):
    head = random_head(f, h, c, rates, activation, seed=f + h + c)
    x = relu_features(f, seed=t)
    masks = keep_masks(np.random.default_rng(f * 31 + t), t, f, h, rates)
    ref = NumpySampler(head).sample_with_masks(x, masks)
    ref_probs = head.probs(np.broadcast_to(x, (t, f)), masks)
    got, probs = NativeSampler(head, isa=isa).sample_with_masks(x, masks, return_probs=True)
    # Tolerance: float32 sums reordered (dense minus dropped rows, FMA or not) differ from BLAS by a few ulps of
    # the pre-activation magnitudes (O(1) here); 2e-5 absolute on outputs in [0, 1] (logits for linear).
    np.testing.assert_allclose(probs, ref_probs, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got.mean, ref.mean, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got.std, ref.std, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got.logits, ref.logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got.deterministic, ref.deterministic, atol=2e-5, rtol=1e-5)
    assert got.expected_entropy == pytest.approx(ref.expected_entropy, rel=1e-4, abs=1e-5)
    assert got.num_samples == t


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "linear"])
@pytest.mark.parametrize("f,h,c,t,rates", CASES, ids=[f"F{f}-H{h}-C{c}-T{t}-p{r[0]}_{r[1]}" for f, h, c, t, r in CASES])
def test_int8_variants_match_numpy_within_the_int8_tolerance(isa, activation, f, h, c, t, rates):
    head = random_head(f, h, c, rates, activation, seed=f + h + c)
    rng = np.random.default_rng(f * 31 + t)
    masks = keep_masks(rng, t, f, h, rates)
    ref_masks = NumpySampler(head)
    for x in (relu_features(f, seed=t), rng.normal(size=f).astype(np.float32)):  # sparse ReLU and signed features
        ref = ref_masks.sample_with_masks(x, masks)
        got = NativeSampler(head, isa=isa).sample_with_masks(x, masks)
        tol_mean, tol_std = int8_tolerance(ref.mean, activation)
        np.testing.assert_allclose(got.mean, ref.mean, atol=tol_mean, rtol=0)
        np.testing.assert_allclose(got.std, ref.std, atol=tol_std, rtol=0)
        # The eval-mode pass stays float32: the deterministic outputs are the float kernels'.
        np.testing.assert_allclose(got.logits, ref.logits, atol=2e-5, rtol=1e-5)


def test_int8_reference_keeps_the_float_decisions():
    from edge_quq.decision import decide_many

    agree = []
    for i in range(48):
        act = ("sigmoid", "softmax")[i % 2]
        head = random_head(256, 64, 10, (0.2, 0.4), act, seed=i)
        x = relu_features(256, seed=100 + i)
        masks = keep_masks(np.random.default_rng(i), 50, 256, 64, (0.2, 0.4))
        a = NativeSampler(head, isa="scalar_i8").sample_with_masks(x, masks)
        b = NumpySampler(head).sample_with_masks(x, masks)
        da, db = (decide_many(m.mean[None], m.std[None], 0.8, 0.5) for m in (a, b))
        agree.append(bool(da.keep[0]) == bool(db.keep[0]))
    assert np.mean(agree) >= 0.95, np.mean(agree)


CONFORMANCE = CASES + [(2048, 300, 100, 50, (0.2, 0.4)), (1280, 300, 1000, 50, (0.2, 0.4)), (64, 300, 10, 50, (0.2, 0.4))]


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"] or ["scalar"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("f,h,c,t,rates", CONFORMANCE, ids=[f"F{f}-H{h}-C{c}-T{t}" for f, h, c, t, _ in CONFORMANCE])
def test_every_variant_matches_the_plain_c_path(isa, activation, f, h, c, t, rates):
    # The conformance test of the kernel variants: same masks, the plain C path as reference (scalar_i8 for the
    # int8 ones, whose integer sums are exact). Tolerance 5e-6 on outputs in [0, 1]: the variants add the same
    # rows in the same order and differ only by FMA rounding and, for avx2_fma, the 8-wide exp/log polynomials.
    plain = "scalar_i8" if sampler_native.kernel_is_int8(isa) else "scalar"
    head = random_head(f, h, c, rates, activation, seed=5 + f)
    x = relu_features(f, seed=5)
    masks = keep_masks(np.random.default_rng(9), t, f, h, rates)
    m_isa, p_isa = NativeSampler(head, isa=isa).sample_with_masks(x, masks, return_probs=True)
    m_ref, p_ref = NativeSampler(head, isa=plain).sample_with_masks(x, masks, return_probs=True)
    np.testing.assert_allclose(p_isa, p_ref, atol=5e-6)
    assert m_isa.expected_entropy == pytest.approx(m_ref.expected_entropy, rel=1e-5, abs=1e-6)
    # Same seed, same generator in every variant: the same masks, so the same moments up to rounding.
    a = NativeSampler(head, seed=3, isa=isa).sample(x, 50)
    b = NativeSampler(head, seed=3, isa=plain).sample(x, 50)
    np.testing.assert_allclose(a.mean, b.mean, atol=5e-6)
    np.testing.assert_allclose(a.std, b.std, atol=5e-6)


def test_zero_features_and_zero_rates_edge_cases():
    head = random_head(16, 8, 3, (0.2, 0.4), "softmax")
    zero = np.zeros(16, np.float32)  # every row skipped: only biases reach the output
    m = NativeSampler(head, seed=0).sample(zero, 100)
    ref = NumpySampler(head, seed=0).sample(zero, 100)
    np.testing.assert_allclose(m.deterministic, ref.deterministic, atol=1e-6)
    assert m.mean.sum() == pytest.approx(1.0, abs=1e-6)
    no_dropout = random_head(16, 8, 3, (0.0, 0.0), "sigmoid")
    m = NativeSampler(no_dropout, seed=0).sample(relu_features(16, 1), 37)
    assert np.all(m.std < 1e-7) and np.allclose(m.mean, m.deterministic, atol=1e-6)


def test_bernoulli_masks_have_the_requested_rate_per_lane():
    from edge_quq import _headkernel

    n = 20000
    for p in (0.1, 0.2, 1 / 3, 0.4, 0.5, 0.9):
        words = np.frombuffer(_headkernel.bernoulli_bits(p, 7, n), np.uint64)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(n, 64).astype(np.float64)
        se = np.sqrt(p * (1 - p) / n)
        assert abs(bits.mean() - p) < 5 * se / 8  # 64 lanes pooled
        assert np.all(np.abs(bits.mean(axis=0) - p) < 5 * se)
        # Lanes and consecutive words independent: correlations at the noise level.
        assert abs(np.corrcoef(bits[:, 0], bits[:, 1])[0, 1]) < 5 / np.sqrt(n)
        assert abs(np.corrcoef(bits[:-1, 5], bits[1:, 5])[0, 1]) < 5 / np.sqrt(n)
    assert not any(_headkernel.bernoulli_bits(0.0, 1, 100))


def _reference_bernoulli_words(p: float, seed: int, n: int) -> list:
    """The kernel's mask stream written from its definition (headkernel.h): xoshiro256** seeded by splitmix64;
    a lane is dropped when its 32-bit uniform, read most significant bit first with bit k of lane t being bit t
    of the k-th word drawn, is below floor(p * 2^32); words are drawn only while some lane is undecided."""
    m64 = (1 << 64) - 1

    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & m64

    st, s = seed, []
    for _ in range(4):
        st = (st + 0x9E3779B97F4A7C15) & m64
        z = ((st ^ (st >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        s.append(z ^ (z >> 31))

    def nxt():
        out = (rotl((s[1] * 5) & m64, 7) * 9) & m64
        t = (s[1] << 17) & m64
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t  # noqa: E702
        s[3] = rotl(s[3], 45)
        return out

    thr = min(int(np.floor(p * 2.0 ** 32)), 2 ** 32 - 1)
    words = []
    for _ in range(n):
        undecided, drop = m64, 0
        for k in range(31, -1, -1):
            if not undecided or thr & ((1 << (k + 1)) - 1) == 0:
                break
            bits = nxt()
            if (thr >> k) & 1:
                drop |= undecided & ~bits & m64
                undecided &= bits
            else:
                undecided &= ~bits & m64
        words.append(drop)
    return words


def test_bernoulli_stream_is_the_documented_one():
    """Pins the mask stream: a seed gives the same masks in every version, so seeded results stay comparable."""
    from edge_quq import _headkernel

    for p in (0.2, 0.4, 1 / 3, 0.5, 0.9, 0.75):
        got = np.frombuffer(_headkernel.bernoulli_bits(p, 11, 300), np.uint64).tolist()
        assert got == _reference_bernoulli_words(p, 11, 300), p


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_own_prng_agrees_statistically_with_numpy(activation):
    head = random_head(64, 32, 5, (0.2, 0.4), activation, seed=2)
    x = relu_features(64, seed=3)
    t = 40000
    a = NativeSampler(head, seed=1).sample(x, t)
    b = NumpySampler(head, seed=2).sample(x, t)
    se = np.sqrt((a.std**2 + b.std**2) / t)
    assert np.all(np.abs(a.mean - b.mean) < 5 * se + 1e-7)
    # std of a std estimate ~ std * sqrt(kurtosis-ish / 2T): 3% is > 5 sigma at T=40000 for these heads.
    np.testing.assert_allclose(a.std, b.std, rtol=0.03, atol=1e-4)
    assert a.expected_entropy == pytest.approx(b.expected_entropy, rel=0.01)


def test_own_prng_converges_to_the_exact_expectation():
    # Tiny head: enumerate all 2^(F+H) masks for the exact MC-dropout mean.
    head = random_head(3, 2, 2, (0.3, 0.5), "sigmoid", seed=1)
    x = np.array([0.8, 0.4, 1.3], np.float32)
    p0, p1 = head.rates
    mean = np.zeros(2)
    for m0 in itertools.product([0, 1], repeat=3):
        for m1 in itertools.product([0, 1], repeat=2):
            w = np.prod([(1 - p0) if k else p0 for k in m0]) * np.prod([(1 - p1) if k else p1 for k in m1])
            mean += w * head.probs(x[None], [np.array([m0], np.float32), np.array([m1], np.float32)])[0]
    m = NativeSampler(head, seed=11).sample(x, 400_000)
    assert np.all(np.abs(m.mean - mean) < 5 * m.std / np.sqrt(400_000) + 1e-6)


def test_fixed_seed_reproduces_exactly_and_reseed_restarts():
    head = random_head(128, 16, 4, (0.2, 0.4), "sigmoid")
    x = relu_features(128, 0)
    s = NativeSampler(head, seed=7)
    a, b = s.sample(x, 50), s.sample(x, 50)
    assert not np.array_equal(a.mean, b.mean)  # the stream advances between calls
    s.reseed(7)
    assert np.array_equal(s.sample(x, 50).mean, a.mean)
    c = NativeSampler(head, seed=7).sample(x, 50)
    assert np.array_equal(c.mean, a.mean) and np.array_equal(c.std, a.std)
    assert c.expected_entropy == a.expected_entropy
    assert not np.array_equal(NativeSampler(head, seed=8).sample(x, 50).mean, a.mean)


def test_concurrent_calls_release_the_gil_and_stay_correct():
    head = random_head(1280, 64, 10, (0.2, 0.4), "softmax")
    x = relu_features(1280, 0)
    want = [NativeSampler(head, seed=s).sample(x, 200).mean for s in range(4)]
    got: list = [None] * 4

    def work(i: int) -> None:
        got[i] = NativeSampler(head, seed=i).sample(x, 200).mean

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for w, g in zip(want, got):
        assert np.array_equal(w, g)


def test_auto_picks_native_for_the_canonical_head_and_numpy_otherwise():
    head = random_head(8, 4, 3, (0.2, 0.4), "sigmoid")
    assert isinstance(make_sampler("auto", head), NativeSampler)
    rng = np.random.default_rng(0)
    three = HeadWeights(
        kernels=tuple(rng.normal(size=s).astype(np.float32) for s in ((8, 4), (4, 4), (4, 3))),
        biases=tuple(np.zeros(n, np.float32) for n in (4, 4, 3)),
        rates=(0.2, 0.2, 0.4),
        activation="sigmoid",
    )
    assert type(make_sampler("auto", three)) is NumpySampler
    with pytest.raises(OptionError, match="2 dense blocks"):
        make_sampler("native", three)


def test_bad_inputs_are_refused():
    head = random_head(8, 4, 3, (0.2, 0.4), "sigmoid")
    with pytest.raises(OptionError, match="size 7"):
        NativeSampler(head).sample(np.zeros(7, np.float32), 10)
    with pytest.raises(OptionError, match="not available"):
        NativeSampler(head, isa="avx512")
    from edge_quq import _headkernel

    c = 3
    with pytest.raises(ValueError):
        _headkernel.moments(np.zeros(8, np.float32), head.kernels[0], head.biases[0], head.kernels[1][:2], head.biases[1],
                            0.2, 0.4, 1, 10, np.empty(c), np.empty(c), np.empty(c, np.float32))
    with pytest.raises(ValueError):
        _headkernel.moments(np.zeros(8, np.float32), head.kernels[0], head.biases[0], head.kernels[1], head.biases[1],
                            1.0, 0.4, 1, 10, np.empty(c), np.empty(c), np.empty(c, np.float32))


# -- the closed-form moments in C (edge_quq/csrc/analytic.c) against the numpy reference (edge_quq.analytic) --------
ANALYTIC_CASES = [(f, h, c, r, act, temp) for (f, h, c, _, r), act, temp in zip(
    CASES * 3, ["sigmoid"] * len(CASES) + ["softmax"] * len(CASES) + ["linear"] * len(CASES),
    [1.0, 1.7, 0.6] * len(CASES))]


@pytest.mark.parametrize("f,h,c,rates,activation,temperature", ANALYTIC_CASES,
                         ids=[f"F{f}-H{h}-C{c}-p{r[0]}_{r[1]}-{a}-T{t}" for f, h, c, r, a, t in ANALYTIC_CASES])
def test_analytic_in_c_matches_the_numpy_reference(f, h, c, rates, activation, temperature):
    from edge_quq.samplers import analytic

    head = random_head(f, h, c, rates, activation, seed=f + h + c)
    head = HeadWeights(head.kernels, head.biases, head.rates, head.activation, temperature=temperature)
    x = relu_features(f, seed=c)
    sampler = analytic.AnalyticSampler(head)
    assert sampler._native is not None
    got = sampler.sample(x)
    # The reference, spelled out: numpy logit moments and output moments, numpy eval logits.
    mu, var = analytic.logit_moments(head, x)
    mean, std, ent = analytic.output_moments(mu / temperature, var / temperature**2, activation)
    logits = head.logits(x[None])[0].astype(np.float64)
    # Tolerance: float32 matrix-vector sums in another order (as for the sampler, 2e-5 on the logits); the
    # quadrature nodes' exp/sin/log in float add ~1e-7 relative.
    np.testing.assert_allclose(got.logits, logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got.mean, mean, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.std, std, atol=1e-5, rtol=1e-4)
    # Linear heads take binary entropies of raw logits, whose slope log((1-p)/p) grows without bound near 0 and 1:
    # the logits' float32 rounding shows up 10-100x larger there.
    loose = activation == "linear"
    assert got.expected_entropy == pytest.approx(ent, rel=1e-4 if loose else 1e-5, abs=1e-4 if loose else 1e-6)
    np.testing.assert_allclose(got.deterministic, head.probs_from_logits(logits[None])[0], atol=2e-5)
    assert got.num_samples == 0


def test_analytic_in_c_refuses_bad_inputs():
    from edge_quq import _headkernel

    head = random_head(8, 4, 3, (0.2, 0.4), "sigmoid")
    w0, w1 = head.kernels
    b0, b1 = head.biases
    out = (np.empty(3), np.empty(3), np.empty(3, np.float32))
    with pytest.raises(ValueError):
        _headkernel.analytic_moments(np.zeros(8, np.float32), w0, b0, w1[:2], b1, 0.2, 0.4, 1, 1.0, *out)
    with pytest.raises(ValueError):
        _headkernel.analytic_moments(np.zeros(8, np.float32), w0, b0, w1, b1, 0.2, 0.4, 1, 0.0, *out)
    with pytest.raises(ValueError):
        _headkernel.analytic_moments(np.zeros(8, np.float32), w0, b0, w1, b1, 0.2, 0.4, 7, 1.0, *out)
