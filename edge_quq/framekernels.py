"""Native fast paths of the per-frame math after the head (edge_quq/csrc/frame.c, built into the optional
edge_quq._headkernel extension). On one frame's ten classes numpy's per-call cost, not the arithmetic, was most
of the frame's overhead; each kernel here does one batched step in one call.

Every kernel has a batched numpy reference that stays the definition of its math, and must match it
(tests/test_frame_kernels.py runs both on random and edge-case inputs):

    moment_scores      edge_quq.scores.compute_scores_numpy       SCORE_RTOL
    interval_decide    edge_quq.decision.decide_numpy             exact (same comparisons, no fused multiply-add)
    mahalanobis        edge_quq.detectors._mahalanobis_numpy      MAHALANOBIS_RTOL (mahalanobis_row: its one-row mode)
    project_q8         edge_quq.detectors._project_q8_numpy       Q8_RTOL (every variant of q8_isas(): tests/test_whitener.py,
                                                                   NEON under qemu: tests/test_whitener_aarch64.py)
    knn_kth            edge_quq.detectors._knn_kth_numpy          DOT_RTOL (every variant of dots_isas(), int8, float16
                                                                   and float32 banks: tests/test_knn_vim_kernels.py, NEON
                                                                   under qemu: tests/test_knn_vim_aarch64.py; knn_kth_row:
                                                                   one row); a float16 bank bit-identical to its float32
                                                                   widening (dots_f16_isas())
    vim_resid          edge_quq.detectors._vim_resid_numpy        DOT_RTOL (as knn_kth, int8, float16 and float32 null
                                                                   spaces; vim_resid_row: one row)

The owners (scores.compute_scores, decision.decide and decide_many, the detectors' Mahalanobis family) call the
kernel when `available()`, the reference otherwise: an install without a C compiler runs the references only.

Tolerances. The moment scores repeat the reference's float64 operations in its order, numpy's pairwise
summation included, so they are bit-identical where numpy's log, exp and log1p are the C library's (x86 without
AVX-512, aarch64); numpy's AVX-512 versions may differ by an ulp, hence SCORE_RTOL (relative to max(1, |score|)).
The Mahalanobis distances are float32 like the reference, whose class dot products come from a BLAS matmul in
another summation order: they agree to MAHALANOBIS_RTOL of the row's scale |zc|^2 + max_c |m_c|^2 (+ |g|^2 for
rel_mahalanobis), the terms whose float32 rounding the distance inherits. The int8 whitener product (whitener.c)
multiplies the same float32 terms as its reference, x @ the dequantised matrix, up to the rounding of x_i * scale_i
and in another order: each projected coordinate z_k agrees to Q8_RTOL of sum_i |x_i W_ik|.
knn_kth and vim_resid (rowdot.c) are float32 dot products like their references' BLAS matmuls, in another order
(and, for an int8 bank or null space, with the scale applied after the sum instead of to each entry, W being the
dequantised matrix): each dot product agrees to DOT_RTOL of sum_j |x_j W_j|. The k-th largest of values each moved by at most e moves by at most e, so the kNN's
k-th similarity agrees to DOT_RTOL of max_b sum_j |xhat_j bank_bj| (<= DOT_RTOL for unit rows); ViM's residual
norm, a norm of D such products, to DOT_RTOL of the norm of their bounds, | |x - origin| @ |null_space| |.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

try:
    from edge_quq import _headkernel as _kernel  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the numpy references remain
    _kernel = None

SCORE_RTOL = 1e-12
MAHALANOBIS_RTOL = 1e-5
Q8_RTOL = 1e-5
DOT_RTOL = 1e-5
# activation name -> the kernel's code; any other name scores like "linear" (binary entropy, no energy), as
# the reference does
_ACTIVATION_CODES = {"sigmoid": 1, "softmax": 2}
NUM_MOMENT_SCORES = 5


def available() -> bool:
    """True when the extension with the per-frame kernels was built and imports."""
    return _AVAILABLE


_AVAILABLE = _kernel is not None and hasattr(_kernel, "interval_decide")


def q8_available() -> bool:
    """True when the extension has the int8 whitener product (project_q8)."""
    return _Q8_AVAILABLE


_Q8_AVAILABLE = _kernel is not None and hasattr(_kernel, "project_q8")
# What the kernels refuse (wrong dtype, size or layout): the callers' row paths then take the reference.
_REFUSED = (TypeError, ValueError, BufferError)


def _f64(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float64)


def _logits(x: np.ndarray) -> np.ndarray:
    lg = np.ascontiguousarray(x)
    return lg if lg.dtype == np.float32 else _f64(lg)


def moment_scores(mean: np.ndarray, std: np.ndarray, logits: np.ndarray, expected_entropy: np.ndarray,
                  activation: str) -> np.ndarray:
    """[5, N] float64 for rows mean, std, logits [N, C] and expected_entropy [N]: max_prob, predictive_entropy,
    mutual_information, mean_variance, energy (scores.MOMENT_SCORES; energy NaN unless sigmoid or softmax)."""
    ee = _f64(expected_entropy)
    out = np.empty((NUM_MOMENT_SCORES, ee.size))
    _kernel.moment_scores(_f64(mean), _f64(std), _logits(logits), ee, _ACTIVATION_CODES.get(activation, 0), out)
    return out


def moment_scores_row(mean: np.ndarray, std: np.ndarray, logits: np.ndarray, expected_entropy: float,
                      activation: str) -> Optional[Tuple[float, ...]]:
    """moment_scores of one sample (float64 [C] mean and std, float32 or float64 logits, a float) as floats;
    None for inputs of other types or layouts."""
    try:
        return _kernel.moment_scores(mean, std, logits, expected_entropy, _ACTIVATION_CODES.get(activation, 0))
    except _REFUSED:
        return None


def interval_decide(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed_keep: bool
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keep [N] bool, code [N] int8, states [N, C] int8, kept [N, C] bool, labels [N] int64, lower, upper
    [N, C]) of the interval rule for rows mean, std [N, C] (decision.decide_numpy's Decisions and bounds)."""
    m = _f64(mean)
    n = m.shape[0]
    lower, upper = np.empty_like(m), np.empty_like(m)
    states = np.empty(m.shape, np.int8)
    kept = np.empty(m.shape, np.bool_)
    keep, code, labels = np.empty(n, np.bool_), np.empty(n, np.int8), np.empty(n, np.int64)
    _kernel.interval_decide(m, _f64(std), z, threshold, mixed_keep, lower, upper, states, code, keep, kept, labels)
    return keep, code, states, kept, labels, lower, upper


