"""Feature-space and logit-space OOD detectors fitted at export and run on the board (pure numpy, no I/O).

Every detector maps backbone features [N, F] (and the head, for the logit-based ones) to one score per
sample with a fixed direction: HIGHER = MORE out-of-distribution. An optional threshold, fitted on held-out
in-distribution features for a chosen true-positive rate (share of ID samples kept, e.g. 0.95), turns the
score into a flag: `score > threshold` means "do not trust".

Detectors (docs/detectors.md has the formulas and costs):
- maxlogit         -max_c z_c (Hendrycks et al. 2022), z = eval-mode head logits (no dropout, no temperature).
- energy           softmax/linear heads: -logsumexp(z) (Liu et al. 2020). Sigmoid heads: the joint energy
                   -sum_c softplus(z_c) (Wang et al. 2021): each class is a two-way softmax of z_c against 0,
                   and the free energies of the C binary problems add up.
- react            the energy of the head run on min(f, c): features clipped at c, the `percentile` of the
                   ID feature activations (Sun et al. 2021).
- mahalanobis      min_c (f - mu_c)^T S^-1 (f - mu_c), class means and one shared covariance (Lee et al. 2018).
- rel_mahalanobis  min_c d_c(f) - d_0(f), d_0 the distance to the global mean under the global covariance
                   (Ren et al. 2021).
- knn              distance from the L2-normalised feature to its k-th nearest neighbour in a subsampled bank
                   of normalised ID features (Sun et al. 2022).
- vim              ViM (Wang et al. 2022) adapted to a head whose first layer is Dense+ReLU: origin
                   u = the least-squares point where the first layer's pre-activation is zero, principal
                   subspace of (f - u) over ID features, score = alpha * ||residual|| + energy(z), alpha
                   matching the mean ID residual to the mean ID -energy.
- gradient         the closed-form head-gradient score of edge_quq.gradients (REGrad), as one more detector.

Storage: `DetectorSet.to_arrays()` gives plain arrays (float16 or int8 where the held-out scores do not move,
float32 otherwise; an int8 kNN bank or ViM null space stays int8 in memory) plus a JSON meta record, written by the caller as an npz without pickle.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_quq import framekernels as _native
from edge_quq.errors import BundleError, OptionError
from edge_quq.gradients import GradientSettings, gradient_scores
from edge_quq.head import HeadWeights
from edge_quq.scores import energy

FORMAT_NAME = "edge-quq-detectors"
# 2: int8 whiteners with per-row scales (_WHITENERS); 3: ViM's null space int8 with per-column scales
# (_INT8_PER_COLUMN); 4: rel_mahalanobis' background as a low-rank term on the class whitener ("between_w",
# _background) instead of its own whitener ("whitener0", still read), and an int8 kNN bank with a scale per row
# (_INT8_PER_ROW; one scale still read). A file is written with the lowest version that holds it
# (DetectorSet.file_version).
FILE_VERSION = 4
DETECTOR_NAMES = ("maxlogit", "energy", "react", "mahalanobis", "rel_mahalanobis", "knn", "vim", "gradient")
DEFAULT_DETECTORS = DETECTOR_NAMES

_NATIVE_FRAME = _native.available()
# Default hyper-parameters; every one is recorded in the file so a score is reproducible from it alone.
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "maxlogit": {},
    "energy": {},
    "react": {"percentile": 90.0},
    "mahalanobis": {"ridge": 1e-6},
    "rel_mahalanobis": {"ridge": 1e-6},
    "knn": {"k": 10, "bank_size": 1024},
    "vim": {"dim": None},  # principal dimensions kept; None: F // 2
    "gradient": {"layer_base": 2.0, "class_weighting": "sqrt"},
}


# --- shared pieces -------------------------------------------------------------------------------------------

def eval_logits(head: HeadWeights, feats: np.ndarray) -> np.ndarray:
    """Raw eval-mode logits [N, C] (dropout off, temperature not applied: detectors are fitted on them)."""
    return head.logits(feats).astype(np.float64)  # logits() takes rows as float32 itself


def _rows(feats: np.ndarray) -> np.ndarray:
    """feats as rows [N, F]: np.atleast_2d without its wrapper's cost when they already are (every frame)."""
    return feats if getattr(feats, "ndim", 0) == 2 else np.atleast_2d(feats)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _whitener(cov: np.ndarray, ridge: float) -> np.ndarray:
    """A with A A^T = (cov + ridge*I)^-1, so (f-m)^T cov^-1 (f-m) = ||(f-m) A||^2: one matmul per sample."""
    f = cov.shape[0]
    reg = cov + ridge * max(float(np.trace(cov)) / f, 1e-12) * np.eye(f)
    prec = np.linalg.inv(reg)
    prec = (prec + prec.T) / 2.0
    return np.linalg.cholesky(prec)


# --- detectors ----------------------------------------------------------------------------------------------
# Each detector: fit(feats, labels, head, rng, **config) -> arrays; score(arrays, config, feats, head) -> [N].

def _fit_none(feats, labels, head, rng, **cfg) -> Dict[str, np.ndarray]:
    return {}


def _score_maxlogit(a, cfg, feats, head, logits=None) -> np.ndarray:
    return -np.max(eval_logits(head, feats) if logits is None else logits, axis=1)


def _score_energy(a, cfg, feats, head, logits=None) -> np.ndarray:
    return energy(eval_logits(head, feats) if logits is None else logits, head.activation)


def _fit_react(feats, labels, head, rng, percentile: float = 90.0) -> Dict[str, np.ndarray]:
    return {"clip": np.array([np.percentile(feats, percentile)], np.float64)}


def _score_react(a, cfg, feats, head, logits=None) -> np.ndarray:
    clipped = np.minimum(np.asarray(feats, np.float64), float(a["clip"][0]))
    return energy(eval_logits(head, clipped), head.activation)


def _class_means(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    means = np.zeros((num_classes, feats.shape[1]))
    for c in range(num_classes):
        m = labels == c
        # A class absent from the fit data gets no mean; its distance is +inf so it never wins the min.
        means[c] = feats[m].mean(axis=0) if m.any() else np.nan
    return means


def _fit_mahalanobis(feats, labels, head, rng, ridge: float = 1e-6) -> Dict[str, np.ndarray]:
    means = _class_means(feats, labels, head.num_classes)
    centred = feats - np.nan_to_num(means)[labels]
    a = _whitener(centred.T @ centred / len(feats), ridge)
    return {"whitener": a, "means_w": means @ a}


# Whiteners of at least this many features are stored int8 (fit_detectors, dtype "int8"). Why: the pair the gate
# scores every frame (mahalanobis + rel_mahalanobis, 8 F^2 float32 bytes) is 2 MiB at F = 512, past a board core's
# L2 (512 KiB on a Cortex-A76/A72) and this machine's, so from there on the product is bound by reading it and int8
# reads a quarter of the bytes; below, it is cache-resident and float32 costs nothing more (the default bundle,
# F = 96, stays float32).
INT8_WHITENER_MIN_FEATURES = 512
# the int8 form of a whitener "k": k int8 [F, F] (diagonal zero), k_scale float32 [F], k_diag float32 [F]
_WHITENERS = ("whitener", "whitener0")
# Stored int8 arrays held int8 in memory with their scales (key + ".scale") rather than dequantised, which the native
# kernels read as they are: the kNN bank (framekernels.knn_kth; one scale per row, _INT8_PER_ROW) and ViM's null space
# (framekernels.vim_resid; one scale per column, _INT8_PER_COLUMN).
_INT8_KEPT = frozenset({"bank", "null_space"})
# Kept int8 arrays [B, F] with a scale per row, float32 [B] (files before version 4: one scale, float64 [1]). Why: the
# bank's unit rows of crowded features (all-positive ReLU features, cosines near 1) differ in their largest entry, and
# on one shared scale the rows with small entries kept few int8 steps: on the bench backbones' photo features, one
# scale moved held-out kNN scores by 0.7-1.3 of their spread, a scale per row by 0.06-0.12 (docs/detectors.md).
_INT8_PER_ROW = frozenset({"bank"})
# Kept int8 arrays [F, D] with a scale per column, float32 [D]. Why: each column is one of the kernel's dot products,
# and one column can be far more concentrated than the rest (a feature that never varies in the fit data is an
# eigenvector on its own axis, entry 1.0, against ~1/sqrt(F) for spread ones), which on one shared scale would leave
# the spread columns a few int8 steps.
_INT8_PER_COLUMN = frozenset({"null_space"})
# The same arrays stored float16 are held float16 when the native kernel's best variant widens them on load
# (framekernels.dots_f16): half float32's bytes read per frame, and the same scores to the bit. Else float32.
_F16_KEPT = _INT8_KEPT


def quantize_whitener(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q int8 [F, F], scale float32 [F], diag float32 [F]) of a square whitener: the diagonal in float32, the rest
    rounded per row to q * scale with |q| <= 127. Why per row and the diagonal apart: a Cholesky factor's largest
    entry in a row is its diagonal one, which would set the row's step; on its own scale the rest is ~10x more
    accurate (measured on ReLU random-projection features of Fashion-MNIST, F = 576 and 1280: median relative error
    of the distance 7e-4 against 4e-3 to 1e-2 per row alone and 8e-2 per column; docs/detectors.md)."""
    w = np.asarray(w, np.float64)
    diag = np.diag(w).astype(np.float32)
    q, scale = _quantize_rows(w - np.diag(np.diag(w)))
    return q, scale, diag


def _quantize_rows(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32 [rows]) of float64 w with w ~ scale[:, None] * q, |q| <= 127, each row on its own scale
    (its largest magnitude is 127 steps; an all-zero row gets scale 1/127)."""
    amax = np.max(np.abs(w), axis=1) if w.size else np.zeros(len(w))
    scale = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float32)
    return np.clip(np.round(w / scale.astype(np.float64)[:, None]), -127, 127).astype(np.int8), scale


