"""The predictor: preprocess -> backbone (once, int8) -> head sampler -> decision, timed per stage.

    from edge_quq import Predictor
    p = Predictor.from_bundle()              # the embedded default bundle
    r = p.predict("shirt.png")               # -> edge_quq.result.Prediction
    print(r.decision, r.label, r.scores["max_prob"])
"""
from __future__ import annotations

import itertools
import operator
import os
import time
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_quq.backends import Backbone, make_backbone
from edge_quq.bundle import Bundle, load_bundle
from edge_quq.conformal import COMBINE_RULES, CalibrationScores, RowGate
from edge_quq.decision import MIXED_POLICIES, Decision, check_ignore_on, combine_decision, decide, policy_reasons, resolve_z
from edge_quq.defaults import (DEFAULT_DETECTOR_SELECTION, GATE_DEFAULTS, OVERLAP_MIN_BYTES, POLICY_WITHOUT_CALIBRATION,
                               RISK_SCORE_SIGN)
from edge_quq.detectors import DETECTOR_NAMES, DetectorSet, gradient_reusable, parse_selection
from edge_quq.errors import EdgeQuqError, OptionError
from edge_quq.gate_store import LoadedGate, load_gate
from edge_quq.gradients import GradientSettings, gradient_scores
from edge_quq.options import PredictorOptions
from edge_quq.head import HeadWeights, load_head_weights
from edge_quq.preprocess import Preprocessor, min_decode_size, read_image
from edge_quq.result import Failure, Prediction
from edge_quq.samplers import make_sampler
from edge_quq.samplers.base import HeadMoments, Sampler
from edge_quq.scores import row_scores, score_row
from edge_quq.telemetry import StageClock, rss_bytes

ImageLike = Union[str, os.PathLike, np.ndarray]
RSS_INTERVAL_S = 0.5
perf_counter = time.perf_counter


def _timed(fn: Callable[[Any], Any], arg: Any) -> Tuple[Any, float]:
    """fn(arg) and the seconds it took, on the thread that runs it."""
    t0 = perf_counter()
    out = fn(arg)
    return out, perf_counter() - t0


def _lap(ms: Dict[str, float], stage: str, t0: float) -> None:
    """StageClock.stage's bookkeeping (milliseconds since perf_counter() t0 added to `stage`) without its
    context manager: the per-frame stages call this, as an object and two method calls per stage cost more."""
    ms[stage] = ms.get(stage, 0.0) + (perf_counter() - t0) * 1e3


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


@dataclass(frozen=True)
class PolicyState:
    """The decision policy as resolved against a bundle: what the gate combines and the risk threshold."""

    name: str  # edge_quq.defaults.POLICIES
    alpha: Optional[float] = None
    delta: Optional[float] = None
    combine: str = str(GATE_DEFAULTS["combine"])
    detectors: Tuple[str, ...] = ()
    cal: Optional[CalibrationScores] = None
    risk_score: Optional[str] = None
    risk_threshold: Optional[float] = None
    target_error: Optional[float] = None
    risk_coverage: Optional[float] = None  # share of the (rule- and gate-passed) calibration data kept

    def describe(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"policy": self.name}
        if self.name != "paper":
            out.update(ood_alpha=self.alpha, gate_detectors=list(self.detectors), combine=self.combine)
        if self.name == "risk":
            out.update(delta=self.delta, target_error=self.target_error, risk_score=self.risk_score,
                       risk_threshold=self.risk_threshold)
        return out


def resolve_policy(opts: PredictorOptions, gate: Optional[LoadedGate]) -> PolicyState:
    """The policy from the options and the bundle's calibration data; OptionError for a policy the bundle
    cannot run or a risk target its calibration data cannot certify (naming the smallest reachable one)."""
    from edge_quq.risk import ltt_threshold

    name = opts.policy or ("risk" if opts.target_error is not None else None)
    if name is None:
        name = gate.spec.policy if gate is not None else POLICY_WITHOUT_CALIBRATION
    if name == "paper":
        return PolicyState("paper")
    if gate is None:
        raise OptionError(f"--policy {name} needs calibration data, and this bundle has none (no gate.npz); "
                          "add it with `edge-quq fit-detectors BUNDLE --data ...` or use --policy paper")
    spec = gate.spec
    if spec.combine not in COMBINE_RULES:
        raise OptionError(f"the bundle's gate combines with {spec.combine!r}, which this edge-quq does not know")
    alpha = float(opts.ood_alpha if opts.ood_alpha is not None else spec.alpha)
    state = PolicyState(name, alpha=alpha, combine=spec.combine, detectors=tuple(spec.detectors),
                        cal=gate.calibration(spec.detectors))
    if name != "risk":
        return state
    if opts.target_error is None:
        raise OptionError("--policy risk needs --target-error (the error rate among kept predictions to certify, e.g. 0.02)")
    delta = float(opts.delta if opts.delta is not None else spec.delta)
    thr = ltt_threshold(gate.risk_table(spec.detectors, alpha, spec.combine), opts.target_error, delta)
    return dataclasses.replace(state, delta=delta, risk_score=spec.risk_score, risk_threshold=thr.threshold,
                               target_error=thr.target_error, risk_coverage=thr.coverage)


