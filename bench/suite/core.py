"""Shared pieces of the benchmark suite: features once per image set, batched MC head, per-sample scores.

Everything here is pure numpy on top of the runtime package, so the same code serves Fashion-MNIST and
CIFAR-100: the int8 backbone runs once per image set, the head is sampled in batch (T masks per sample,
drawn independently per sample, the distribution the device's samplers draw from), and every uncertainty
score is an entry of a dict name -> per-sample array oriented "higher = trust less". Adding a score (issue
9's feature-space detectors, say) is one more entry: every table and figure iterates over that dict.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np

from edge_quq.analytic import probit_moments, relu_moments, dropout_moments
from edge_quq.decision import decide_states, interval_states, predicted_labels
from edge_quq.gradients import GradientSettings, class_weights, layer_weights
from edge_quq.head import HeadWeights, output_activation

_EPS = 1e-12


# --- progress -----------------------------------------------------------------------------------------------

class Progress:
    """tqdm when installed, else a one-line counter on stderr; silent when quiet."""

    def __init__(self, total: int, desc: str, quiet: bool = False) -> None:
        self.total, self.desc, self.quiet, self.n = total, desc, quiet, 0
        self._bar = None
        self._t0 = time.time()
        if not quiet:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif not self.quiet:
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} ({time.time() - self._t0:.0f} s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet:
            sys.stderr.write("\n")


# --- backbone features --------------------------------------------------------------------------------------

def model_input(x_u8: np.ndarray, bundle) -> np.ndarray:
    """uint8 images -> the bundle's float32 model input; vectorised when the images already have the
    input size and only need scaling (Fashion-MNIST), the project's per-image preprocessing otherwise."""
    h, w, c = bundle.input.shape
    p = bundle.input.preprocess
    x = x_u8[..., None] if x_u8.ndim == 3 else x_u8
    if x.shape[1:] == (h, w, c) and p.crop_fraction == 1.0 and (c == 1 or p.color == "rgb"):
        mean = np.asarray(p.mean, np.float32)
        std = np.asarray(p.std, np.float32)
        return ((x.astype(np.float32) * np.float32(p.pixel_scale) - mean) / std).astype(np.float32)
    from edge_quq_export.datasets import preprocess_array

    return preprocess_array(x, (h, w, c), p, "benchmark images")


def backbone_features(backbone, bundle, x_u8: np.ndarray, batch: int = 500, progress: Optional[Progress] = None) -> np.ndarray:
    out = []
    for i in range(0, len(x_u8), batch):
        out.append(backbone(model_input(x_u8[i : i + batch], bundle)))
        if progress is not None:
            progress.update(min(batch, len(x_u8) - i))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, bundle.head.feature_size), np.float32)


# --- batched MC head ------------------------------------------------------------------------------------------

def mc_probs(head: HeadWeights, feats: np.ndarray, t: int, rng: np.random.Generator, chunk: int = 1000) -> np.ndarray:
    """[N, T, C] output probabilities of T dropout samples per feature vector (independent masks per sample)."""
    n, f = feats.shape
    out = np.empty((n, t, head.num_classes), np.float32)
    for s in range(0, n, chunk):
        x = feats[s : s + chunk]
        k = len(x)
        rows = np.repeat(x, t, axis=0)
        masks = []
        fan_in = f
        for rate, w in zip(head.rates, head.kernels):
            masks.append((rng.random((k * t, fan_in), dtype=np.float32) >= np.float32(rate)).astype(np.float32) if rate > 0 else None)
            fan_in = w.shape[1]
        out[s : s + k] = head.probs(rows, masks).reshape(k, t, -1)
    return out


def entropy_rows(p: np.ndarray, activation: str) -> np.ndarray:
    """Entropy over the last axis: Shannon for softmax, sum of per-class binary entropies otherwise."""
    p = np.asarray(p, np.float64)
    pc = np.clip(p, _EPS, 1.0)
    if activation == "softmax":
        return -np.sum(pc * np.log(pc), axis=-1)
    qc = np.clip(1.0 - p, _EPS, 1.0)
    return -np.sum(pc * np.log(pc) + qc * np.log(qc), axis=-1)


