"""Per-sample cost of the decision math of issue 14: conformal p-values, combination, gate, drift p-value
and one DriftMonitor update (scene feeding, 64-d features); with --frame, the per-frame overhead of the
default Predictor (issue 16). Prints one JSON line; no assertions.

    python -m bench.bench_gate [--detectors 3] [--calibration 5000] [--repeats 20000]
    python -m bench.bench_gate --frame [--repeats 2000]     # frame_overhead() (bench_e2e.py reports it)
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bench.blas_threads import BLAS_THREADS  # noqa: F401  (before numpy)

import click  # noqa: E402
import numpy as np  # noqa: E402

from edge_quq.conformal import combine, conformal_pvalues, gate, sort_calibration  # noqa: E402
from edge_quq.drift import DriftMonitor, drift_pvalues  # noqa: E402
from edge_quq.defaults import GATE_DEFAULTS  # noqa: E402

DEFAULT_RULE = str(GATE_DEFAULTS["combine"])


def _time_us(fn: Callable[[int], object], repeats: int) -> Dict[str, float]:
    """Per-call statistics, plus best_us: the mean over the fastest of 20 blocks, the least disturbed
    estimate on a shared machine."""
    samples: List[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e6)
    return _stats_us(samples)


def _stats_us(samples: List[float]) -> Dict[str, float]:
    repeats = len(samples)
    block = max(1, repeats // 20)
    best = min(statistics.fmean(samples[j:j + block]) for j in range(0, repeats - block + 1, block))
    samples.sort()
    return {"mean_us": round(statistics.fmean(samples), 2), "p50_us": round(samples[len(samples) // 2], 2),
            "p99_us": round(samples[int(len(samples) * 0.99)], 2), "best_us": round(best, 2)}


def measure(detectors: int = 3, calibration: int = 5000, repeats: int = 20000, rule: str = DEFAULT_RULE) -> dict:
    """Per-sample microseconds of each step and of the whole decision, on random scores and features, with the
    combination `rule` (default: the one new bundles ship, GATE_DEFAULTS)."""
    rng = np.random.default_rng(0)
    d, n = detectors, calibration
    cal = sort_calibration(rng.normal(size=(d, n)))
    scores = rng.normal(size=(repeats, 1, d))
    feats = rng.normal(size=(repeats, 64))
    pv = conformal_pvalues(scores[:, 0], cal)
    monitor = DriftMonitor()
    sizes = [n] * d

    def whole(i: int) -> None:
        p = conformal_pvalues(scores[i], cal)
        gate(combine(p, rule, cal), 0.05)
        monitor.update(float(drift_pvalues(p[:, :1], sizes[:1], monitor.delta)[0]), feats[i])

    return {
        "detectors": d, "calibration": n, "repeats": repeats, "rule": rule,
        "pvalues": _time_us(lambda i: conformal_pvalues(scores[i], cal), repeats),
        "combine_and_gate": _time_us(lambda i: gate(combine(pv[i:i + 1], rule, cal), 0.05), repeats),
        "drift_update": _time_us(lambda i: monitor.update(0.5, feats[i]), repeats),
        "whole_decision": _time_us(whole, repeats),
    }


def _calls_per_frame(fn: Callable[[], None], frames: int = 200) -> float:
    """Python-level function calls (numpy's C functions included) per call of `fn`, by cProfile."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(frames):
        fn()
    prof.disable()
    return round(pstats.Stats(prof).total_calls / frames, 1)


OVERHEAD_TARGET_US = 100.0  # issue 16: per-frame overhead outside the backbone and the head math


def frame_overhead(repeats: int = 2000, bundle: Optional[str] = None, image: Optional[str] = None) -> dict:
    """Per-frame cost of the default Predictor (default options: policy, sampler, T, detectors) split into the
    backbone, the head math (sampler.sample) and the overhead: everything else predict() runs on a decoded
    image, i.e. preprocessing, the moment scores, the detectors it computes (--detectors gate: the gate's), the
    gate's p-values, the decision rule and the Prediction; with the Python function calls per frame (cProfile). Each rep times the three in turn with wall and thread-CPU clocks; the CPU clock
    leaves out what other processes took from this thread on a shared machine."""
    from edge_quq.predictor import Predictor
    from edge_quq.preprocess import read_image
    from edge_quq.telemetry import StageClock

    pred = Predictor.from_bundle(bundle, seed=0)
    src = image or str(sorted((Path(pred.bundle.path).parent / "samples").glob("*.png"))[0])
    img = read_image(src)
    x = pred.load_input(img)
    feats = pred.features(x[None])[0]
    t = pred.settings.num_iter
    moments = pred.sampler.sample(feats, t)

    def overhead() -> None:  # what predict() runs besides features() and the sampler
        pred.load_input(img)
        pred.finish(src, moments, StageClock(), feats)

    parts = {"backbone": lambda: pred.features(x[None]), "head_math": lambda: pred.sampler.sample(feats, t),
             "overhead": overhead}
    # the overhead's parts, timed on their own for the breakdown (the sum differs a little from the whole)
    scores = pred.score_stage(feats, moments, StageClock())
    split = {
        "preprocess": lambda: pred.load_input(img),
        "scores_and_detectors": lambda: pred.score_stage(feats, moments, StageClock()),
        "gate_and_decision": lambda: pred.decision_stage(moments, scores),  # the p-values as finish() gets them
    }
    wall: Dict[str, List[float]] = {k: [] for k in list(parts) + list(split)}
    cpu: Dict[str, List[float]] = {k: [] for k in wall}
    for _ in range(max(repeats // 10, 20)):  # warm-up
        for fn in list(parts.values()) + list(split.values()):
            fn()
    for _ in range(repeats):
        for k, fn in list(parts.items()) + list(split.items()):
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[k].append((time.thread_time() - c0) * 1e6)
            wall[k].append((time.perf_counter() - w0) * 1e6)
    out = {"bundle": str(pred.bundle.path), "image": src, "repeats": repeats, "settings": pred.describe_settings(),
           "detectors": list(pred.detector_names), "calls_per_frame": _calls_per_frame(overhead),
           "load_average": [round(v, 2) for v in os.getloadavg()],
           "wall": {k: _stats_us(v) for k, v in wall.items()}, "cpu": {k: _stats_us(v) for k, v in cpu.items()},
           "target_us": OVERHEAD_TARGET_US}
    best = out["cpu"]["overhead"]["best_us"]
    out["met"] = best <= OVERHEAD_TARGET_US
    return out


@click.command(help=__doc__.splitlines()[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--detectors", type=int, default=3, show_default=True)
@click.option("--calibration", type=int, default=5000, show_default=True)
@click.option("--repeats", type=int, default=20000, show_default=True)
@click.option("--frame", is_flag=True, help="the default Predictor's per-frame overhead instead (frame_overhead)")
def main(detectors: int, calibration: int, repeats: int, frame: bool) -> None:
    print(json.dumps(frame_overhead(min(repeats, 5000)) if frame else measure(detectors, calibration, repeats)))


if __name__ == "__main__":
    main()
