"""The predictor: preprocess -> backbone (once, int8) -> head sampler -> decision, timed per stage.

    from edge_quq import Predictor
    p = Predictor.from_bundle()              # the embedded default bundle
    r = p.predict("shirt.png")               # -> edge_quq.result.Prediction
    print(r.decision, r.label, r.scores["max_prob"])
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_quq.backends import Backbone, make_backbone
from edge_quq.bundle import Bundle, load_bundle
from edge_quq.decision import MIXED_POLICIES, Decision, check_ignore_on, combine_decision, decide, resolve_z
from edge_quq.detectors import DetectorSet, gradient_reusable
from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.gradients import GradientSettings, gradient_scores
from edge_quq.options import PredictorOptions
from edge_quq.head import HeadWeights, load_head_weights
from edge_quq.preprocess import min_decode_size, preprocess_image, read_image
from edge_quq.result import Failure, Prediction
from edge_quq.samplers import make_sampler
from edge_quq.samplers.base import HeadMoments, Sampler
from edge_quq.scores import compute_scores, row_scores
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

    def head_stage(self, features: np.ndarray, clock: StageClock) -> HeadMoments:
        with clock.stage("head"):
            return self.sampler.sample(features, self.settings.num_iter)

    def score_stage(self, features: np.ndarray, moments: HeadMoments, clock: StageClock) -> Dict[str, float]:
        """The moment scores, the gradient score (once: the gradient detector reuses it when its settings
        match) and the bundle's detectors, for one feature vector."""
        with clock.stage("head"):
            grad = gradient_scores(self.head, features[None], self.gradient) if self.gradient is not None else None
        scores = row_scores(compute_scores(moments.mean, moments.std, moments.logits, moments.expected_entropy,
                                           self.head.activation, grad))
        if self.detectors is not None:
            given = {}
            gdet = self.detectors.detectors.get("gradient")
            if grad is not None and gdet is not None and gradient_reusable(gdet.config, self.gradient, self.head):
                given["gradient"] = grad
            with clock.stage("detectors"):
                scores.update(row_scores(self.detectors.score_all(features[None], self.head, given)))
        return scores

    def decision_stage(self, moments: HeadMoments, scores: Dict[str, float]) -> Tuple[Decision, bool, List[str], List[str]]:
        """(MC decision, keep, ignored_by, flagged): the MC rule, the detectors' flags and the ignore policy."""
        s = self.settings
        dec = decide(moments.mean, moments.std, s.z, s.threshold, s.mixed)
        flags = self.detectors.flags({n: np.asarray([v]) for n, v in scores.items()}) if self.detectors else {}
        flagged = [n for n, hit in flags.items() if hit[0]]
        keep, ignored_by = combine_decision(dec.keep, flagged, self.ignore_on)
        return dec, keep, ignored_by, flagged

    def finish(self, source: str, moments: HeadMoments, clock: StageClock, features: np.ndarray) -> Prediction:
        scores = self.score_stage(features, moments, clock)
        with clock.stage("decision"):
            dec, keep, ignored_by, flagged = self.decision_stage(moments, scores)
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
            source=source, keep=keep, rule=dec.rule,
            label=names[label_index] if label_index is not None else None, class_index=label_index, classes=classes,
            top_index=top, top_label=names[top],
            mean=moments.mean.tolist(), std=moments.std.tolist(), lower=dec.lower.tolist(), upper=dec.upper.tolist(),
            states=[int(v) for v in dec.states], deterministic=moments.deterministic.tolist(),
            scores=scores, timings_ms=timings, rss_bytes=rss_bytes(), settings=self.describe_settings(),
            ignored_by=ignored_by, flagged=flagged,
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
        moments = self.head_stage(feats[0], clock)
        src = source if source is not None else ("<array>" if isinstance(image, np.ndarray) else str(image))
        return self.finish(src, moments, clock, feats[0])

    def predict_many(self, images: Sequence[ImageLike], batch_size: int = 1) -> List[Union[Prediction, Failure]]:
        """Many images; a bad one becomes a Failure and the rest still get results (iter_predict, as a list)."""
        return list(self.iter_predict(images, batch_size))

    def iter_predict(self, images: Iterable[ImageLike], batch_size: int = 1) -> Iterator[Union[Prediction, Failure]]:
        """Results one by one, in input order, each as soon as its batch is done; `images` is consumed
        lazily, so memory stays flat however many there are (edge-quq predict streams 100 000 files).

        With batch_size > 1 the backbone runs on batches; each result's backbone time is its share of the
        batch's time.
        """
        if batch_size < 1:
            raise OptionError(f"batch size must be >= 1, got {batch_size}")
        it = iter(images)
        while True:
            chunk = list(itertools.islice(it, batch_size))
            if not chunk:
                return
            done: List[Union[Failure, tuple]] = []  # keeps input order: Failures and decoded inputs interleaved
            for img in chunk:
                src = "<array>" if isinstance(img, np.ndarray) else str(img)
                clock = StageClock()
                try:
                    with clock.stage("preprocess"):
                        done.append((src, self.load_input(img), clock))
                except EdgeQuqError as e:
                    done.append(Failure(src, str(e)))
            ok = [d for d in done if isinstance(d, tuple)]
            feats: Any = ()
            if ok:
                batch_clock = StageClock()
                with batch_clock.stage("backbone"):
                    feats = iter(self.features(np.stack([x for _, x, _ in ok])))
                share = batch_clock.ms["backbone"] / len(ok)
            for d in done:
                if isinstance(d, Failure):
                    yield d
                    continue
                src, _, clock = d
                f = next(feats)
                clock.ms["backbone"] = share
                yield self.finish(src, self.head_stage(f, clock), clock, f)