@dataclass
class HeadRun:
    """One image set through the head: MC samples, eval-mode outputs and closed-form moments."""

    probs: np.ndarray  # [N, T, C] MC samples
    det_logits: np.ndarray  # [N, C] eval-mode logits
    det_probs: np.ndarray  # [N, C]
    an_mean: np.ndarray  # [N, C] closed-form MC mean
    an_std: np.ndarray  # [N, C]
    gradient: np.ndarray  # [N] closed-form head gradient score
    extra: Dict[str, np.ndarray] = field(default_factory=dict)  # more per-sample scores (e.g. detectors)

    def moments(self, t: int) -> tuple:
        """(mean, std, expected entropy) from the first t samples: the T-grid reuses one draw of max(T)."""
        p = self.probs[:, :t].astype(np.float64)
        return p.mean(axis=1), p.std(axis=1), None

    def expected_entropy(self, t: int, activation: str) -> np.ndarray:
        return entropy_rows(self.probs[:, :t], activation).mean(axis=1)


def analytic_moments(head: HeadWeights, feats: np.ndarray) -> tuple:
    """Closed-form MC-dropout mean/std of the outputs for rows of feats (edge_quq.analytic, batched).
    Sigmoid heads use the same probit formulas as AnalyticSampler; other activations fall back to the
    logit moments pushed through the activation at the mean (reported as such)."""
    m = feats.astype(np.float64)
    v = np.zeros_like(m)
    n = len(head.kernels)
    for i, (k, b, p) in enumerate(zip(head.kernels, head.biases, head.rates)):
        m, v = dropout_moments(m, v, float(p))
        m = (m.astype(np.float32) @ k).astype(np.float64) + b
        v = (v.astype(np.float32) @ np.square(k)).astype(np.float64)
        if i < n - 1:
            m, v = relu_moments(m, v)
    t = float(head.temperature)
    m, v = m / t, v / (t * t)
    if head.activation == "sigmoid":
        mean, var = probit_moments(m, v)
        return mean, np.sqrt(var)
    return output_activation(m, head.activation), np.sqrt(np.maximum(v, 0.0))


def gradient_scores(head: HeadWeights, feats: np.ndarray, settings: GradientSettings = GradientSettings(), chunk: int = 1000) -> np.ndarray:
    """edge_quq.gradients.gradient_score for many feature vectors at once (no input perturbations)."""
    om = layer_weights(len(head.kernels), settings.layer_base)
    out = np.empty(len(feats))
    nl = len(head.kernels)
    for s in range(0, len(feats), chunk):
        a = feats[s : s + chunk].astype(np.float64)
        inputs, pre = [], []
        for i in range(nl):
            inputs.append(a)
            z = a @ head.kernels[i].astype(np.float64) + head.biases[i]
            pre.append(z)
            a = np.maximum(z, 0.0) if i < nl - 1 else z
        p = head.probs(feats[s : s + chunk]).astype(np.float64)
        zl = pre[-1]
        c = zl.shape[1]
        po = output_activation(zl, head.activation)
        if head.activation == "softmax":
            g = np.eye(c)[None] - po[:, None, :]
        elif head.activation == "sigmoid":
            g = np.eye(c)[None] * (1.0 - po)[:, None, :]
        else:
            g = np.broadcast_to(np.eye(c), (len(zl), c, c)).copy()
        norms = np.empty((len(zl), nl, c))
        for i in range(nl - 1, -1, -1):
            norms[:, i] = np.linalg.norm(g, axis=2) * np.sqrt(np.sum(inputs[i] ** 2, axis=1) + 1.0)[:, None]
            if i > 0:
                g = (g @ head.kernels[i].T.astype(np.float64)) * (pre[i - 1] > 0.0)[:, None, :]
        cw = np.stack([class_weights(row, settings.class_weighting) for row in p])
        out[s : s + chunk] = np.einsum("l,nlc,nc->n", om, norms, cw)
    return out