def select_detectors(selection: Union[str, Sequence[str]], detectors: Optional[DetectorSet], policy: PolicyState, ignore_on: str,
                     gradient: bool) -> Tuple[str, ...]:
    """The detectors a frame computes (docs/detectors.md, --detectors): what the decision needs (the gate's
    detectors, the one --ignore-on names, every thresholded one under --ignore-on any) plus the names of
    `selection`; `all` is every detector of the bundle and the gradient score (`gradient`: the predictor
    has gradient settings). A name the bundle cannot compute is an OptionError."""
    have = detectors.names if detectors is not None else []
    can = set(have) | ({"gradient"} if gradient else set())
    asked = parse_selection(selection)
    if isinstance(selection, str) and selection.strip() == "all":  # what this bundle has
        asked = tuple(n for n in asked if n in can)
    missing = [n for n in asked if n not in can]
    if missing:
        raise OptionError(f"--detectors {', '.join(missing)}: not a detector of this bundle (it has "
                          f"{', '.join(sorted(can, key=DETECTOR_NAMES.index)) or 'none'}); use gate, all or those")
    need = set(policy.detectors) | set(asked)
    if ignore_on == "any" and detectors is not None:
        need.update(detectors.with_threshold())
    elif ignore_on in have:
        need.add(ignore_on)
    return tuple(n for n in DETECTOR_NAMES if n in need)


