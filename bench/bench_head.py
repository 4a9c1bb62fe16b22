"""Head-only cost of the samplers: numpy vs native (every kernel variant) vs analytic (vs the exported ONNX/TFLite
head when the bundle has one), and how close the closed form is to MC dropout.

    python bench/bench_head.py [--bundle DIR] [--reps N] [--out bench/results] [--images N]

Heads: the paper's shape (F=2048 ResNet50 and F=1280 EfficientNet-B0 features, H=300, C=100, sigmoid, random
He-scaled weights, ReLU-like features) and the bundle's head (default: the embedded one), at T = 20, 30, 50, 100.
Per call: median and p90 wall time (time.perf_counter) over --reps calls after warm-up, all in one run so that the
ratios compare like with like. "dense-equivalent MAC/s" counts T * (F*H + H*C) multiply-adds per call, what a
dense masked evaluation would do; the native kernel does fewer, so its figure can exceed the machine's peak.
Analytic vs MC (T=1000): max abs error of mean and std, and agreement of the bundle's keep/ignore decision and
label, over the bundle's sample images and the first --images Fashion-MNIST test images when installed.
Writes head.json and head.md into --out. numpy runs with 1 BLAS thread like the kernel (EDGE_QUQ_BENCH_BLAS_THREADS).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.blas_threads import BLAS_THREADS  # noqa: E402  (before numpy)

import click  # noqa: E402
import numpy as np  # noqa: E402

from edge_quq.samplers.analytic import AnalyticSampler  # noqa: E402
from edge_quq.bundle import load_bundle  # noqa: E402
from edge_quq.decision import decide  # noqa: E402
from edge_quq.head import HeadWeights, load_head_weights  # noqa: E402
from edge_quq.samplers import make_sampler  # noqa: E402
from edge_quq.samplers.reference import NumpySampler  # noqa: E402
from edge_quq.samplers import native as sampler_native  # noqa: E402

TS = (20, 30, 50, 100)


def paper_head(f: int, h: int = 300, c: int = 100, seed: int = 0) -> HeadWeights:
    rng = np.random.default_rng(seed)
    return HeadWeights(
        kernels=((rng.normal(size=(f, h)) * np.sqrt(2 / f)).astype(np.float32),
                 (rng.normal(size=(h, c)) * np.sqrt(2 / h)).astype(np.float32)),
        biases=((rng.normal(size=h) * 0.1).astype(np.float32), (rng.normal(size=c) * 0.1 - 2).astype(np.float32)),
        rates=(0.2, 0.4),
        activation="sigmoid",
    )


def time_calls(fn: Callable[[], object], reps: int) -> Dict[str, float]:
    for _ in range(max(3, reps // 20)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_us": statistics.median(times) * 1e6, "p90_us": times[int(0.9 * (len(times) - 1))] * 1e6}


def bench_head(name: str, head: HeadWeights, x: np.ndarray, reps: int, bundle=None) -> List[dict]:
    f, h, c = head.feature_size, head.hidden_sizes[0], head.num_classes
    samplers: Dict[str, object] = {"numpy": NumpySampler(head, seed=0)}
    for isa in sampler_native.kernel_isas():
        samplers[f"native[{isa}]"] = sampler_native.NativeSampler(head, seed=0, isa=isa)
    samplers["analytic"] = AnalyticSampler(head)
    if bundle is not None:
        for kind in ("onnx", "tflite"):
            try:
                samplers[f"{kind} head"] = make_sampler(kind, head, seed=0, bundle=bundle, threads=1)
            except Exception as e:  # no exported head of that kind, or no runtime installed
                print(f"  {kind} head skipped: {e}", file=sys.stderr)
    rows = []
    for t in TS:
        dense_macs = t * (f * h + h * c)
        res = {}
        for sname, smp in samplers.items():
            n = reps if not sname.startswith("numpy") or f < 1000 else max(20, reps // 4)
            res[sname] = time_calls(lambda s=smp: s.sample(x, t), n)
        best_native = min((v["median_us"], k) for k, v in res.items() if k.startswith("native")) if any(
            k.startswith("native") for k in res) else None
        for sname, r in res.items():
            rows.append({
                "head": name, "F": f, "H": h, "C": c, "T": t, "sampler": sname,
                "median_us": round(r["median_us"], 1), "p90_us": round(r["p90_us"], 1),
                "dense_equiv_gmacs": round(dense_macs / r["median_us"] / 1e3, 2),
                "speedup_vs_numpy": round(res["numpy"]["median_us"] / r["median_us"], 2),
            })
        msg = f"{name} T={t}: numpy {res['numpy']['median_us']:.0f} us"
        if best_native:
            msg += f", best native {best_native[1]} {best_native[0]:.0f} us ({res['numpy']['median_us'] / best_native[0]:.2f}x)"
        print(msg, file=sys.stderr)
    return rows


def load_fashion_mnist(n: int) -> Optional[np.ndarray]:
    from edge_quq_export.datasets import FASHION_MNIST_DIR, load_fashion_mnist as load

    if n <= 0 or not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").exists():
        return None
    return load("test")[0][:n]


def analytic_vs_mc(bundle_dir: Optional[str], n_images: int) -> Optional[dict]:
    """Closed form vs MC T=1000 on real backbone features of the bundle."""
    try:
        from edge_quq.predictor import Predictor

        pred = Predictor.from_bundle(bundle_dir, backend="onnx", sampler="numpy", seed=0, gradient=None)
    except Exception as e:  # backbone runtime missing: report without this section
        print(f"  analytic vs MC skipped: {e}", file=sys.stderr)
        return None
    images = sorted((ROOT / "edge_quq" / "data" / "samples").glob("*.png")) if bundle_dir is None else []
    inputs = [pred.load_input(str(p)) for p in images]
    fm = load_fashion_mnist(n_images) if pred.bundle.input.shape[:2] == (28, 28) else None
    if fm is not None:
        inputs += [pred.load_input(img) for img in fm]
    if not inputs:
        return None
    feats = np.concatenate([pred.features(b[None]) for b in inputs])
    head, d = pred.head, pred.bundle.decision
    mc = sampler_native.NativeSampler(head, seed=1) if sampler_native.available() else NumpySampler(head, seed=1)
    an = AnalyticSampler(head)
    err_m, err_s, agree_keep, agree_label = [], [], 0, 0
    for x in feats:
        a, m = an.sample(x), mc.sample(x, 1000)
        err_m.append(np.abs(a.mean - m.mean).max())
        err_s.append(np.abs(a.std - m.std).max())
        da, dm = decide(a.mean, a.std, d.z, d.threshold, d.mixed), decide(m.mean, m.std, d.z, d.threshold, d.mixed)
        agree_keep += da.keep == dm.keep
        agree_label += (da.keep, da.label) == (dm.keep, dm.label)
    n = len(feats)
    return {
        "bundle": str(pred.bundle.path), "inputs": n, "mc_T": 1000, "z": d.z, "threshold": d.threshold,
        "mean_abs_err_max": round(float(np.max(err_m)), 4), "mean_abs_err_median": round(float(np.median(err_m)), 4),
        "std_abs_err_max": round(float(np.max(err_s)), 4), "std_abs_err_median": round(float(np.median(err_s)), 4),
        "keep_agreement": round(agree_keep / n, 4), "decision_and_label_agreement": round(agree_label / n, 4),
    }


def write_markdown(path: Path, report: dict) -> None:
    lines = ["# Head sampler cost", "",
             f"Machine: {report['machine']}; native kernel variants: {', '.join(report['native_isas']) or 'not built'} "
             f"(default {report['native_default']}); CPU features: {report['cpu_features']}; numpy BLAS threads: "
             f"{report['numpy_blas_threads']} (the native kernel uses 1); load average at the end: {report['load_average']}.", "",
             "Median wall time per `sample(features, T)` call in one run; speed-up = numpy median / this median. "
             "Dense-equivalent GMAC/s = T*(F*H+H*C) / time.", ""]
    for head in dict.fromkeys(r["head"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["head"] == head]
        lines += [f"## {head} (F={rows[0]['F']}, H={rows[0]['H']}, C={rows[0]['C']})", "",
                  "| T | sampler | median µs | p90 µs | dense-equiv GMAC/s | speed-up vs numpy |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['T']} | {r['sampler']} | {r['median_us']:.1f} | {r['p90_us']:.1f} | "
                         f"{r['dense_equiv_gmacs']:.2f} | {r['speedup_vs_numpy']:.2f} |")
        lines.append("")
    a = report.get("analytic_vs_mc")
    if a:
        lines += ["## Analytic vs MC (T=1000) on the bundle's real features", "",
                  f"{a['inputs']} inputs, z={a['z']}, threshold={a['threshold']}: max |mean error| {a['mean_abs_err_max']} "
                  f"(median {a['mean_abs_err_median']}), max |std error| {a['std_abs_err_max']} (median {a['std_abs_err_median']}); "
                  f"keep/ignore agreement {a['keep_agreement']:.1%}, decision+label agreement {a['decision_and_label_agreement']:.1%}.", ""]
    path.write_text("\n".join(lines))


@click.command(help=__doc__.split("\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_path", default=None, help="bundle folder (default: the embedded one)")
@click.option("--reps", type=int, default=200, show_default=True)
@click.option("--images", type=int, default=500, show_default=True, help="Fashion-MNIST test images for analytic vs MC")
@click.option("--out", default=str(ROOT / "bench" / "results"), show_default=True)
def main(bundle_path: Optional[str], reps: int, images: int, out: str) -> None:

    rng = np.random.default_rng(0)
    rows = []
    for f, label in ((2048, "paper head, ResNet50 features"), (1280, "paper head, EfficientNet-B0 features")):
        x = (np.maximum(rng.normal(size=f), 0) * 2).astype(np.float32)
        rows += bench_head(label, paper_head(f), x, reps)
    bundle = load_bundle(bundle_path)
    head = load_head_weights(bundle)
    x = (np.maximum(rng.normal(size=head.feature_size), 0) * 2).astype(np.float32)
    rows += bench_head(f"bundle head ({bundle.path.name})", head, x, reps, bundle=bundle)

    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()} numpy {np.__version__}".strip(),
        "native_isas": list(sampler_native.kernel_isas()),
        "native_default": sampler_native.kernel_isa(),
        "cpu_features": sampler_native._kernel.cpu_features() if sampler_native.available() else "",
        "reps": reps,
        "numpy_blas_threads": BLAS_THREADS,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": rows,
        "analytic_vs_mc": analytic_vs_mc(bundle_path, images),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head.json").write_text(json.dumps(report, indent=1))
    write_markdown(out / "head.md", report)
    print(f"wrote {out / 'head.json'} and {out / 'head.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
