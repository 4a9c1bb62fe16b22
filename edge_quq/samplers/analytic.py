"""Closed-form MC-dropout moments of the head: propagate mean and variance instead of sampling.

Pure numpy (no scipy on the device), batched over feature rows [N, F]. Sampler "analytic"; num_iter is ignored
and HeadMoments reports num_samples = 0. `analytic_moments` is the batched entry point the benchmarks call. The approximations, in order (docs/samplers.md says where they are weak):

1. Inverted dropout on an input with mean m and variance v (Bernoulli keep, scale 1/(1-p)):
   mean m, variance v/(1-p) + m^2 p/(1-p). Exact.
2. Dense layer: mean W^T m + b, variance (W^2)^T v. Exact for the mean; for the variance it assumes the inputs
   are uncorrelated. That holds after the first dropout (independent masks on a fixed feature vector) but not
   for the hidden units, which share those masks: the covariance between hidden units is dropped.
3. ReLU of a Gaussian N(mu, s^2): the rectified-Gaussian mean mu*Phi(a) + s*phi(a) and second moment
   (mu^2 + s^2)*Phi(a) + mu*s*phi(a), a = mu/s. Exact if the pre-activation were Gaussian (a sum of many
   dropped terms: close to Gaussian for large F, poor for F of a few units).
4. Output:
   - linear: the logit moments themselves.
   - sigmoid: mean sigmoid(mu / sqrt(1 + pi s^2 / 8)) (MacKay's probit approximation; exact when s = 0).
     Variance from sigmoid(x) ~ Phi(lambda x), lambda = 1/1.702: with h = lambda mu / sqrt(1 + lambda^2 s^2) and
     rho = lambda^2 s^2 / (1 + lambda^2 s^2), Var = Phi2(h, h; rho) - Phi(h)^2 (bivariate normal CDF), computed as a
     1-D integral over the correlation by 20-point Gauss-Legendre quadrature; never negative, 0 when s = 0.
   - softmax: class c's probability is sigmoid(d_c), d_c = a_c - LSE_{j != c}(a_j). d_c is taken Gaussian with
     mean mu_c - (LSE(mu_-c) + 1/2 sum_j w_j (1 - w_j) s_j^2) (second-order expansion of the log-sum-exp, w the
     softmax weights of the other classes) and variance s_c^2 + sum_j w_j^2 s_j^2 (LSE linearised); then the sigmoid
     moments above. The class means are renormalised to sum to 1.
   - expected entropy (for mutual information): 32-point Gauss-Hermite quadrature over each class's Gaussian
     (d_c for softmax), summed over classes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from edge_quq.errors import OptionError
from edge_quq.head import HeadWeights, erf, sigmoid  # noqa: F401  (erf: also this module's public name)
from edge_quq.samplers.base import HeadMoments, Sampler
from edge_quq.scores import entropy

_SQRT2 = np.sqrt(2.0)
# sigmoid(x) ~ Phi(x / 1.702) for the variance: the max-error fit of the logistic to the normal CDF. With pi/8
# (slope match at 0) the std error was twice as large (0.010 vs 0.005 over |mu| <= 9, var <= 9).
_LAMBDA2 = (1.0 / 1.702) ** 2
_GL_X, _GL_W = np.polynomial.legendre.leggauss(20)
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(32)


def norm_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + erf(np.asarray(x, dtype=np.float64) / _SQRT2))


def norm_pdf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def dropout_moments(m: np.ndarray, v: np.ndarray, p: float) -> Tuple[np.ndarray, np.ndarray]:
    """Inverted dropout of independent inputs with mean m, variance v: exact moments."""
    if p <= 0.0:
        return m, v
    return m, v / (1.0 - p) + m * m * (p / (1.0 - p))


def relu_moments(mu: np.ndarray, var: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and variance of max(0, z) for z ~ N(mu, var) (rectified Gaussian); var 0 gives max(0, mu)."""
    s = np.sqrt(np.maximum(var, 0.0))
    safe = s > 0
    a = np.where(safe, mu / np.where(safe, s, 1.0), 0.0)
    cdf, pdf = norm_cdf(a), norm_pdf(a)
    mean = np.where(safe, mu * cdf + s * pdf, np.maximum(mu, 0.0))
    second = np.where(safe, (mu * mu + var) * cdf + mu * s * pdf, np.maximum(mu, 0.0) ** 2)
    return mean, np.maximum(second - mean * mean, 0.0)