def interval_decide_row(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed_keep: bool
                        ) -> Optional[Tuple[bool, int, int, Tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]]:
    """interval_decide of one sample (float64 [C] mean and std): (keep, code, label, kept classes, states,
    lower, upper); None for inputs of other types or layouts."""
    c = mean.shape[-1]
    lower, upper, states = np.empty(c), np.empty(c), np.empty(c, np.int8)
    try:
        keep, code, label, classes = _kernel.interval_decide(mean, std, z, threshold, mixed_keep, lower, upper, states)
    except _REFUSED:
        return None
    return keep, code, label, classes, states, lower, upper


def mahalanobis(z: np.ndarray, center: np.ndarray, means2: np.ndarray, msq: np.ndarray,
                center0: Optional[np.ndarray], between: Optional[np.ndarray] = None
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(d [N], rel [N] or None) float64 from projected float32 rows z [N, F], or [N, 2F] with the global
    projection interleaved when center0 is given, or with rel_mahalanobis' low-rank background `between`
    [F + 1, R] (detectors._mahalanobis_numpy's inputs and outputs; the prepared arrays are float32 and
    contiguous)."""
    zz = np.ascontiguousarray(z, np.float32)
    n = zz.shape[0]
    d = np.empty(n)
    rel = np.empty(n) if center0 is not None or between is not None else None
    _kernel.mahalanobis(zz, center, means2, msq, center0, d, rel, between)
    return d, rel


def mahalanobis_row(z: np.ndarray, center: np.ndarray, means2: np.ndarray, msq: np.ndarray,
                    center0: Optional[np.ndarray], between: Optional[np.ndarray] = None
                    ) -> Optional[Tuple[float, Optional[float]]]:
    """mahalanobis of one projected row z (float32, C-contiguous [1, F] or [1, 2F]) as floats (d, rel or None);
    None for inputs of other types or layouts."""
    try:
        return _kernel.mahalanobis(z, center, means2, msq, center0, None, None, between)
    except _REFUSED:
        return None


class Q8Matrix(NamedTuple):
    """An int8 whitener (or an interleaved pair, S = 2) in project_q8's layout (edge_quq/csrc/whitener.h): row i's
    nonzero prefix, padded with zeros to a multiple of 16 columns, at q[off[i]:off[i + 1]]."""
    q: np.ndarray  # int8, the packed rows
    off: np.ndarray  # int64 [F + 1]
    scale: np.ndarray  # float32 [F, S]
    diag: np.ndarray  # float32 [S * F]
    S: int


def pack_q8(q: np.ndarray, scale: np.ndarray, diag: np.ndarray) -> Q8Matrix:
    """Q8Matrix of int8 rows q [F, K] (K = S * F, S = 1 or 2 interleaved whiteners), scales [F, S], diag [K]."""
    f, k = q.shape
    kp = -(-k // 16) * 16
    nz = q != 0
    last = np.where(nz.any(axis=1), k - np.argmax(nz[:, ::-1], axis=1), 0)
    lens = np.minimum(-(-last // 16) * 16, kp)
    padded = np.zeros((f, kp), np.int8)
    padded[:, :k] = q
    off = np.zeros(f + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    packed = np.ascontiguousarray(padded[np.arange(kp)[None, :] < lens[:, None]])
    return Q8Matrix(packed, off, np.ascontiguousarray(scale, np.float32).reshape(f, -1),
                    np.ascontiguousarray(diag, np.float32).reshape(-1), k // f)


def q8_isas() -> Tuple[str, ...]:
    """The variants of project_q8 usable on this CPU, best first; the plain C "scalar" last."""
    return tuple(_kernel.q8_isas())


def project_q8(x: np.ndarray, m: Q8Matrix, isa: Optional[str] = None) -> np.ndarray:
    """float32 [N, S * F]: rows x [N, F] times the dequantised matrix of m (detectors._project_q8_numpy), by the
    kernel variant `isa` (None: the best of q8_isas())."""
    xx = np.ascontiguousarray(x, np.float32)
    z = np.empty((xx.shape[0], m.diag.size), np.float32)
    if xx.shape[0]:
        _kernel.project_q8(xx, m.q, m.off, m.scale, m.diag, m.S, z, isa)
    return z


def dots_available() -> bool:
    """True when the extension has the kNN and ViM kernels (knn_kth, vim_resid)."""
    return _DOTS_AVAILABLE


_DOTS_AVAILABLE = _kernel is not None and hasattr(_kernel, "knn_kth")


def dots_isas() -> Tuple[str, ...]:
    """The variants of knn_kth and vim_resid usable on this CPU, best first (project_q8's); "scalar" last."""
    return tuple(_kernel.dots_isas())


def dots_f16_isas() -> Tuple[str, ...]:
    """The variants of dots_isas() that read float16 banks and null spaces on this CPU (widened on load: avx2_fma
    with F16C, neon, scalar), best first."""
    return tuple(_kernel.dots_f16_isas()) if _kernel is not None and hasattr(_kernel, "dots_f16_isas") else ()


def dots_f16() -> bool:
    """True when the best variant of knn_kth and vim_resid reads float16 rows: a float16-stored kNN bank or ViM null
    space is then held float16 (half float32's bytes per frame), else widened to float32 at load."""
    return _DOTS_AVAILABLE and _DOTS_F16


def knn_kth(x: np.ndarray, bank: np.ndarray, scale: Union[float, np.ndarray], k: int, isa: Optional[str] = None
            ) -> np.ndarray:
    """float32 [N]: the k-th largest cosine similarity of rows x [N, F] to the bank rows, int8 [B, F] times `scale`
    (> 0: a number, or float32 [B], one per row), or float32 or float16 [B, F] (scale 1; float16 only with a variant
    of dots_f16_isas()); 1 <= k <= B (detectors._knn_kth_numpy), by the variant `isa` (None: the best)."""
    xx = np.ascontiguousarray(x, np.float32)
    out = np.empty(xx.shape[0], np.float32)
    if xx.shape[0]:
        _kernel.knn_kth(xx, bank, scale, k, out, isa)
    return out


def knn_kth_row(x: np.ndarray, bank: np.ndarray, scale: Union[float, np.ndarray], k: int) -> Optional[float]:
    """knn_kth of one row x (float32, C-contiguous [1, F]) as a float; None for inputs of other types or layouts."""
    try:
        return _kernel.knn_kth(x, bank, scale, k)
    except _REFUSED:
        return None


def vim_resid(x: np.ndarray, origin: np.ndarray, ns_t: np.ndarray, scale: Optional[np.ndarray] = None,
              isa: Optional[str] = None) -> np.ndarray:
    """float64 [N]: |(x - origin) @ (scale * ns_t).T| of rows x [N, F], origin float32 [F] and the null space
    transposed, C-contiguous [D, F]: float32 or float16 (scale None; float16 as for knn_kth) or int8 with one scale
    per row, float32 [D] (detectors._vim_resid_numpy), by the variant `isa` (None: the best)."""
    xx = np.ascontiguousarray(x, np.float32)
    out = np.empty(xx.shape[0])
    if xx.shape[0]:
        _kernel.vim_resid(xx, origin, ns_t, scale, out, isa)
    return out


def vim_resid_row(x: np.ndarray, origin: np.ndarray, ns_t: np.ndarray, scale: Optional[np.ndarray] = None
                  ) -> Optional[float]:
    """vim_resid of one row x (float32, C-contiguous [1, F]) as a float; None for inputs of other types or layouts."""
    try:
        return _kernel.vim_resid(x, origin, ns_t, scale)
    except _REFUSED:
        return None


_DOTS_F16 = _DOTS_AVAILABLE and dots_f16_isas()[:1] == dots_isas()[:1]
