"""The predictor: preprocess -> backbone (once, int8) -> head sampler -> decision, timed per stage.

    from edge_quq import Predictor
    p = Predictor.from_bundle()              # the embedded default bundle
    r = p.predict("shirt.png")               # -> edge_quq.result.Prediction
    print(r.decision, r.label, r.scores["max_prob"])
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from edge_quq.backends import Backbone, make_backbone
from edge_quq.bundle import Bundle, load_bundle
from edge_quq.decision import MIXED_POLICIES, decide, resolve_z
from edge_quq.detectors import DetectorSet
from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.gradients import GradientSettings, gradient_score
from edge_quq.options import PredictorOptions
from edge_quq.head import HeadWeights, load_head_weights
from edge_quq.preprocess import min_decode_size, preprocess_image, read_image
from edge_quq.result import Failure, Prediction
from edge_quq.sampler import HeadMoments, Sampler, make_sampler
from edge_quq.scores import compute_scores
from edge_quq.telemetry import StageClock, rss_bytes

ImageLike = Union[str, os.PathLike, np.ndarray]


@dataclass(frozen=True)
class Settings:
    num_iter: int
    threshold: float
    z: float
    mixed: str
    seed: Optional[int]

    def validate(self) -> "Settings":
        if self.num_iter < 2:
            raise OptionError(f"num_iter (T) must be at least 2 to estimate a spread, got {self.num_iter}")
        if not 0.0 < self.threshold < 1.0:
            raise OptionError(f"threshold must be strictly between 0 and 1, got {self.threshold}")
        if self.mixed not in MIXED_POLICIES:
            raise OptionError(f"mixed policy must be one of {', '.join(MIXED_POLICIES)}, got {self.mixed!r}")
        return self


class Predictor:
    def __init__(self, bundle: Bundle, backbone: Backbone, head: HeadWeights, sampler: Sampler, settings: Settings,
                 channel_order: str = "bgr", gradient: Optional[GradientSettings] = GradientSettings(),
                 detectors: Optional[DetectorSet] = None, ignore_on: str = "mc") -> None:
        self.gradient = gradient.validate() if gradient is not None else None
        self.detectors = detectors
        self.ignore_on = check_ignore_on(ignore_on, detectors)
        self.bundle = bundle
        self.backbone = backbone
        self.head = head
        self.sampler = sampler
        self.settings = settings
        self.channel_order = channel_order
        self.options = PredictorOptions()  # from_bundle replaces it with the options it was built from

    @classmethod
    def from_bundle(cls, path: Optional[Union[str, os.PathLike]] = None, *, options: Optional[PredictorOptions] = None,
                    **overrides: Any) -> "Predictor":
        """Load and verify a bundle (None: the embedded default) and build the pipeline.

        Settings come from `options` (edge_quq.options.PredictorOptions), with keyword arguments as
        overrides of its fields: `from_bundle(seed=0, sampler="numpy")`. The interval factor is `z` (the
        multiplier of the std) or `confidence_level` (two-sided coverage, turned into z); at most one of
        them. Unset decision values come from the bundle's decision defaults. `channel_order` says how
        3-channel numpy arrays passed to predict() are ordered; files are always decoded correctly.
        `gradient` sets the closed-form gradient score (None turns it off). `ignore_on` picks what can ignore
        a prediction: "mc" (the MC decision rule), a detector name (its fitted threshold alone), or "any".
        """
        opts = (options or PredictorOptions()).replace(**overrides)
        if path is not None:
            opts = opts.replace(bundle=path)
        opts.check()
        from edge_quq.detector_store import load_detectors

        bundle = load_bundle(opts.bundle)
        detectors = load_detectors(bundle)
        check_ignore_on(opts.ignore_on, detectors)
        d = bundle.decision
        settings = Settings(
            num_iter=int(opts.num_iter if opts.num_iter is not None else d.num_iter),
            threshold=float(opts.threshold if opts.threshold is not None else d.threshold),
            z=resolve_z(opts.z, opts.confidence_level, default=d.z),
            mixed=opts.mixed if opts.mixed is not None else d.mixed,
            seed=opts.seed,
        ).validate()
        head = load_head_weights(bundle)
        backbone = make_backbone(bundle, opts.backend, opts.threads, opts.xnnpack)
        smp = make_sampler(opts.sampler, head, seed=opts.seed, bundle=bundle, threads=opts.threads)
        predictor = cls(bundle, backbone, head, smp, settings, opts.channel_order, opts.gradient, detectors, opts.ignore_on)
        predictor.options = opts
        predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """One pass on a blank image so first-call costs (OpenCV import, runtime allocation, XNNPACK weight
        packing) stay out of the first result's timings. The sampler is reseeded afterwards, so seeded
        results do not depend on the warm-up."""
        h, w, c = self.bundle.input.shape
        x = self.load_input(np.zeros((h, w, c) if c > 1 else (h, w), np.uint8))
        feats = self.features(x[None])
        self.sampler.sample(feats[0], self.settings.num_iter)
        self.sampler.reseed(self.settings.seed)
        decide(np.full(self.bundle.num_classes, 0.5), np.zeros(self.bundle.num_classes), 1.0, 0.5)

    # -- stages -------------------------------------------------------------------------------------------
    def load_input(self, image: ImageLike) -> np.ndarray:
        spec, limit = self.bundle.input.preprocess, self.options.max_pixels
        if isinstance(image, np.ndarray):
            return preprocess_image(image, spec, self.channel_order, limit)
        return preprocess_image(read_image(image, limit, min_decode_size(spec)), spec, "bgr", limit)

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.backbone(batch)

    def head_stage(self, features: np.ndarray, clock: StageClock) -> tuple:
        with clock.stage("head"):
            moments = self.sampler.sample(features, self.settings.num_iter)
            grad = gradient_score(self.head, features, self.gradient) if self.gradient is not None else None
        return moments, grad

    def detector_stage(self, features: Optional[np.ndarray], grad: Optional[float], clock: StageClock) -> Dict[str, float]:
        """Scores of the bundle's fitted detectors for one feature vector (empty without detectors)."""
        if self.detectors is None or features is None:
            return {}
        out: Dict[str, float] = {}
        with clock.stage("detectors"):
            for name, det in self.detectors.detectors.items():
                if name == "gradient" and grad is not None and self._gradient_matches(det.config):
                    out[name] = float(grad)  # already computed by the head stage with the same settings
                else:
                    out[name] = float(det.score(features[None], self.head)[0])
        return out

    def _gradient_matches(self, cfg: Dict[str, object]) -> bool:
        g = self.gradient
        return (g is not None and g.perturbations == 0 and self.head.temperature == 1.0
                and g.layer_base == float(cfg.get("layer_base", -1))
                and g.class_weighting == cfg.get("class_weighting"))

    def finish(self, source: str, moments: HeadMoments, grad: Optional[float], clock: StageClock,
               features: Optional[np.ndarray] = None) -> Prediction:
        s = self.settings
        det_scores = self.detector_stage(features, grad, clock)
        with clock.stage("decision"):
            dec = decide(moments.mean, moments.std, s.z, s.threshold, s.mixed)
            scores = compute_scores(moments.mean, moments.std, moments.logits, moments.expected_entropy, self.head.activation)
            if grad is not None:
                scores["gradient"] = grad
            scores.update(det_scores)
            flagged = [n for n in (self.detectors.with_threshold() if self.detectors else ())
                       if n in det_scores and det_scores[n] > self.detectors.detectors[n].threshold]
            keep, ignored_by = combine_decision(dec.keep, flagged, self.ignore_on)
        timings = dict(clock.ms)
        timings["total"] = sum(clock.ms.values())
        names = self.bundle.classes
        top = int(np.argmax(moments.mean))
        if not keep:
            label_index, classes = None, []
        elif dec.keep:
            label_index, classes = dec.label, list(dec.classes)
        else:  # a detector-only rule kept what the MC rule ignored: the kept class is the top class
            label_index, classes = top, [top]
        return Prediction(
            source=source,
            keep=keep,
            rule=dec.rule,
            label=names[label_index] if label_index is not None else None,
            class_index=label_index,
            classes=classes,
            top_index=top,
            top_label=names[top],
            mean=moments.mean.tolist(),
            std=moments.std.tolist(),
            lower=dec.lower.tolist(),
            upper=dec.upper.tolist(),
            states=[int(v) for v in dec.states],
            deterministic=moments.deterministic.tolist(),
            scores=scores,
            timings_ms=timings,
            rss_bytes=rss_bytes(),
            settings=self.describe_settings(),
            ignored_by=ignored_by,
            flagged=flagged,
        )

    def describe_settings(self) -> dict:
        s = self.settings
        return {
            "backend": self.backbone.name,
            "sampler": self.sampler.name,
            "num_iter": s.num_iter,
            "threshold": s.threshold,
            "z": round(s.z, 6),
            "mixed": s.mixed,
            "seed": s.seed,
            "temperature": self.head.temperature,
            "ignore_on": self.ignore_on,
        }

    # -- public ---------------------------------------------------------------------------------------------
    def predict(self, image: ImageLike, source: Optional[str] = None) -> Prediction:
        """One image (path or decoded array) -> Prediction. Raises EdgeQuqError on bad input."""
        clock = StageClock()
        with clock.stage("preprocess"):
            x = self.load_input(image)
        with clock.stage("backbone"):
            feats = self.features(x[None])
        moments, grad = self.head_stage(feats[0], clock)
        src = source if source is not None else ("<array>" if isinstance(image, np.ndarray) else str(image))
        return self.finish(src, moments, grad, clock, feats[0])

    def predict_many(self, images: Sequence[ImageLike], batch_size: int = 1) -> List[Union[Prediction, Failure]]:
        """Many images; a bad one becomes a Failure and the rest still get results.

        With batch_size > 1 the backbone runs on batches; each result's backbone time is its share of the
        batch's time.
        """
        if batch_size < 1:
            raise OptionError(f"batch size must be >= 1, got {batch_size}")
        results: List[Union[Prediction, Failure]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            ok: List[tuple] = []
            for img in chunk:
                src = "<array>" if isinstance(img, np.ndarray) else str(img)
                clock = StageClock()
                try:
                    with clock.stage("preprocess"):
                        x = self.load_input(img)
                    ok.append((src, x, clock))
                except EdgeQuqError as e:
                    results.append(Failure(src, str(e)))
            if not ok:
                continue
            batch_clock = StageClock()
            with batch_clock.stage("backbone"):
                feats = self.features(np.stack([x for _, x, _ in ok]))
            share = batch_clock.ms["backbone"] / len(ok)
            for (src, _, clock), f in zip(ok, feats):
                clock.ms["backbone"] = share
                moments, grad = self.head_stage(f, clock)
                results.append(self.finish(src, moments, grad, clock, f))
        return results


def check_ignore_on(ignore_on: str, detectors: Optional[DetectorSet]) -> str:
    """'mc', 'any', or the name of a detector of this bundle that has a fitted threshold."""
    if ignore_on in ("mc", "any"):
        return ignore_on
    have = detectors.with_threshold() if detectors is not None else []
    if ignore_on not in have:
        if detectors is None:
            raise OptionError(f"--ignore-on {ignore_on!r}: this bundle has no fitted detectors (add them with edge-quq fit-detectors); use mc")
        raise OptionError(f"--ignore-on {ignore_on!r}: not a detector with a fitted threshold in this bundle; choose mc, any or one of {', '.join(have)}")
    return ignore_on


def combine_decision(mc_keep: bool, flagged: Sequence[str], ignore_on: str) -> tuple:
    """(keep, ignored_by): who may ignore is set by `ignore_on`; ignored_by lists who did ("mc", detector names)."""
    if ignore_on == "mc":
        return mc_keep, ([] if mc_keep else ["mc"])
    if ignore_on == "any":
        why = ([] if mc_keep else ["mc"]) + list(flagged)
        return not why, why
    hit = ignore_on in flagged
    return not hit, ([ignore_on] if hit else [])


IMAGE_GLOB_CHARS = set("*?[")


def expand_inputs(items: Iterable[str]) -> List[Union[Path, Failure]]:
    """Files, folders (their images, sorted, not recursive) and globs -> paths; problems become Failures."""
    import glob

    from edge_quq.preprocess import IMAGE_SUFFIXES

    out: List[Union[Path, Failure]] = []
    for item in items:
        p = Path(item)
        if any(c in item for c in IMAGE_GLOB_CHARS) and not p.exists():
            matches = sorted(glob.glob(item))
            if not matches:
                out.append(Failure(item, f"{item}: pattern matches no files"))
            out.extend(Path(m) for m in matches if not Path(m).is_dir())
        elif p.is_dir():
            imgs = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                out.append(Failure(item, f"{item}: folder contains no images ({', '.join(IMAGE_SUFFIXES)})"))
            out.extend(imgs)
        else:
            out.append(p)
    return out