def probit_moments(mu: np.ndarray, var: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """E[sigmoid(a)] and Var[sigmoid(a)] for a ~ N(mu, var): MacKay's mean, bivariate-probit variance."""
    mu = np.asarray(mu, dtype=np.float64)
    lv = _LAMBDA2 * np.maximum(var, 0.0)
    h = np.sqrt(_LAMBDA2) * mu / np.sqrt(1.0 + lv)
    rho = lv / (1.0 + lv)
    # Mean in MacKay's sigmoid form (exact when var = 0, max error 0.012 for |mu| <= 9, var <= 9); the
    # Phi form Phi(h) is closer with spread (0.007) but not exact without it, and heads without spread are common.
    mean = sigmoid(mu / np.sqrt(1.0 + (np.pi / 8.0) * np.maximum(var, 0.0)))
    # Phi2(h, h; rho) - Phi(h)^2 = (1/2pi) * integral_0^{asin rho} exp(-h^2 / (1 + sin t)) dt: smooth in t.
    upper = np.arcsin(np.clip(rho, 0.0, 1.0))
    t = 0.5 * upper[..., None] * (_GL_X + 1.0)
    integrand = np.exp(-(h * h)[..., None] / (1.0 + np.sin(t)))
    extra = 0.5 * upper * np.sum(_GL_W * integrand, axis=-1) / (2.0 * np.pi)
    return mean, np.maximum(extra, 0.0)


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    """Elementwise binary entropy (scores.entropy over a trailing axis of one class)."""
    return entropy(p[..., None], "sigmoid")


def _gauss_hermite(mu: np.ndarray, var: np.ndarray, fn) -> np.ndarray:
    """E[fn(a)] for a ~ N(mu, var), per element, by 32-point Gauss-Hermite quadrature."""
    a = mu[..., None] + np.sqrt(2.0 * np.maximum(var, 0.0))[..., None] * _GH_X
    return np.sum(_GH_W * fn(a), axis=-1) / np.sqrt(np.pi)


def check_relu(head: HeadWeights) -> None:
    """The closed form propagates moments through ReLU only (a rectified Gaussian); other hidden activations
    have no such formula here, so the sampler refuses them rather than approximate silently."""
    if not head.relu_only:
        raise OptionError(f"sampler 'analytic' supports ReLU hidden layers only; this head has {', '.join(head.hidden_activations)} "
                          "(use --sampler numpy)")


def logit_moments(head: HeadWeights, x: np.ndarray, sq_kernels: Optional[list] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the head's last pre-activation (logits) under MC dropout, any number of blocks,
    for features [F] or rows [N, F]."""
    check_relu(head)
    m = np.asarray(x, dtype=np.float64)
    v = np.zeros_like(m)
    n = len(head.kernels)
    for i, (k, b, p) in enumerate(zip(head.kernels, head.biases, head.rates)):
        m, v = dropout_moments(m, v, float(p))
        k2 = sq_kernels[i] if sq_kernels is not None else np.square(k, dtype=np.float32)
        # float32 products against the float32 weights (no 2x-sized float64 copy per call); elementwise in float64.
        m = (m.astype(np.float32) @ k).astype(np.float64) + b
        v = (v.astype(np.float32) @ k2).astype(np.float64)
        if i < n - 1:
            m, v = relu_moments(m, v)
    return m, v


def _softmax_margins(mu: np.ndarray, var: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and variance of d_c = a_c - LSE_{j != c}(a_j) for every class, over the last axis."""
    c = mu.shape[-1]
    others = ~np.eye(c, dtype=bool)
    mo = np.where(others, mu[..., None, :], -np.inf)  # [..., C, C]: row c holds the other classes
    top = np.max(mo, axis=-1, keepdims=True)
    e = np.exp(mo - top)
    w = e / np.sum(e, axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.sum(e, axis=-1))
    lse_mean = lse + 0.5 * np.sum(w * (1.0 - w) * var[..., None, :], axis=-1)
    lse_var = np.sum(w * w * var[..., None, :], axis=-1)
    return mu - lse_mean, var + lse_var


def output_moments(mu: np.ndarray, var: np.ndarray, activation: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std of the output probabilities and the expected per-sample entropy, from the logit moments
    (over the last axis: [C] -> scalar entropy, [N, C] -> [N])."""
    mu = np.asarray(mu, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    if activation == "sigmoid":
        mean, v = probit_moments(mu, var)
        ent = np.sum(_gauss_hermite(mu, var, lambda a: _binary_entropy(sigmoid(a))), axis=-1)
        return mean, np.sqrt(v), ent
    if activation == "softmax":
        if mu.shape[-1] == 1:
            return np.ones_like(mu), np.zeros_like(mu), np.zeros(mu.shape[:-1])
        d_mu, d_var = _softmax_margins(mu, var)
        mean, v = probit_moments(d_mu, d_var)
        mean = mean / np.sum(mean, axis=-1, keepdims=True)
        ent = np.sum(_gauss_hermite(d_mu, d_var, lambda a: entropy(sigmoid(a)[..., None], "softmax")), axis=-1)
        return mean, np.sqrt(v), ent
    return mu, np.sqrt(np.maximum(var, 0.0)), entropy(mu, "sigmoid")


def analytic_moments(head: HeadWeights, feats: np.ndarray, sq_kernels: Optional[list] = None, chunk: int = 256) -> HeadMoments:
    """Closed-form moments for rows feats [N, F] (batched HeadMoments, num_samples = 0). Chunked because
    softmax heads hold [rows, C, C] intermediates (C = 100: 80 kB a row)."""
    x = np.asarray(feats, dtype=np.float32).reshape(-1, head.feature_size)
    det_logits = head.logits(x).astype(np.float64)
    t = float(head.temperature)
    parts = []
    for s in range(0, len(x), chunk):
        mu, var = logit_moments(head, x[s : s + chunk], sq_kernels)
        # logits / T: mean / T and variance / T^2, exactly.
        parts.append(output_moments(mu / t, var / (t * t), head.activation))
    c = head.num_classes
    mean, std, ent = (np.concatenate([p[i] for p in parts]) if parts else np.zeros((0, c) if i < 2 else 0) for i in range(3))
    return HeadMoments(mean=mean, std=std, deterministic=head.probs_from_logits(det_logits), logits=det_logits,
                       expected_entropy=ent, num_samples=0)


class AnalyticSampler(Sampler):
    """Moment propagation: no sampling, one pass costing about two dense head evaluations. num_iter is ignored."""

    name = "analytic"

    def __init__(self, head: HeadWeights, seed: Optional[int] = None) -> None:
        super().__init__(head, seed)
        check_relu(head)
        # The 2-block head runs in C when the kernel is built (same formulas, one pass over W0 and one over W1);
        # the numpy functions above stay the reference and serve every other head.
        self._native = _native_analytic(head)
        # W^2 once: the variance pass is a second matrix-vector product.
        self._sq = None if self._native else [np.square(k, dtype=np.float32) for k in head.kernels]

    def sample(self, features: np.ndarray, num_iter: int = 0) -> HeadMoments:
        return super().sample(features, num_iter)

    def sample_rows(self, x: np.ndarray, num_iter: int = 0) -> HeadMoments:
        if self._native is None:
            return analytic_moments(self.head, x, self._sq)
        rows = [self._native(np.ascontiguousarray(r, dtype=np.float32)) for r in x]
        c = self.head.num_classes
        mean, std, logits = (np.stack([r[i] for r in rows]) if rows else np.zeros((0, c)) for i in range(3))
        ent = np.array([r[3] for r in rows])
        return HeadMoments(mean=mean, std=std, deterministic=self.head.probs_from_logits(logits), logits=logits,
                           expected_entropy=ent, num_samples=0)


def _native_analytic(head: HeadWeights):
    """x -> (mean, std, eval logits, expected entropy) by edge_quq._headkernel.analytic_moments, or None when the
    kernel is not built or the head is not the canonical 2-block one."""
    try:
        from edge_quq import _headkernel as kernel  # type: ignore[attr-defined]
    except ImportError:
        return None
    acts = {"linear": 0, "sigmoid": 1, "softmax": 2}
    if len(head.kernels) != 2 or head.activation not in acts or not hasattr(kernel, "analytic_moments"):
        return None
    w0, w1 = (np.ascontiguousarray(k, dtype=np.float32) for k in head.kernels)
    b0, b1 = (np.ascontiguousarray(b, dtype=np.float32) for b in head.biases)
    args = (w0, b0, w1, b1, float(head.rates[0]), float(head.rates[1]), acts[head.activation], float(head.temperature))
    c = b1.shape[0]

    def run(x: np.ndarray):
        if x.shape[0] != w0.shape[0]:
            raise ValueError(f"features have size {x.shape[0]}, the head expects {w0.shape[0]}")
        mean, std, logits = np.empty(c), np.empty(c), np.empty(c, np.float32)
        ent = kernel.analytic_moments(x, *args, mean, std, logits)
        return mean, std, logits.astype(np.float64), float(ent)

    return run
