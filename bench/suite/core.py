"""Shared pieces of the benchmark suite: features once per image set, the head run in batch, per-sample scores.

The math is the runtime's (edge_quq): the batched MC samples and the shared mask stream
(edge_quq.samplers.base.mc_probs), the closed-form moments (edge_quq.samplers.analytic.analytic_moments),
the gradient score (edge_quq.gradients.gradient_scores), entropy and energy (edge_quq.scores) and the rule
(edge_quq.decision.decide_many); this module only arranges them per image set. The same code serves
Fashion-MNIST and CIFAR-100: the int8 backbone runs once per image set, and every uncertainty score is an
entry of a dict name -> per-sample array oriented "higher = trust less". Adding a score (issue
9's feature-space detectors, say) is one more entry: every table and figure iterates over that dict.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from edge_quq.gradients import gradient_scores
from edge_quq.head import HeadWeights
from edge_quq.samplers.analytic import analytic_moments
from edge_quq.samplers.base import mc_probs
from edge_quq.scores import energy, entropy


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


# --- the head, batched -----------------------------------------------------------------------------------------

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
    detector_scores: Dict[str, np.ndarray] = field(default_factory=dict)  # every fitted detector (the gates' input)
    features: Optional[np.ndarray] = None  # [N, F] backbone features (the drift monitor's scene feed)

    def moments(self, t: int) -> tuple:
        """(mean, std, expected entropy) from the first t samples: the T-grid reuses one draw of max(T)."""
        p = self.probs[:, :t].astype(np.float64)
        return p.mean(axis=1), p.std(axis=1), None

    def expected_entropy(self, t: int, activation: str) -> np.ndarray:
        return entropy(self.probs[:, :t], activation).mean(axis=1)


def run_head(head: HeadWeights, feats: np.ndarray, t: int, seed: int, detectors=None) -> HeadRun:
    rng = np.random.default_rng(seed)
    an = analytic_moments(head, feats)
    det = {} if detectors is None else {n: np.asarray(s, np.float64) for n, s in detectors.score_all(feats, head).items()}
    # the head gradient is already a score column of its own
    extra = {f"det_{n}": s for n, s in det.items() if n != "gradient"}
    return HeadRun(
        probs=mc_probs(head, feats, t, rng),
        det_logits=an.logits,
        det_probs=an.deterministic,
        an_mean=an.mean,
        an_std=an.std,
        gradient=gradient_scores(head, feats),
        extra=extra,
        detector_scores=det,
        features=feats,
    )


# --- scores (higher = trust less) -----------------------------------------------------------------------------

def score_dict(run: HeadRun, t: int, activation: str) -> Dict[str, np.ndarray]:
    """Every per-sample uncertainty score, "higher = trust less", at T = t."""
    mean, std, _ = run.moments(t)
    pred = np.argmax(mean, axis=1)
    idx = np.arange(len(mean))
    pe = entropy(mean, activation)
    an_pred = np.argmax(run.an_mean, axis=1)
    scores = {
        "max_prob_plain": -run.det_probs.max(axis=1),
        "max_prob_mc": -mean.max(axis=1),
        "entropy_mc": pe,
        "mc_std": std[idx, pred],
        "mean_variance": np.mean(std ** 2, axis=1),
        "mutual_information": np.maximum(pe - run.expected_entropy(t, activation), 0.0),
        "energy": energy(run.det_logits, activation),
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


def onehot(y: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(y), c), bool)
    out[np.arange(len(y)), y] = True
    return out