class Predictor:
    def __init__(self, bundle: Bundle, backbone: Backbone, head: HeadWeights, sampler: Sampler, settings: Settings,
                 channel_order: str = "bgr", gradient: Optional[GradientSettings] = GradientSettings(),
                 detectors: Optional[DetectorSet] = None, ignore_on: str = "mc",
                 policy: PolicyState = PolicyState("paper"),
                 selection: Union[str, Sequence[str]] = DEFAULT_DETECTOR_SELECTION) -> None:
        self.policy = policy
        self.gradient = gradient.validate() if gradient is not None else None
        self.detectors = detectors  # every detector of the bundle; `active`: the ones each frame computes
        self.ignore_on = check_ignore_on(ignore_on, detectors)
        self.detector_names = select_detectors(selection, detectors, policy, self.ignore_on, self.gradient is not None)
        active = detectors.subset(self.detector_names) if detectors is not None else None
        self.active: Optional[DetectorSet] = active if active is not None and active.detectors else None
        self.gradient_on = "gradient" in self.detector_names
        # (name, threshold) of the computed detectors with one: each frame's flags (FittedDetector.flag's rule,
        # score > threshold, on one float without its array conversion)
        self._thresholded = [(n, float(d.threshold)) for n, d in self.active.detectors.items()
                             if d.threshold is not None] if self.active else []
        self._described: Optional[Tuple[tuple, dict]] = None
        self._prep: Optional[Preprocessor] = None
        self._gate: Optional[RowGate] = None
        self._scorer: Optional[Tuple[DetectorSet, HeadWeights, Callable[[np.ndarray], Dict[str, float]]]] = None
        self._rss: Optional[Tuple[float, int]] = None  # (perf_counter of the read, bytes): rss_bytes() opens a /proc file
        # detectors on a worker thread beside the sampler (set_overlap; from_bundle sets it from the options)
        self.overlap = False
        self._pool: Optional[ThreadPoolExecutor] = None
        # recent seconds of (the detectors' first half, the sampler) with overlap: the longer runs on this thread
        self._split = (0.0, 0.0)
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
        `policy` is paper, gated or risk (None: the bundle's default; docs/decisions.md), with `ood_alpha`,
        `delta` and, for risk, `target_error`. `detectors` picks what each frame scores beside what the
        decision needs: "gate" (nothing more), "all", or names ("knn,vim" or a list; docs/detectors.md).
        """
        opts = (options or PredictorOptions()).replace(**overrides)
        if path is not None:
            opts = opts.replace(bundle=path)
        opts.check()
        from edge_quq.detector_store import load_detectors

        bundle = load_bundle(opts.bundle)
        # The head first: broken weights are the root problem, not the detectors or gate fitted to them.
        head = load_head_weights(bundle)
        detectors = load_detectors(bundle)
        check_ignore_on(opts.ignore_on, detectors)
        policy = resolve_policy(opts, load_gate(bundle))
        if policy.name != "paper" and detectors is None:
            raise OptionError(f"--policy {policy.name}: the bundle's calibration data needs its detectors file")
        d = bundle.decision
        settings = Settings(
            num_iter=int(opts.num_iter if opts.num_iter is not None else d.num_iter),
            threshold=float(opts.threshold if opts.threshold is not None else d.threshold),
            z=resolve_z(opts.z, opts.confidence_level, default=d.z),
            mixed=opts.mixed if opts.mixed is not None else d.mixed,
            seed=opts.seed,
        ).validate()
        backbone = make_backbone(bundle, opts.backend, opts.threads, opts.xnnpack)
        smp = make_sampler(opts.sampler, head, seed=opts.seed, bundle=bundle, threads=opts.threads)
        predictor = cls(bundle, backbone, head, smp, settings, opts.channel_order, opts.gradient, detectors, opts.ignore_on,
                        policy, opts.detectors)
        predictor.options = opts
        predictor.set_overlap(opts.overlap, opts.threads)
        predictor.warm_up()
        return predictor

    def set_overlap(self, mode: str, threads: Optional[int] = None) -> bool:
        """Whether each frame scores its detectors on a worker thread while this one runs the head sampler
        (--overlap: auto, on, off); returns it. Only the row scorer's detectors can: not with the gradient
        score, which shares its work with the score stage. `auto` also needs the detectors to hold at least
        OVERLAP_MIN_BYTES, and two CPUs for this process (and --threads not 1): below that, waking the worker
        costs more than it saves (edge_quq.defaults)."""
        can = self.active is not None and not self.gradient_on and mode != "off"
        if can and mode == "auto":
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            held = sum(d.memory_bytes() for d in self.active.detectors.values())
            can = held >= OVERLAP_MIN_BYTES and cpus >= 2 and threads != 1
        self.overlap = bool(can)
        if self.overlap and self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="edge-quq-detectors")
        return self.overlap

    def warm_up(self) -> None:
        """One pass on a blank image so first-call costs (OpenCV import, runtime allocation, XNNPACK weight
        packing) stay out of the first result's timings. The sampler is reseeded afterwards, so seeded
        results do not depend on the warm-up."""
        h, w, c = self.bundle.input.shape
        x = self.load_input(np.zeros((h, w, c) if c > 1 else (h, w), np.uint8))
        feats = self.features(x[None])
        self.sampler.sample(feats[0], self.settings.num_iter)
        if self.overlap:  # start the worker thread, and its first scoring, now
            self._pool.submit(self._row_scorer().without_logits, feats[:1]).result()
        self.sampler.reseed(self.settings.seed)
        decide(np.full(self.bundle.num_classes, 0.5), np.zeros(self.bundle.num_classes), 1.0, 0.5)

    # -- stages -------------------------------------------------------------------------------------------
    def load_input(self, image: ImageLike) -> np.ndarray:
        spec, limit = self.bundle.input.preprocess, self.options.max_pixels
        prep = self._prep
        if prep is None or prep.spec is not spec:  # built once per spec: its lookup tables
            prep = self._prep = Preprocessor(spec)
        if isinstance(image, np.ndarray):
            return prep(image, self.channel_order, limit)
        return prep(read_image(image, limit, min_decode_size(spec)), "bgr", limit)

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.backbone(batch)

    def head_stage(self, features: np.ndarray, clock: StageClock) -> HeadMoments:
        t0 = perf_counter()
        moments = self.sampler.sample(features, self.settings.num_iter)
        _lap(clock.ms, "head", t0)
        return moments

    def head_and_scores(self, features: np.ndarray, clock: StageClock) -> Tuple[HeadMoments, Dict[str, float]]:
        """The head stage, then the score stage, of one feature vector; with `overlap`, the sampler and the
        detectors' part that needs no logits run at once, one on the worker thread (the shorter of the two by
        the recent frames: the worker starts tens of µs late, as it must be woken), the other on this one; the
        rest of the detectors needs the sampler's eval-mode logits. Both stages keep their own times; the time
        they ran together goes to clock.overlap_ms."""
        if not self.overlap:
            moments = self.head_stage(features, clock)
            return moments, self.score_stage(features, moments, clock)
        scorer, row, sample_on_worker = self._row_scorer(), features[None], self._split[0] > self._split[1]
        t0 = perf_counter()
        if sample_on_worker:
            job = self._pool.submit(_timed, self._sample, features)
            early, early_s = _timed(scorer.without_logits, row)
            moments, head_s = job.result()
        else:
            job = self._pool.submit(_timed, scorer.without_logits, row)
            moments, head_s = _timed(self._sample, features)
            early, early_s = job.result()
        wall = perf_counter() - t0
        self._split = (0.8 * self._split[0] + 0.2 * early_s, 0.8 * self._split[1] + 0.2 * head_s)
        clock.ms["head"] = clock.ms.get("head", 0.0) + head_s * 1e3  # the sampler's own time
        clock.ms["detectors"] = clock.ms.get("detectors", 0.0) + early_s * 1e3
        clock.overlap_ms += max(head_s + early_s - wall, 0.0) * 1e3
        return moments, self.score_stage(features, moments, clock, early)

    def _sample(self, features: np.ndarray) -> HeadMoments:
        return self.sampler.sample(features, self.settings.num_iter)

    def score_stage(self, features: np.ndarray, moments: HeadMoments, clock: StageClock,
                    early: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
        """The moment scores, the gradient score when selected (once: the gradient detector reuses it when its
        settings match) and the selected detectors (`detector_names`), for one feature vector. `early`: the row
        scorer's without_logits result for it, when head_and_scores computed it."""
        grad = None
        if self.gradient_on and self.gradient is not None:
            with clock.stage("head"):
                grad = gradient_scores(self.head, features[None], self.gradient)
        scores = score_row(moments.mean, moments.std, moments.logits, moments.expected_entropy, self.head.activation, grad)
        if self.active is not None:
            given = None
            if grad is not None:
                gdet = self.active.detectors.get("gradient")
                if gdet is not None and gradient_reusable(gdet.config, self.gradient, self.head):
                    given = {"gradient": grad}
            t0 = perf_counter()
            if given is None:
                # the sampler's eval-mode logits: the same pass the detectors were fitted on, in its float32 order
                scorer, row = self._row_scorer(), features[None]
                logits = np.asarray(moments.logits, np.float64).reshape(1, -1) if scorer.needs_logits else None
                scores.update(scorer.with_logits(row, scorer.without_logits(row) if early is None else early, logits))
            else:
                scores.update(row_scores(self.active.score_all(features[None], self.head, given)))
            _lap(clock.ms, "detectors", t0)
        return scores

    def _row_scorer(self) -> Callable[..., Dict[str, float]]:
        """The active detectors' DetectorSet.row_scorer, built again only when the detectors or the head
        were replaced."""
        hit, active, head = self._scorer, self.active, self.head
        if hit is None or hit[0] is not active or hit[1] is not head:
            hit = self._scorer = (active, head, active.row_scorer(head))
        return hit[2]

    def gate_pvalues(self, scores: Dict[str, float]) -> Optional[np.ndarray]:
        """Each gate detector's conformal p-value [D] (the policy's detectors, in order); None without
        calibration data."""
        p = self._pvalue_row(scores)
        return None if p is None else np.array(p, np.float64)

    def _row_gate(self) -> Optional[RowGate]:
        """The policy's gate for one frame (conformal.RowGate), built again only when the policy's calibration
        data or rule changed; None without calibration data."""
        pol, hit = self.policy, self._gate
        if pol.cal is None:
            return None
        if hit is None or hit.cal is not pol.cal or hit.rule != pol.combine:
            hit = self._gate = RowGate(pol.cal, pol.combine)
        return hit

    def _pvalue_row(self, scores: Dict[str, float], gate: Optional[RowGate] = None) -> Optional[List[float]]:
        rg = gate or self._row_gate()
        return None if rg is None else rg.pvalues(list(map(scores.__getitem__, self.policy.detectors)))

    def decision_stage(self, moments: HeadMoments, scores: Dict[str, float],
                       pvalues: Optional[Sequence[float]] = None) -> Tuple[Decision, bool, List[str], List[str], Optional[float]]:
        """(MC decision, keep, ignored_by, flagged, ood_p): the MC rule, the detectors' flags, the ignore
        policy, then the OOD gate and the risk threshold of the decision policy. `pvalues`: gate_pvalues()
        when the caller already has them."""
        rg = self._row_gate()
        if rg is not None:
            pvalues = self._pvalue_row(scores, rg) if pvalues is None else np.asarray(pvalues, np.float64).tolist()
        return self._decide(moments, scores, rg, pvalues)

    def _decide(self, moments: HeadMoments, scores: Dict[str, float], gate: Optional[RowGate],
                pvalues: Optional[List[float]]) -> Tuple[Decision, bool, List[str], List[str], Optional[float]]:
        """decision_stage with the policy's gate and the p-values as a list (None without calibration data)."""
        s = self.settings
        dec = decide(moments.mean, moments.std, s.z, s.threshold, s.mixed)
        flagged = [n for n, thr in self._thresholded if scores[n] > thr] if self._thresholded else []
        keep, ignored_by = combine_decision(dec.keep, flagged, self.ignore_on)
        pol = self.policy
        ood_p = None if gate is None else gate.combine(pvalues)
        risk_keeps = True
        if pol.risk_threshold is not None:
            risk_keeps = RISK_SCORE_SIGN[pol.risk_score] * scores[pol.risk_score] > pol.risk_threshold
        more = policy_reasons(pol.name, ood_p is not None and ood_p < pol.alpha, risk_keeps)
        return dec, keep and not more, ignored_by + more, flagged, ood_p

    def after_backbone(self, source: str, features: np.ndarray, clock: StageClock) -> Prediction:
        """Everything a frame does after the backbone, from its feature vector: head, scores, decision."""
        moments, scores = self.head_and_scores(features, clock)
        return self.finish(source, moments, clock, features, scores)

    def finish(self, source: str, moments: HeadMoments, clock: StageClock, features: np.ndarray,
               scores: Optional[Dict[str, float]] = None) -> Prediction:
        """The Prediction from the head stage's moments (and the score stage's scores, computed here when None)."""
        if scores is None:
            scores = self.score_stage(features, moments, clock)
        t0 = perf_counter()
        rg = self._row_gate()
        pvalues = None if rg is None else self._pvalue_row(scores, rg)
        dec, keep, ignored_by, flagged, ood_p = self._decide(moments, scores, rg, pvalues)
        ms, t1 = clock.ms, perf_counter()
        ms["decision"] = ms.get("decision", 0.0) + (t1 - t0) * 1e3  # _lap's bookkeeping, t1 reused for rss
        timings = dict(ms)
        timings["total"] = sum(ms.values()) - clock.overlap_ms
        names, pol = self.bundle.classes, self.policy
        top = int(moments.mean.argmax())  # the ndarray method: np.argmax's wrapper costs more on one frame
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
            states=dec.states.tolist(), deterministic=moments.deterministic.tolist(),
            scores=scores, timings_ms=timings, rss_bytes=self.rss(t1), settings=self.describe_settings(),
            ignored_by=ignored_by, flagged=flagged,
            policy=pol.name, ood_p=ood_p, risk_threshold=pol.risk_threshold,
            ood_pvalues=None if pvalues is None else dict(zip(pol.detectors, pvalues)),
            features=features,
        )

    def rss(self, now: Optional[float] = None) -> int:
        """This process's RSS for a result, read again at most every RSS_INTERVAL_S (a /proc read per frame
        was a tenth of the per-frame overhead; the RSS of a frame loop changes on a scale of seconds).
        `now`: perf_counter() when the caller just read it."""
        if now is None:
            now = perf_counter()
        if self._rss is None or now - self._rss[0] >= RSS_INTERVAL_S:
            self._rss = (now, rss_bytes())
        return self._rss[1]

    def describe_settings(self) -> dict:
        """The settings a result records; built again only when one of the objects they come from was
        replaced (a shallow copy per call: building it was a twentieth of the per-frame overhead)."""
        key = (self.settings, self.sampler, self.backbone, self.head, self.policy, self.ignore_on, self.detector_names,
               self.overlap)
        hit = self._described
        if hit is None or not all(map(operator.is_, hit[0], key)):
            hit = self._described = (key, self._describe_settings())
        return dict(hit[1])

    def _describe_settings(self) -> dict:
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
            "detectors": list(self.detector_names),
            "overlap": self.overlap,
            **self.policy.describe(),
        }

    # -- public ---------------------------------------------------------------------------------------------
    def predict(self, image: ImageLike, source: Optional[str] = None) -> Prediction:
        """One image (path or decoded array) -> Prediction. Raises EdgeQuqError on bad input."""
        clock = StageClock()
        t0 = perf_counter()
        x = self.load_input(image)
        _lap(clock.ms, "preprocess", t0)  # the stages timed as finish() times its own: no context-manager objects
        t0 = perf_counter()
        feats = self.features(x[None])
        _lap(clock.ms, "backbone", t0)
        src = source if source is not None else ("<array>" if isinstance(image, np.ndarray) else str(image))
        return self.after_backbone(src, feats[0], clock)

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
                yield self.after_backbone(src, f, clock)