def quantize_null_space(ns: np.ndarray, rows: np.ndarray, damp: float = 0.01, block: int = 128
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """(q int8 [F, D], scale float32 [D]) of ViM's null space ns [F, D], one scale per column (its largest magnitude
    at 127 steps, as _quantize_rows), the int8 values chosen by GPTQ (Frantar et al. 2023) to keep the residual
    coordinates of `rows` [N, F] (the fit rows minus the origin) rather than each entry: column j's rounding error is
    carried into the columns not yet rounded through the upper Cholesky factor of the rows' damped inverse second
    moment, in blocks of `block` features. Why: the rows' norm about the origin is 10-70x their residual (on
    Fashion-MNIST ReLU features, F = 576-1280, and the bench bundles' rows), so rounding each entry moved the held-out
    ViM scores by 0.17-0.19 of their spread, over the storage check's 0.1; compensated, by 0.02-0.03
    (docs/detectors.md). Deterministic; plain rounding when the second moment cannot be factorised."""
    w = np.array(ns, np.float64).T  # [D, F]: row d is column d of ns, updated as features are rounded
    q, scale = _quantize_rows(w)
    f = w.shape[1]
    h = rows.T @ rows / max(len(rows), 1)
    h[np.diag_indices(f)] += damp * max(float(np.mean(np.diag(h))), 1e-12)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return np.ascontiguousarray(q.T), scale
    s = scale.astype(np.float64)
    for b0 in range(0, f, block):
        b1 = min(b0 + block, f)
        err = np.empty((w.shape[0], b1 - b0))
        for j in range(b0, b1):
            q[:, j] = np.clip(np.round(w[:, j] / s), -127, 127)
            err[:, j - b0] = (w[:, j] - q[:, j] * s) / u[j, j]
            w[:, j + 1:b1] -= np.outer(err[:, j - b0], u[j, j + 1:b1])
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return np.ascontiguousarray(q.T), scale


def dequantize_whitener(q: np.ndarray, scale: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """float64 [F, F]: the whitener quantize_whitener's parts stand for, what an int8 detector scores with."""
    w = np.asarray(scale, np.float32).astype(np.float64)[:, None] * q
    w[np.diag_indices_from(w)] += np.asarray(diag, np.float32)
    return w


def _int8_mahalanobis(arrs: Mapping[str, np.ndarray], feats: np.ndarray, labels: np.ndarray, num_classes: int
                      ) -> Dict[str, np.ndarray]:
    """A fitted Mahalanobis-family detector's arrays with its whiteners int8 (quantize_whitener) and the whitened
    means recomputed from the dequantised whiteners, so that the distances are exact Mahalanobis distances under
    the precision the board uses (feats, labels: the fit rows; the means are the fit's)."""
    q, scale, diag = quantize_whitener(arrs["whitener"])
    a = dequantize_whitener(q, scale, diag)
    out = {"whitener": q, "whitener_scale": scale, "whitener_diag": diag, "means_w": _class_means(feats, labels, num_classes) @ a}
    if "between_w" in arrs:
        out.update(_background(a, feats, labels, num_classes))
    return out


def _dequantized(a: Mapping[str, np.ndarray], k: str) -> np.ndarray:
    """Whitener k of a detector's arrays as float64, dequantised when stored int8."""
    w = a[k]
    return dequantize_whitener(w, a[f"{k}_scale"], a[f"{k}_diag"]) if w.dtype == np.int8 else np.asarray(w, np.float64)


def _prepare_mahalanobis(a: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The Mahalanobis family's float32 scoring arrays, computed once per detector: one projection `proj`
    ([F, F], or [F, 2F] with the global whitener's columns between the class one's for rel_mahalanobis, so
    both come from one matmul), held as its nonzero row blocks `blocks` when large (_row_blocks), and the
    whitened class means as 2 * (m - center) [F, C] with |m - center|^2 [C]. Distances are taken from
    `center`, the mean of the class means, which keeps |z|^2 and |m|^2 small and so the float32 cancellation in |z - m|^2 = |z|^2 - 2 z.m + |m|^2 small (tests/test_detectors.py bounds it).
    int8 whiteners (INT8_WHITENER_MIN_FEATURES) are packed for the native product instead (`q8`, a
    framekernels.Q8Matrix); without the extension they are dequantised and scored like float ones."""
    if "blocks" in a:
        return a  # type: ignore[return-value]
    mw = np.asarray(a["means_w"], np.float64)
    present = ~np.isnan(mw).any(axis=1)
    center = mw[present].mean(axis=0) if present.any() else np.zeros(mw.shape[1])
    mc = np.nan_to_num(mw - center)
    # A class absent from the fit data has no mean: +inf, so it never wins the min.
    out = {"center": center.astype(np.float32), "means2": np.ascontiguousarray((2.0 * mc).T, np.float32),
           "msq": np.where(present, np.sum(mc * mc, axis=1), np.inf).astype(np.float32)}
    names = [k for k in _WHITENERS if k in a]
    if "whitener0" in a:
        out["center0"] = np.asarray(a["mean0_w"], np.float32).reshape(-1)
    if "between_w" in a:
        out.update(_prepared_background(a, center, out))
    if _native.q8_available() and all(a[k].dtype == np.int8 for k in names):
        out["q8"] = _native.pack_q8(*(_interleave([np.asarray(a[f"{k}{part}"]) for k in names])
                                      for part in ("", "_scale", "_diag")))  # type: ignore[assignment]
        out["blocks"], out["proj"] = (), np.empty((0, len(names) * mw.shape[1]), np.float32)  # type: ignore[assignment]
        return out
    # interleaved columns (class j at 2j, global j at 2j + 1): both whiteners are lower-triangular, so the
    # pair keeps a row-prefix structure and the row blocks below still skip the zeros
    proj = np.ascontiguousarray(_interleave([_dequantized(a, k) for k in names]), np.float32)
    out["blocks"] = _row_blocks(proj)  # type: ignore[assignment]
    # the full matrix only where it is scored whole: the blocks are the scoring copy otherwise
    out["proj"] = proj if not out["blocks"] else np.empty((0, proj.shape[1]), np.float32)
    return out


def _prepared_background(a: Mapping[str, np.ndarray], center: np.ndarray, out: Mapping[str, np.ndarray]
                         ) -> Dict[str, np.ndarray]:
    """The low-rank background's scoring arrays (framekernels.mahalanobis' `between` mode): the background mean as
    one more column of means2 and msq, after the classes', and `between` [F + 1, R], whose last row shifts the
    product from center to the background mean."""
    d0 = np.asarray(a["mean0_w"], np.float64).reshape(-1) - center
    k = np.asarray(a["between_w"], np.float64)
    return {"means2": np.ascontiguousarray(np.column_stack([out["means2"], (2.0 * d0).astype(np.float32)])),
            "msq": np.append(out["msq"], np.float32(d0 @ d0)).astype(np.float32),
            "between": np.ascontiguousarray(np.vstack([k, -(d0 @ k)[None, :]]), np.float32)}


# Projections of fewer rows (features) are one matmul: measured here, the per-block calls cost more than the
# bytes they save up to F = 576 (1.3 MiB), and 12 blocks did best at F = 960..2048.
_BLOCKED_MIN_ROWS = 768
_ROW_BLOCKS = 12


def _row_blocks(proj: np.ndarray) -> Tuple[Tuple[int, int, int, np.ndarray], ...]:
    """(row start, row end, column end, proj[rows, :column end]) per block of rows, column end = one past
    the last nonzero column in those rows. The whitener is a Cholesky factor (lower-triangular): row i is
    zero past column i, so the blocks hold about (1 + 1/blocks) / 2 of the matrix and z = f @ proj is the
    sum of the blocks' products, the same sums over the same nonzero terms (exact for any matrix: the
    column ends come from the values). Empty for small projections: one matmul there."""
    rows, cols = proj.shape
    if rows < _BLOCKED_MIN_ROWS:
        return ()
    nz = proj != 0
    last = np.where(nz.any(axis=1), cols - np.argmax(nz[:, ::-1], axis=1), 0)
    edges = np.linspace(0, rows, _ROW_BLOCKS + 1).astype(int)
    out = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        end = int(last[r0:r1].max()) if r1 > r0 else 0
        if end:
            out.append((int(r0), int(r1), end, np.ascontiguousarray(proj[r0:r1, :end])))
    if sum(b[3].size for b in out) > 0.75 * proj.size:
        return ()  # not triangular enough to pay for the extra calls
    return tuple(out)


def _interleave(parts: Sequence[np.ndarray]) -> np.ndarray:
    """[F, K] arrays side by side as [F, len(parts) * K], column j of part s at len(parts) * j + s."""
    return parts[0] if len(parts) == 1 else np.stack(parts, axis=-1).reshape(parts[0].shape[0], -1)


def _project_q8_numpy(x: np.ndarray, q: np.ndarray, scale: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """float32 [N, K]: rows x [N, F] times the int8 matrix q [F, K] (K = S * F, S whiteners interleaved) with
    per-row scales [F, S] and diagonal [K], dequantised to float32: the native product's reference
    (framekernels.project_q8, Q8_RTOL)."""
    f, k = q.shape
    s = np.asarray(scale, np.float32).reshape(f, -1)
    w = q.astype(np.float32) * np.tile(s, (1, k // s.shape[1]))
    w[np.repeat(np.arange(f), k // f), np.arange(k)] += np.asarray(diag, np.float32).reshape(-1)
    return np.asarray(x, np.float32) @ w


def _project(p: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """x @ p["proj"] for float32 rows x [N, F], from the nonzero row blocks when there are any (or the int8
    product when the whiteners are int8)."""
    if "q8" in p:
        return _native.project_q8(x, p["q8"])
    blocks = p["blocks"]
    if not blocks:
        return x @ p["proj"]
    z = np.zeros((x.shape[0], p["proj"].shape[1]), np.float32)
    for r0, r1, end, b in blocks:
        z[:, :end] += x[:, r0:r1] @ b
    return z


def _mahalanobis_family(a: Mapping[str, np.ndarray], feats: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(min_c squared distance to the class means [N], rel_mahalanobis score [N] or None), float32 math
    from the prepared arrays, float64 out: after the projection, the native kernel when the extension is built
    (edge_quq.framekernels.mahalanobis), _mahalanobis_numpy, its reference, otherwise."""
    p = _prepare_mahalanobis(a)
    z = _project(p, np.asarray(feats, np.float32))
    if _native.available() and z.shape[0]:
        return _native.mahalanobis(z, p["center"], p["means2"], p["msq"], p.get("center0"), p.get("between"))
    return _mahalanobis_numpy(p, z)


def _mahalanobis_row(a: Mapping[str, np.ndarray], feats: np.ndarray) -> Tuple[float, Optional[float]]:
    """_mahalanobis_family of one row feats float32 [1, F], as floats: the native kernel's one-row mode, which
    needs no output arrays, when it takes the projected row."""
    p = _prepare_mahalanobis(a)
    z = _project(p, feats)
    one = _native.mahalanobis_row(z, p["center"], p["means2"], p["msq"], p.get("center0"), p.get("between")) \
        if _NATIVE_FRAME else None
    if one is not None:
        return one
    d, rel = _mahalanobis_family(a, feats)
    return d.item(0), None if rel is None else rel.item(0)


def _mahalanobis_numpy(p: Mapping[str, np.ndarray], z: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """_mahalanobis_family's distances from the projected rows z [N, F] (or [N, 2F], class and global columns
    interleaved, with "center0"; or with the low-rank background "between", _prepared_background) in numpy: the
    definition, and the native kernel's reference."""
    zc = z[:, 0::2] - p["center"] if "center0" in p else z - p["center"]
    c = len(p["msq"]) - ("between" in p)
    # ufunc reductions, not .min()/.sum(): no Python wrapper per call on the per-frame path
    dots = zc @ p["means2"]
    d = np.maximum(np.minimum.reduce(np.add.reduce(zc * zc, axis=1)[:, None] - dots[:, :c] + p["msq"][:c], axis=1), 0.0)
    if "between" in p:
        e = np.minimum.reduce(p["msq"][:c] - dots[:, :c], axis=1) - (p["msq"][c] - dots[:, c])
        u = zc @ p["between"][:-1] + p["between"][-1]
        return d.astype(np.float64), (e + np.add.reduce(u * u, axis=1)).astype(np.float64)
    if "center0" not in p:
        return d.astype(np.float64), None
    g = z[:, 1::2] - p["center0"]
    return d.astype(np.float64), (d - np.add.reduce(g * g, axis=1)).astype(np.float64)


def _score_mahalanobis(a, cfg, feats, head, logits=None) -> np.ndarray:
    return _mahalanobis_family(a, feats)[0]


def _fit_rel_mahalanobis(feats, labels, head, rng, ridge: float = 1e-6) -> Dict[str, np.ndarray]:
    out = _fit_mahalanobis(feats, labels, head, rng, ridge)
    out.update(_background(out["whitener"], feats, labels, head.num_classes))
    return out


def _background(a: np.ndarray, feats: np.ndarray, labels: np.ndarray, num_classes: int) -> Dict[str, np.ndarray]:
    """rel_mahalanobis' background Gaussian in the class whitener a's coordinates: its mean `mean0_w` [1, F] and
    `between_w` [F, R] with |(x - mu0) Sigma0^-1 (x - mu0)| = |w|^2 - |w between_w|^2, w = (x - mu0) @ a.
    Why: the data's covariance is the within-class one plus the between-class scatter U U^T, U [F, <= C] (exact, both
    by count), so by Woodbury the background distance costs the class projection (already made) plus an F x R
    product, R < C, instead of a second F x F whitener: half the bytes and the multiply-adds a frame reads at
    large F. The class whitener's ridge is the background's too. a is the whitener as scored (dequantised int8)."""
    a = np.asarray(a, np.float64)
    mu0 = feats.mean(axis=0)
    means = _class_means(feats, labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    present = counts > 0
    u = (means[present] - mu0).T * np.sqrt(counts[present] / len(feats))  # [F, C'], U U^T = between-class scatter
    p, sv, _ = np.linalg.svd(a.T @ u, full_matrices=False)  # whitened: V = a^T U = P S Q^T
    r = max(int(np.sum(sv > sv[:1].max(initial=0.0) * max(u.shape) * np.finfo(np.float64).eps)), 1)
    # V (I + V^T V)^-1 V^T = P diag(s^2 / (1 + s^2)) P^T
    between = p[:, :r] * (sv[:r] / np.sqrt(1.0 + sv[:r] ** 2)) if sv.size else np.zeros((a.shape[0], 1))
    return {"mean0_w": (mu0 @ a)[None, :], "between_w": between}


def _score_rel_mahalanobis(a, cfg, feats, head, logits=None) -> np.ndarray:
    return _mahalanobis_family(a, feats)[1]


def _fit_knn(feats, labels, head, rng, k: int = 10, bank_size: int = 2048) -> Dict[str, np.ndarray]:
    if k < 1 or bank_size < k:
        raise OptionError(f"knn needs 1 <= k <= bank_size, got k={k}, bank_size={bank_size}")
    n = len(feats)
    idx = np.sort(rng.choice(n, min(bank_size, n), replace=False))
    return {"bank": l2_normalise(feats[idx])}


def _knn_bank(a: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, Union[float, np.ndarray]]:
    """(the bank as held, its scale): int8 [B, F] with its "bank.scale" when stored int8 (_INT8_KEPT: float32 [B],
    one per row, or a float from a file before version 4), float16 as held (_F16_KEPT) or else float32 [B, F] with
    1.0."""
    b = a["bank"]
    if b.dtype == np.int8:
        s = a["bank.scale"]
        return np.ascontiguousarray(b), float(s[0]) if s.size == 1 else s
    if b.dtype == np.float16 and _native.dots_f16():
        return np.ascontiguousarray(b), 1.0
    return np.ascontiguousarray(b, np.float32), 1.0  # no copy for a loaded bank (the kernel takes C order)


def _dequantized_bank(a: Mapping[str, np.ndarray]) -> np.ndarray:
    """The bank as float32 [B, F]: an int8 one times its scale, as a float32 bank was decoded before int8 stayed; a
    float16 one widened."""
    b, scale = _knn_bank(a)
    if b.dtype != np.int8:
        return b.astype(np.float32, copy=False)
    return b.astype(np.float32) * (np.float32(scale) if isinstance(scale, float) else scale[:, None])


def _prepare_knn(a: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """kNN's scoring arrays, made once per detector: as held for the native kernel, which reads an int8 bank as
    it is (a quarter of float32's bytes per frame), a float16 one too where it reads float16; else the bank
    dequantised or widened, once."""
    b = a["bank"]
    native = b.dtype == np.int8 and _native.dots_available() or b.dtype == np.float16 and _native.dots_f16()
    if native or b.dtype not in (np.int8, np.float16):
        return dict(a)
    return {"bank": _dequantized_bank(a)}


def _knn_kth_numpy(feats: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """float32 [N]: the k-th largest cosine similarity of rows feats [N, F] to the float32 unit rows bank [B, F]
    (1 <= k <= B): the definition, and the native kernel's reference."""
    sims = l2_normalise(feats).astype(np.float32) @ bank.T  # float32 matmul: the bank is the big array
    return -np.partition(-sims, k - 1, axis=1)[:, k - 1]


def _score_knn(a, cfg, feats, head, logits=None) -> np.ndarray:
    bank, scale = _knn_bank(a)
    k = min(int(cfg["k"]), bank.shape[0])
    if _native.dots_available():
        kth = _native.knn_kth(feats, bank, scale, k)
    else:
        kth = _knn_kth_numpy(feats, _dequantized_bank(a), k)
    return np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))


def _knn_row(a, cfg, feats, head, logits=None) -> float:
    """_score_knn of one row feats float32 [1, F] as a float: the native kernel's one-row mode when it takes it."""
    bank, scale = _knn_bank(a)
    kth = _native.knn_kth_row(feats, bank, scale, min(int(cfg["k"]), bank.shape[0])) if _native.dots_available() else None
    if kth is None:
        return _score_knn(a, cfg, feats, head).item(0)
    return math.sqrt(max(2.0 - 2.0 * kth, 0.0))


def vim_origin(head: HeadWeights) -> np.ndarray:
    """u with u W1 + b1 ~ 0 (least squares): where the first layer's pre-activation vanishes."""
    w1 = head.kernels[0].astype(np.float64)  # [F, H]
    return -np.linalg.pinv(w1.T) @ head.biases[0].astype(np.float64)


def _fit_vim(feats, labels, head, rng, dim: Optional[int] = None) -> Dict[str, np.ndarray]:
    f = feats.shape[1]
    d = f // 2 if dim is None else int(dim)
    if not 0 < d < f:
        raise OptionError(f"vim dim must be in 1..{f - 1} for {f} features, got {d}")
    u = vim_origin(head)
    x = feats - u
    evals, evecs = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(evals)[::-1]
    ns = evecs[:, order[d:]]  # the complement of the top-d principal directions
    resid = np.linalg.norm(x @ ns, axis=1)
    neg_energy = -energy(eval_logits(head, feats), head.activation)
    alpha = float(np.mean(neg_energy) / max(np.mean(resid), 1e-12))
    return {"origin": u, "null_space": ns, "alpha": np.array([alpha])}


def _prepare_vim(a: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """ViM's scoring arrays, made once per detector. For the native kernel: the origin as float32 [F] and the null
    space transposed ("ns_t": its rows are the kernel's dot products), no float64 copy (6.5 MiB at F = 1280, read
    every frame): float32 [D, F], or, stored int8 (_INT8_PER_COLUMN), the int8 rows as held (a view: the loaded null
    space is held column-major, _decode) with their scales "ns_scale" float32 [D], a quarter of float32's bytes.
    For numpy: the origin as a float64 [1, F] row (a frame's one row is then subtracted without a broadcast, which
    cost numpy more than the subtraction), the null space as float64 up to _F64_CACHE_ELEMENTS (its product is
    float64 math; an int8 one dequantised, _vim_null_space). The same stored values either way."""
    ns = a["null_space"]
    if _native.dots_available():
        i8 = ns.dtype == np.int8
        return {**a, "origin": np.ascontiguousarray(a["origin"], np.float32).reshape(-1),
                "ns_t": np.ascontiguousarray(ns.T if i8 or (ns.dtype == np.float16 and _native.dots_f16())
                                             else np.asarray(ns, np.float32).T),
                "ns_scale": np.ascontiguousarray(a["null_space.scale"], np.float32) if i8 else None}
    return {**a, "origin": np.asarray(a["origin"], np.float64).reshape(1, -1),
            "null_space": _vim_null_space(a) if ns.size <= _F64_CACHE_ELEMENTS else ns}


def _vim_null_space(a: Mapping[str, np.ndarray]) -> np.ndarray:
    """ViM's null space [F, D] as float64: an int8 one times its per-column scales (exact in float64)."""
    ns = a["null_space"]
    if ns.dtype == np.int8:
        return ns.astype(np.float64) * np.asarray(a["null_space.scale"], np.float32).astype(np.float64)
    return np.asarray(ns, np.float64)


def _vim_resid_numpy(a: Mapping[str, np.ndarray], feats: np.ndarray) -> np.ndarray:
    """float64 [N]: |(feats - origin) @ null_space| in float64, the definition, and the native kernel's reference;
    an int8 null space (with its "null_space.scale") dequantised first."""
    x = np.asarray(feats, np.float64) - a["origin"]
    ns = a["null_space"]
    # float64 x: a float32 null space (F > 2048, not cached as float64) is widened exactly
    r = x @ (_vim_null_space(a) if ns.dtype == np.int8 else ns)
    # np.linalg.norm(r, axis=1)'s own arithmetic for real rows, without its Python wrapper (a third of the score)
    return np.sqrt(np.add.reduce(r * r, axis=1))


def _score_vim(a, cfg, feats, head, logits=None) -> np.ndarray:
    resid = _native.vim_resid(feats, a["origin"], a["ns_t"], a["ns_scale"]) if "ns_t" in a else _vim_resid_numpy(a, feats)
    return a["alpha"].item(0) * resid + energy(eval_logits(head, feats) if logits is None else logits, head.activation)


def _vim_row_pre(a, cfg, feats) -> Optional[float]:
    """ViM's part of one row that needs no logits: the residual by the native kernel's one-row mode, or None
    when it does not take the row (then _vim_row_post scores the whole row)."""
    return _native.vim_resid_row(feats, a["origin"], a["ns_t"], a["ns_scale"]) if "ns_t" in a else None


def _vim_row_post(a, cfg, resid, feats, head, logits=None) -> float:
    if resid is None:
        return _score_vim(a, cfg, feats, head, logits).item(0)
    lg = eval_logits(head, feats) if logits is None else logits
    return a["alpha"].item(0) * resid + energy(lg, head.activation).item(0)


def _vim_row(a, cfg, feats, head, logits=None) -> float:
    """_score_vim of one row feats float32 [1, F] as a float: the native kernel's one-row mode when it takes it."""
    return _vim_row_post(a, cfg, _vim_row_pre(a, cfg, feats), feats, head, logits)


def _score_gradient(a, cfg, feats, head, logits=None) -> np.ndarray:
    if head.temperature != 1.0:
        # like the other detectors, fitted on the raw head: a temperature set later must not move its threshold
        head = replace(head, temperature=1.0)
    return gradient_scores(head, feats, gradient_settings(cfg))


def gradient_settings(cfg: Mapping[str, Any]) -> GradientSettings:
    """The gradient detector's settings (no perturbations: a detector score must be deterministic)."""
    return GradientSettings(layer_base=float(cfg["layer_base"]), class_weighting=str(cfg["class_weighting"]), perturbations=0)


def gradient_reusable(cfg: Mapping[str, Any], settings: Optional[GradientSettings], head: HeadWeights) -> bool:
    """True when the gradient score computed with `settings` on `head` equals the gradient detector's score,
    so the predictor can pass it in instead of computing it twice."""
    return (settings is not None and settings.perturbations == 0 and head.temperature == 1.0
            and settings.layer_base == float(cfg.get("layer_base", -1)) and settings.class_weighting == cfg.get("class_weighting"))


# Each score function also takes `logits`: eval_logits(head, feats) when the caller already has them (the
# detectors marked here share one head pass per frame instead of one each).
_USES_LOGITS = frozenset(("maxlogit", "energy", "vim"))
# scored together from rel_mahalanobis's one projection when they share the class whitener (_mahalanobis_shared)
_MAHALANOBIS_PAIR = ("mahalanobis", "rel_mahalanobis")
# The Mahalanobis family scores in float32 from arrays prepared once per detector (_prepare_mahalanobis), kNN and
# ViM from theirs (_prepare_knn, _prepare_vim: the native kernels' layouts, or numpy's).
_PREPARED: Dict[str, Callable[[Mapping[str, np.ndarray]], Dict[str, np.ndarray]]] = {
    "mahalanobis": _prepare_mahalanobis, "rel_mahalanobis": _prepare_mahalanobis, "knn": _prepare_knn,
    "vim": _prepare_vim}
# One frame's score as a float, without the arrays of the batched score functions (the row scorer's path).
_ROW: Dict[str, Callable[..., float]] = {"knn": _knn_row, "vim": _vim_row}
# The detectors that use the logits but do most of their work without them: (the part without, the rest given
# its result), so that a predictor can run the first beside the head sampler that computes the logits.
_ROW_SPLIT: Dict[str, Tuple[Callable[..., Any], Callable[..., float]]] = {"vim": (_vim_row_pre, _vim_row_post)}
# The other float32 detector arrays up to this many elements (ViM's origin and null space) are also kept as
# float64 for scoring: their scores are float64 math, and converting the arrays on every frame cost more than
# the matmuls. Beyond this size (F > 2048) they are converted per call.
_F64_CACHE_ELEMENTS = 1 << 22
# The detectors whose whitener may be stored as int8 from INT8_WHITENER_MIN_FEATURES (not every prepared one:
# ViM is prepared too, and has no whitener).
_INT8_WHITENED = frozenset({"mahalanobis", "rel_mahalanobis"})

_IMPL: Dict[str, Tuple[Callable, Callable]] = {
    "maxlogit": (_fit_none, _score_maxlogit),
    "energy": (_fit_none, _score_energy),
    "react": (_fit_react, _score_react),
    "mahalanobis": (_fit_mahalanobis, _score_mahalanobis),
    "rel_mahalanobis": (_fit_rel_mahalanobis, _score_rel_mahalanobis),
    "knn": (_fit_knn, _score_knn),
    "vim": (_fit_vim, _score_vim),
    "gradient": (_fit_none, _score_gradient),
}


def parse_selection(text: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """--detectors: 'gate' -> () (only what the decision needs), 'all' -> every name, 'knn,vim' or
    'gate,knn' (or a list of names) -> those names (on top of what the decision needs), checked;
    OptionError otherwise."""
    words = [w.strip() for w in (text.split(",") if isinstance(text, str) else list(text)) if w.strip()]
    if words == ["all"]:
        return DETECTOR_NAMES
    bad = [w for w in words if w not in DETECTOR_NAMES and w != "gate"]
    if bad or not words:
        raise OptionError(f"--detectors: unknown detector {', '.join(bad) or '(none given)'}; "
                          f"give gate, all or names from {', '.join(DETECTOR_NAMES)}")
    return tuple(n for n in DETECTOR_NAMES if n in words)


def parse_names(text: str) -> List[str]:
    """'mahalanobis,knn' or 'all' -> names, checked."""
    names = list(DETECTOR_NAMES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DETECTOR_NAMES]
    if bad or not names:
        raise OptionError(f"unknown detector {', '.join(bad) or '(none given)'}; choose from {', '.join(DETECTOR_NAMES)} or 'all'")
    return list(dict.fromkeys(names))


class RowScorer:
    """DetectorSet.row_scorer's result: one frame's detector scores as floats, in the set's order.
    `scorer(feats, logits=None)` scores a row; `scorer.with_logits(feats, scorer.without_logits(feats), logits)`
    does the same in two halves, the first of which needs no logits (every detector but maxlogit and energy, and
    ViM's residual): a predictor runs it on a worker thread beside the head sampler (docs/detectors.md)."""

    __slots__ = ("head", "names", "pair", "shared", "early", "pre", "late", "needs_logits", "in_order")

    def __init__(self, head: HeadWeights, names: Tuple[str, ...], pair: Tuple[str, ...], shared: Any,
                 early: Tuple[tuple, ...], late: Tuple[tuple, ...]) -> None:
        """`early`, `late`: (name, row score, arrays, config) of the detectors without and with logits."""
        self.head, self.names, self.pair, self.shared, self.early = head, names, pair, shared, early
        # each late detector as (name, its part without logits or None, the rest given that part's result, ...)
        self.pre = tuple((n, _ROW_SPLIT[n][0], a, cfg) for n, _, a, cfg in late if n in _ROW_SPLIT)
        self.late = tuple((n, _ROW_SPLIT[n][1] if n in _ROW_SPLIT else _ignoring_part(fn), a, cfg) for n, fn, a, cfg in late)
        self.needs_logits = bool(late)
        # `out` below is then in score_all's order already
        self.in_order = names == pair + tuple(r[0] for r in early + late)

    def without_logits(self, feats: np.ndarray) -> Dict[str, Any]:
        """Scores of the detectors that need no logits, and the split ones' first parts (_ROW_SPLIT)."""
        out: Dict[str, Any] = {}
        if self.pair:
            out[self.pair[0]], out[self.pair[1]] = _mahalanobis_row(self.shared, feats)
        for n, fn, a, cfg in self.early:
            out[n] = fn(a, cfg, feats, self.head, None)
        for n, fn, a, cfg in self.pre:
            out[n] = fn(a, cfg, feats)
        return out

    def with_logits(self, feats: np.ndarray, early: Dict[str, Any], logits: Optional[np.ndarray] = None) -> Dict[str, float]:
        """The scores from without_logits' result and the row's eval-mode logits (computed here when None)."""
        out = early
        if self.late:
            if logits is None:
                logits = eval_logits(self.head, feats)
            for n, fn, a, cfg in self.late:
                out[n] = fn(a, cfg, out.get(n), feats, self.head, logits)
        return out if self.in_order else {n: out[n] for n in self.names}

    def __call__(self, feats: np.ndarray, logits: Optional[np.ndarray] = None) -> Dict[str, float]:
        return self.with_logits(feats, self.without_logits(feats), logits)


def _ignoring_part(fn: Callable[..., float]) -> Callable[..., float]:
    """A whole row score in the signature of _ROW_SPLIT's second parts (it has no first part to take)."""
    return lambda a, cfg, part, feats, head, logits: fn(a, cfg, feats, head, logits)


def _row_score(name: str) -> Callable[..., float]:
    """Detector `name`'s score of one row as a float: its own row path (_ROW), or its batched score's one item."""
    row = _ROW.get(name)
    if row is not None:
        return row
    fn = _IMPL[name][1]
    return lambda a, cfg, feats, head, logits: fn(a, cfg, feats, head, logits).item(0)


# --- a fitted set --------------------------------------------------------------------------------------------

@dataclass
class FittedDetector:
    name: str
    config: Dict[str, Any]
    arrays: Dict[str, np.ndarray]  # in memory as loaded (float32 arrays, float64 scalars, int8 whiteners, an int8 kNN bank or ViM null space with its .scale); stored dtype in `dtype`
    threshold: Optional[float] = None
    tpr: Optional[float] = None
    dtype: str = "float32"

    _f64: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _prepared: Optional[Tuple[Tuple[np.ndarray, ...], Dict[str, np.ndarray]]] = field(default=None, init=False, repr=False, compare=False)

    def score(self, feats: np.ndarray, head: HeadWeights, logits: Optional[np.ndarray] = None) -> np.ndarray:
        """Scores [N] of rows feats [N, F]; `logits`: eval_logits(head, feats), when already computed."""
        return _IMPL[self.name][1](self._scoring_arrays(), self.config, _rows(feats), head, logits)

    def _scoring_arrays(self) -> Dict[str, np.ndarray]:
        """`arrays` with the small float32 ones as float64 (same values), converted once per array object;
        the prepared arrays of the detectors in _PREPARED (the Mahalanobis family's float32 ones, ViM's) instead,
        also once per set of array objects."""
        if self.name in _PREPARED:
            key = tuple(self.arrays.values())
            hit = self._prepared
            if hit is None or len(hit[0]) != len(key) or not all(map(operator.is_, hit[0], key)):
                hit = self._prepared = (key, _PREPARED[self.name](self.arrays))
            return hit[1]
        out = {}
        for k, v in self.arrays.items():
            if v.dtype != np.float32 or v.size > _F64_CACHE_ELEMENTS:
                out[k] = v
                continue
            hit = self._f64.get(k)
            if hit is None or hit[0] is not v:
                hit = self._f64[k] = (v, v.astype(np.float64))
            out[k] = hit[1]
        return out

    def flag(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise OptionError(f"detector {self.name!r} has no fitted threshold")
        return np.asarray(scores) > self.threshold

    def nbytes(self) -> int:
        """Bytes of the stored arrays (the file's share, before compression)."""
        dt = _float_storage(self.arrays, self.dtype)
        return int(sum(e.nbytes for k, v in self.arrays.items() for e in _encode(k, v, dt).values()))

    def memory_bytes(self) -> int:
        """Bytes of the arrays as held in memory for scoring."""
        return int(sum(v.nbytes for v in self.arrays.values()))


@dataclass
class DetectorSet:
    detectors: Dict[str, FittedDetector]
    meta: Dict[str, Any] = field(default_factory=dict)
    _shared: Optional[Tuple[Tuple[np.ndarray, ...], bool]] = field(default=None, init=False, repr=False, compare=False)

    @property
    def names(self) -> List[str]:
        return list(self.detectors)

    def with_threshold(self) -> List[str]:
        return [n for n, d in self.detectors.items() if d.threshold is not None]

    def subset(self, names: Sequence[str]) -> "DetectorSet":
        """The detectors of `names` this set has, in the set's order (the same FittedDetector objects)."""
        return DetectorSet({n: d for n, d in self.detectors.items() if n in names}, self.meta)

    def score_all(self, feats: np.ndarray, head: HeadWeights, given: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
        """Every detector's scores [N] for rows feats [N, F]; `given` holds scores already computed elsewhere
        (the predictor's gradient score), used instead of computing them again."""
        feats = _rows(feats)
        out = {n: np.asarray(v, np.float64).reshape(-1) for n, v in given.items()} if given else {}
        logits = eval_logits(head, feats) if not _USES_LOGITS.isdisjoint(self.detectors.keys() - out.keys()) else None
        if self._mahalanobis_shared() and "mahalanobis" not in out and "rel_mahalanobis" not in out:
            # both from rel_mahalanobis's one projection: its class part is mahalanobis itself
            out.update(zip(_MAHALANOBIS_PAIR, _mahalanobis_family(self.detectors["rel_mahalanobis"]._scoring_arrays(), feats)))
        return {n: out[n] if n in out else d.score(feats, head, logits) for n, d in self.detectors.items()}

    def row_scorer(self, head: HeadWeights) -> "RowScorer":
        """A function of one row feats float32 [1, F] (and optionally its eval-mode logits [1, C], which the
        head sampler has already computed: the head pass they cost was a tenth of a frame's overhead) giving
        score_all's scores as floats (scores.row_scores of them): the same score functions on the same arrays,
        with what score_all works out on every call (which detectors share the head pass, the Mahalanobis pair's
        one projection, each detector's scoring arrays) resolved here, once. A predictor's per-frame path: on one
        frame those checks were a fifth of the detectors' cost. It scores with the arrays as they are now: build
        it again after replacing any. Its two halves, `without_logits` and `with_logits`, let a caller run the
        first while the logits are computed on another thread (RowScorer)."""
        names = tuple(self.detectors)
        pair = _MAHALANOBIS_PAIR if self._mahalanobis_shared() else ()
        shared = self.detectors[pair[1]]._scoring_arrays() if pair else None
        early, late = [], []  # (name, fn, arrays, config): before the logits are known, and after
        for n, d in self.detectors.items():
            if n in pair:
                continue
            item = (n, _row_score(n), d._scoring_arrays(), d.config)
            (late if n in _USES_LOGITS else early).append(item)
        return RowScorer(head, names, pair, shared, tuple(early), tuple(late))

    def _mahalanobis_shared(self) -> bool:
        """True when mahalanobis and rel_mahalanobis hold the same class whitener and means (as fitted
        together), checked once per set of array objects."""
        m, r = self.detectors.get("mahalanobis"), self.detectors.get("rel_mahalanobis")
        if m is None or r is None:
            return False
        ma, ra = m.arrays, r.arrays
        names = ("whitener", "means_w", "whitener_scale", "whitener_diag")
        key = tuple(d.get(k) for d in (ma, ra) for k in names)
        if self._shared is None or not all(map(operator.is_, self._shared[0], key)):
            same = all(ma.get(k) is None and ra.get(k) is None or ma.get(k) is not None and ra.get(k) is not None
                       and np.array_equal(ma[k], ra[k], equal_nan=ma[k].dtype.kind == "f") for k in names)
            self._shared = (key, same)
        return self._shared[1]

    def flags(self, scores: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Per detector with a threshold (and a score in `scores`): [N] bool, score > threshold."""
        return {n: self.detectors[n].flag(scores[n]) for n in self.with_threshold() if n in scores}

    # -- storage ----------------------------------------------------------------------------------------------
    def to_arrays(self) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        dets = {}
        for n, d in self.detectors.items():
            for k, v in d.arrays.items():
                out.update(_encode(f"{n}/{k}", v, _float_storage(d.arrays, d.dtype)))
            dets[n] = {"config": d.config, "threshold": d.threshold, "tpr": d.tpr, "dtype": d.dtype}
        meta = dict(self.meta, format=FORMAT_NAME, version=self.file_version(), detectors=dets)
        out["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8"), np.uint8)
        return out

    def file_version(self) -> int:
        """The detectors file version this set needs: 1 (what every edge-quq reads), 2 with int8 whiteners, 3 with an
        int8 ViM null space, 4 with a low-rank background or a kNN bank scaled per row (FILE_VERSION's list), so
        that an older edge-quq refuses only what it cannot read."""
        arrs = [d.arrays for d in self.detectors.values()]
        if any("between_w" in a or np.size(a.get("bank.scale", ())) > 1 for a in arrs):
            return 4
        if any(v.dtype == np.int8 and k in _INT8_PER_COLUMN for a in arrs for k, v in a.items()):
            return 3
        return 2 if any(_prequantized(a) for a in arrs) else 1

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], where: str) -> "DetectorSet":
        if "meta" not in arrays:
            raise BundleError(f"{where}: not an edge-quq detectors file (no meta record)")
        raw = np.asarray(arrays["meta"])
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise BundleError(f"{where}: detectors meta record must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
        try:
            meta = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise BundleError(f"{where}: detectors meta record is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not an edge-quq detectors file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        version = meta.get("version")
        if not isinstance(version, int) or version < 1 or version > FILE_VERSION:
            raise BundleError(f"{where}: detectors file version {version!r} is not supported (this edge-quq reads 1..{FILE_VERSION}); refit or upgrade")
        dets: Dict[str, FittedDetector] = {}
        recs = meta.get("detectors", {})
        if not isinstance(recs, dict):
            raise BundleError(f"{where}: detectors meta record: 'detectors' must be an object")
        for n in sorted(recs, key=lambda k: DETECTOR_NAMES.index(k) if k in DETECTOR_NAMES else -1):
            d = recs[n]
            if n not in _IMPL:
                raise BundleError(f"{where}: unknown detector {n!r}")
            if not isinstance(d, dict) or not isinstance(d.get("config", {}), dict):
                raise BundleError(f"{where}: detector {n!r}: meta record must be an object with an object 'config'")
            thr, tpr, dtype = d.get("threshold"), d.get("tpr"), d.get("dtype", "float32")
            for key, v in (("threshold", thr), ("tpr", tpr)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
                    raise BundleError(f"{where}: detector {n!r}: {key} must be a finite number or null, got {v!r}")
            if dtype not in ("int8", "float16", "float32"):
                raise BundleError(f"{where}: detector {n!r}: dtype {dtype!r} is not one of int8, float16, float32")
            arrs = _decode_detector(arrays, f"{n}/", where)
            dets[n] = FittedDetector(n, dict(d.get("config", {})), arrs, None if thr is None else float(thr), tpr, dtype)
        meta = {k: v for k, v in meta.items() if k != "detectors"}
        return cls(dets, meta)


def _prequantized(arrs: Mapping[str, np.ndarray]) -> bool:
    """True for arrays quantised at fit (int8 whiteners with their scales), not by the storage dtype (an int8 kNN
    bank or ViM null space held as stored, _INT8_KEPT, is the storage dtype's)."""
    return any(k in _WHITENERS and v.dtype == np.int8 for k, v in arrs.items())


def _float_storage(arrs: Mapping[str, np.ndarray], dtype: str) -> str:
    """The storage dtype of a detector's float arrays: its dtype, float32 beside int8 whiteners (their scales,
    diagonals and whitened means keep full precision)."""
    return "float32" if _prequantized(arrs) else dtype


def _encode(key: str, v: np.ndarray, dtype: str) -> Dict[str, np.ndarray]:
    """Stored arrays of array `key` of a detector stored as `dtype`: int8 ones as they are (quantised at fit, an int8
    whitener scaled by its own arrays, or held as stored, _INT8_KEPT, with their .scale, also stored as it is); with
    "int8" the _INT8_KEPT arrays quantised and the detector's other arrays float32; else `dtype`. Scalars (alpha,
    clip) stay float64: they cost nothing and set thresholds' units."""
    if v.dtype == np.int8 or key.endswith(".scale"):
        return {key: np.ascontiguousarray(v)}  # written row-major whatever the layout held (_decode)
    v = np.asarray(v, np.float64)
    name = key.rsplit("/", 1)[-1]
    if dtype == "int8" and name in _INT8_PER_COLUMN:  # the fit quantises it against its rows instead (quantize_null_space)
        q, scale = _quantize_rows(v.T)
        return {key: np.ascontiguousarray(q.T), f"{key}.scale": scale}
    if dtype == "int8" and name in _INT8_PER_ROW:
        q, scale = _quantize_rows(v)
        return {key: q, f"{key}.scale": scale}
    if dtype == "int8" and name in _INT8_KEPT:
        scale = max(float(np.max(np.abs(v))), 1e-30) / 127.0
        return {key: np.round(v / scale).astype(np.int8), f"{key}.scale": np.array([scale], np.float64)}
    # row-major, also for a float16 null space held column-major (_decode)
    return {key: np.ascontiguousarray(v, np.float64 if v.size == 1 else np.dtype("float32" if dtype == "int8" else dtype))}


def _decode(arrays: Mapping[str, np.ndarray], key: str, where: str = "detectors") -> np.ndarray:
    """Stored array -> the in-memory form the scores use: float32 for arrays (half the memory of float64 on
    the board), float64 for scalars, an int8 kNN bank or ViM null space as stored (_INT8_KEPT: a quarter of float32's
    memory; the null space column-major, so that its transpose, the kernel's rows, is a view; float16 ones as stored
    when the kernel reads them, _F16_KEPT). A stored array that
    is not a real number array, or an int8 one without its finite scales (one, or one per column for
    _INT8_PER_COLUMN; > 0 for a kept array), is refused with one line."""
    v = np.asarray(arrays[key])
    name = key.rsplit("/", 1)[-1]
    if v.dtype.kind not in "fi":
        raise BundleError(f"{where}: {key} has dtype {v.dtype}, not a number array")
    if v.dtype == np.float16 and name in _F16_KEPT and _native.dots_f16():
        return np.asfortranarray(v) if name in _INT8_PER_COLUMN else np.ascontiguousarray(v)
    if v.dtype == np.int8 and name in _WHITENERS and f"{key}.scale" not in arrays:
        return np.ascontiguousarray(v)  # an int8 whitener stays int8 (its scales: detector_store.check_arrays)
    if v.dtype == np.int8:
        scale = np.asarray(arrays.get(f"{key}.scale", np.zeros(0)))
        count = v.shape[1] if name in _INT8_PER_COLUMN and v.ndim == 2 else 1
        counts = {count, v.shape[0]} if name in _INT8_PER_ROW and v.ndim == 2 else {count}
        if scale.dtype.kind != "f" or scale.size not in counts or not np.isfinite(scale).all():
            what = (f"{count} finite numbers (one per column)" if name in _INT8_PER_COLUMN else
                    f"{v.shape[0]} finite numbers (one per row) or one" if name in _INT8_PER_ROW else "one finite number")
            raise BundleError(f"{where}: {key} is int8 but {key}.scale is not {what}")
        if name in _INT8_KEPT:
            if not (scale > 0).all():  # kNN's kernel keeps the k largest of the unscaled products
                raise BundleError(f"{where}: {key} is int8 but {key}.scale is not > 0")
            return np.asfortranarray(v) if name in _INT8_PER_COLUMN else np.ascontiguousarray(v)
        v = v.astype(np.float32) * np.float32(scale.reshape(-1)[0])
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(v, np.float64 if v.size == 1 else np.float32)


def _decode_detector(arrays: Mapping[str, np.ndarray], prefix: str, where: str = "detectors") -> Dict[str, np.ndarray]:
    """One detector's arrays in memory from the stored ones named prefix + key: each _decode'd, and the scales of
    one held int8 ("bank.scale" beside an int8 "bank": float32 [B], or float64 [1] before version 4;
    "null_space.scale": float32 [D]) under that name too."""
    out: Dict[str, np.ndarray] = {}
    for k in arrays:
        if k.startswith(prefix) and not k.endswith(".scale"):
            v = out[k[len(prefix):]] = _decode(arrays, k, where)
            name = k.rsplit("/", 1)[-1]
            if v.dtype == np.int8 and name in _INT8_KEPT:
                one = np.size(arrays[f"{k}.scale"]) == 1 and name not in _INT8_PER_COLUMN
                out[k[len(prefix):] + ".scale"] = np.asarray(arrays[f"{k}.scale"], np.float64 if one else np.float32).reshape(-1)
    return out


def _roundtrip(arrs: Dict[str, np.ndarray], dtype: str) -> Dict[str, np.ndarray]:
    """arrs as stored with `dtype` and loaded back."""
    enc: Dict[str, np.ndarray] = {}
    for k, v in arrs.items():
        enc.update(_encode(k, v, _float_storage(arrs, dtype)))
    return _decode_detector(enc, "")


def fit_threshold(id_scores: np.ndarray, tpr: float) -> float:
    """The score below or at which `tpr` of the held-out ID samples fall (they are kept; above is flagged)."""
    if not 0.0 < tpr < 1.0:
        raise OptionError(f"ID true-positive rate must be in (0, 1), got {tpr}")
    return float(np.quantile(np.asarray(id_scores, np.float64), tpr, method="higher"))


def _choose_storage(n: str, arrs: Dict[str, np.ndarray], cfg: Dict[str, Any], head: HeadWeights, hold: np.ndarray,
                    fit_rows: Tuple[np.ndarray, np.ndarray], dtypes: Sequence[str], tolerance: float,
                    tpr: Optional[float]) -> Tuple[str, Dict[str, np.ndarray]]:
    """(dtype, arrays as stored and loaded) of detector n: the first of `dtypes` whose held-out scores stay within
    `tolerance` of the fitted arrays' (fit_detectors), float32 when none does."""
    chosen, chosen_arrs = "float32", _roundtrip(arrs, "float32")
    if not any(np.size(v) > 1 for v in arrs.values()):
        return chosen, chosen_arrs
    refs: Dict[Callable, Tuple[np.ndarray, float]] = {}
    for dt in dtypes:
        check = _IMPL[n][1]
        if dt == "int8" and n in _INT8_WHITENED and hold.shape[1] >= INT8_WHITENER_MIN_FEATURES:
            trial = _roundtrip(_int8_mahalanobis(arrs, *fit_rows, head.num_classes), dt)
            # Judged on the class distance both detectors share, so the pair decides alike and keeps one
            # projection. rel_mahalanobis' background is a low-rank term on that projection (_background), recomputed
            # from the int8 whitener, so its two distances round alike (docs/detectors.md); its threshold and the
            # gate's calibration come from the int8 scores, so its flags keep their stated rates.
            check = _score_mahalanobis
        elif dt == "int8" and n == "vim":
            # quantised against the fit rows (quantize_null_space), judged on the score like the other dtypes
            q, scale = quantize_null_space(arrs["null_space"], fit_rows[0] - arrs["origin"])
            trial = _roundtrip({**arrs, "null_space": q, "null_space.scale": scale}, dt)
        elif dt == "int8" and n != "knn":
            continue  # int8 only for the bank of unit vectors, whose range is known, ViM's null space and large whiteners
        else:
            trial = _roundtrip(arrs, dt)
        if check not in refs:
            r = check(arrs, cfg, hold, head)
            refs[check] = (r, fit_threshold(r, tpr) if tpr is not None else float(np.quantile(r, 0.95)))
        ref, thr = refs[check]
        s = check(trial, cfg, hold, head)
        if _decisions_kept(s, ref, thr, tolerance) and np.max(np.abs(s - ref)) <= 50.0 * tolerance * max(float(np.std(ref)), 1e-12):
            return dt, trial
    return chosen, chosen_arrs


def _decisions_kept(s: np.ndarray, ref: np.ndarray, thr: float, tolerance: float) -> bool:
    """True when scores s, from stored arrays, flip the decision `> thr` of at most `tolerance` of the held-out
    scores ref plus one. Why the one: the threshold is one of the held-out scores, so its own sample sits on the
    boundary and flips with any perturbation half of the time; the board's threshold is fitted afterwards on the
    stored scores, so that flip is not a decision the board makes."""
    return float(np.mean((s > thr) != (ref > thr))) <= tolerance + 1.0 / len(ref)


def fit_detectors(feats: np.ndarray, labels: np.ndarray, head: HeadWeights, names: Sequence[str] = DEFAULT_DETECTORS,
                  *, seed: int = 0, tpr: Optional[float] = 0.95, holdout: float = 0.1,
                  config: Optional[Mapping[str, Mapping[str, Any]]] = None, dtypes: Sequence[str] = ("int8", "float16", "float32"),
                  tolerance: float = 0.002) -> DetectorSet:
    """Fit `names` on ID features [N, F] with labels [N] (true labels, or the head's own predictions).

    A seeded `holdout` share of the samples is kept out of the fit and used for the thresholds (a KNN bank
    point is its own nearest neighbour; class statistics fit their own samples too well) and for the
    storage check: each detector is stored in the first of `dtypes` whose held-out scores move the
    threshold decision for at most `tolerance` of the samples plus one (the threshold is a held-out score, and its own
    sample flips with any perturbation) and shift no score by more than 50 * tolerance of the score's spread (10% at the default; tolerance=1 accepts the first dtype). int8 applies to the KNN
    bank, to ViM's null space (one scale per column; its origin then stays float32) and, from
    INT8_WHITENER_MIN_FEATURES features, to the Mahalanobis family's whiteners (quantised here, judged on the class
    distance: _choose_storage). Deterministic for a seed.
    """
    feats = np.asarray(feats, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if feats.ndim != 2 or feats.shape[1] != head.feature_size:
        raise OptionError(f"features must be [N, {head.feature_size}], got {list(feats.shape)}")
    if len(labels) != len(feats):
        raise OptionError(f"{len(feats)} feature rows but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= head.num_classes):
        raise OptionError(f"labels must be in 0..{head.num_classes - 1}")
    if not 0.0 < holdout < 0.9:
        raise OptionError(f"holdout share must be in (0, 0.9), got {holdout}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(feats))
    n_hold = max(int(round(holdout * len(feats))), 1)
    if len(feats) - n_hold < 2 * feats.shape[1]:
        raise OptionError(f"{len(feats)} samples are too few to fit detectors on {feats.shape[1]} features")
    hold, fit = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    names = parse_names(",".join(names))
    cfg_all = {n: dict(DEFAULTS[n], **dict((config or {}).get(n, {}))) for n in names}
    dets: Dict[str, FittedDetector] = {}
    for n in names:
        cfg = cfg_all[n]
        fit_fn, score_fn = _IMPL[n]
        arrs = fit_fn(feats[fit], labels[fit], head, np.random.default_rng([seed, DETECTOR_NAMES.index(n)]), **cfg)
        if n == "vim" and cfg.get("dim") is None:
            cfg["dim"] = feats.shape[1] - arrs["null_space"].shape[1]
        chosen, chosen_arrs = _choose_storage(n, arrs, cfg, head, feats[hold], (feats[fit], labels[fit]), dtypes,
                                              tolerance, tpr)
        # the threshold is fitted on the scores as the board will compute them (stored precision)
        final = score_fn(chosen_arrs, cfg, feats[hold], head)
        thr = fit_threshold(final, tpr) if tpr is not None else None
        dets[n] = FittedDetector(n, cfg, chosen_arrs, thr, tpr, chosen)
    meta = {"feature_size": int(feats.shape[1]), "num_classes": head.num_classes, "seed": int(seed),
            "fit_samples": int(len(fit)), "threshold_samples": int(len(hold)), "tpr": tpr}
    return DetectorSet(dets, meta)