def run_head(head: HeadWeights, feats: np.ndarray, t: int, seed: int, detectors=None) -> HeadRun:
    rng = np.random.default_rng(seed)
    det_logits = head.logits(feats).astype(np.float64)
    an_mean, an_std = analytic_moments(head, feats)
    extra: Dict[str, np.ndarray] = {}
    if detectors is not None:
        for name, det in detectors.detectors.items():
            if name != "gradient":  # the head gradient is already a column of its own (batched here)
                extra[f"det_{name}"] = np.asarray(det.score(feats, head), np.float64)
    return HeadRun(
        probs=mc_probs(head, feats, t, rng),
        det_logits=det_logits,
        det_probs=head.probs_from_logits(det_logits),
        an_mean=an_mean,
        an_std=an_std,
        gradient=gradient_scores(head, feats),
        extra=extra,
    )


# --- scores (higher = trust less) -----------------------------------------------------------------------------

def energy_rows(z: np.ndarray, activation: str) -> np.ndarray:
    z = np.asarray(z, np.float64)
    if activation == "softmax":
        m = z.max(axis=1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return -np.sum(np.logaddexp(0.0, z), axis=1)


def score_dict(run: HeadRun, t: int, activation: str) -> Dict[str, np.ndarray]:
    """Every per-sample uncertainty score, "higher = trust less", at T = t."""
    mean, std, _ = run.moments(t)
    pred = np.argmax(mean, axis=1)
    idx = np.arange(len(mean))
    pe = entropy_rows(mean, activation)
    an_pred = np.argmax(run.an_mean, axis=1)
    scores = {
        "max_prob_plain": -run.det_probs.max(axis=1),
        "max_prob_mc": -mean.max(axis=1),
        "entropy_mc": pe,
        "mc_std": std[idx, pred],
        "mean_variance": np.mean(std ** 2, axis=1),
        "mutual_information": np.maximum(pe - run.expected_entropy(t, activation), 0.0),
        "energy": energy_rows(run.det_logits, activation),
        "analytic_max_prob": -run.an_mean.max(axis=1),
        "analytic_std": run.an_std[idx, an_pred],
        "gradient": run.gradient,
    }
    scores.update(run.extra)
    return scores


SCORE_LABELS = {
    "max_prob_plain": "max prob (plain int8, no dropout)",
    "max_prob_mc": "max prob (MC mean)",
    "entropy_mc": "predictive entropy (MC mean)",
    "mc_std": "MC std of the predicted class",
    "mean_variance": "MC variance, mean over classes",
    "mutual_information": "mutual information (MC)",
    "energy": "energy (eval-mode logits)",
    "analytic_max_prob": "max prob (closed-form mean)",
    "analytic_std": "closed-form std of the predicted class",
    "gradient": "head gradient score",
}


def score_predictions(run: HeadRun, t: int) -> Dict[str, np.ndarray]:
    """The label each score's selective classifier predicts: the plain argmax for scores of the plain pass,
    the MC-mean argmax for MC scores, the closed-form mean's argmax for closed-form ones."""
    mc = np.argmax(run.moments(t)[0], axis=1)
    plain = np.argmax(run.det_probs, axis=1)
    an = np.argmax(run.an_mean, axis=1)
    return {"plain": plain, "mc": mc, "analytic": an}


def prediction_of(score: str) -> str:
    if score.startswith("analytic"):
        return "analytic"
    if score in ("max_prob_plain", "energy", "gradient") or score.startswith("det_"):
        return "plain"
    return "mc"


# --- the paper's rule ---------------------------------------------------------------------------------------

@dataclass
class RuleResult:
    keep: np.ndarray  # [N] bool
    labels: np.ndarray  # [N] int, -1 when ignored
    indicators: np.ndarray  # [N, C] bool: the classes each kept sample is kept as


def apply_rule(mean: np.ndarray, std: np.ndarray, z: float, threshold: float, mixed: str = "ignore") -> RuleResult:
    states = interval_states(mean, std, z, threshold)
    keep, code = decide_states(states, mixed)
    labels = predicted_labels(mean, states, keep)
    ind = np.where((code == 2)[:, None], states == -1, states == 1) & keep[:, None]
    return RuleResult(keep=keep, labels=labels, indicators=ind)


def onehot(y: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(y), c), bool)
    out[np.arange(len(y)), y] = True
    return out
