"""OOD detectors of a bundle: detection quality and cost per sample.

    python bench/bench_detectors.py [--bundle DIR] [--id-samples 10000] [--ood-samples 2000]

In-distribution: the Fashion-MNIST test set (the bundle's detectors were fitted on the training set).
Out-of-distribution, all built offline (no MNIST package ships in Debian; nothing can be downloaded):
  far-OOD, synthetic: digits drawn with OpenCV's Hershey fonts (an MNIST stand-in), uniform noise, smooth
  noise blobs, checkerboards, concentric rings, flat grey images;
  shifted: Fashion-MNIST test images under a corruption (Gaussian noise, blur, low contrast, pixelation,
  inversion, a 90-degree rotation) - covariate shift scored as OOD, as OpenOOD does for its shift sets.
Every score is oriented higher = more OOD (MSP as -max_prob) and evaluated with edge_quq.metrics.ood_metrics
(OpenOOD convention: OOD positive for AUROC / AUPR-out, ID positive for AUPR-in, FPR@95 = ID share flagged at
the threshold catching 95% of the OOD set). The MC scores come from the bundle's head sampler at its default
T; the detectors from the bundle's detectors.npz, evaluated as the board does (stored precision).
Cost: each detector scored on one feature vector at a time (the board's case): median and p90 time per
sample, and the peak of Python/numpy allocations during a call (tracemalloc) beside the detector's resident
arrays. Writes bench/results/detectors.{json,md}.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Dict, List, Optional

import click
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.suite` (the benchmark suite's OOD sets and corruptions) when present
SUITE_CORRUPTIONS = ("gaussian_noise", "shot_noise", "gaussian_blur", "motion_blur", "contrast", "fog",
                     "pixelate", "jpeg_compression", "elastic_transform")
SUITE_SEVERITY = 3
MC_SCORES = ("msp", "predictive_entropy", "mutual_information", "mean_variance")


# --- OOD sets (uint8 [N, 28, 28]) ---------------------------------------------------------------------------

def synth_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
             cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX]
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        img = np.zeros((56, 56), np.uint8)
        d = str(int(rng.integers(10)))
        font = fonts[int(rng.integers(len(fonts)))]
        scale = float(rng.uniform(1.3, 1.9)) * (1.6 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
        thick = int(rng.integers(3, 7))
        (w, h), _ = cv2.getTextSize(d, font, scale, thick)
        x = int((56 - w) / 2 + rng.integers(-4, 5))
        y = int((56 + h) / 2 + rng.integers(-4, 5))
        cv2.putText(img, d, (x, y), font, scale, 255, thick, cv2.LINE_AA)
        out[i] = cv2.resize(img, (28, 28), interpolation=cv2.INTER_AREA)
    return out


def uniform_noise(n, rng):
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)


def smooth_blobs(n, rng):
    low = rng.uniform(0, 255, (n, 7, 7)).astype(np.float32)
    return np.stack([cv2.resize(a, (28, 28), interpolation=cv2.INTER_CUBIC) for a in low]).clip(0, 255).astype(np.uint8)


def checkerboards(n, rng):
    yy, xx = np.mgrid[:28, :28]
    out = np.empty((n, 28, 28), np.uint8)
    for i in range(n):
        p = int(rng.integers(2, 8))
        ox, oy = rng.integers(0, p, 2)
        lo, hi = sorted(rng.integers(0, 256, 2))
        out[i] = np.where((((xx + ox) // p) + ((yy + oy) // p)) % 2 == 0, hi, lo)
    return out


def rings(n, rng):
    yy, xx = np.mgrid[:28, :28].astype(np.float32)
    out = np.empty((n, 28, 28), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(8, 20, 2)
        f = rng.uniform(0.4, 1.6)
        r = np.hypot(xx - cx, yy - cy)
        out[i] = (127.5 + 127.5 * np.cos(f * r)).astype(np.uint8)
    return out


def flat_grey(n, rng):
    return np.repeat(rng.integers(0, 256, (n, 1, 1), dtype=np.uint8), 28, 1).repeat(28, 2)


FAR_OOD: Dict[str, Callable] = {
    "digits (synthetic)": synth_digits, "uniform noise": uniform_noise, "smooth noise": smooth_blobs,
    "checkerboards": checkerboards, "rings": rings, "flat grey": flat_grey,
}


def c_noise(x, rng):
    return np.clip(x.astype(np.float32) + rng.normal(0, 0.2 * 255, x.shape), 0, 255).astype(np.uint8)


def c_blur(x, rng):
    return np.stack([cv2.GaussianBlur(a, (0, 0), 1.5) for a in x])


def c_contrast(x, rng):
    xf = x.astype(np.float32)
    m = xf.mean(axis=(1, 2), keepdims=True)
    return np.clip((xf - m) * 0.3 + m, 0, 255).astype(np.uint8)


def c_pixelate(x, rng):
    return np.stack([cv2.resize(cv2.resize(a, (7, 7), interpolation=cv2.INTER_AREA), (28, 28), interpolation=cv2.INTER_NEAREST) for a in x])


def c_invert(x, rng):
    return 255 - x


def c_rot90(x, rng):
    return np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))


SHIFTS: Dict[str, Callable] = {
    "gaussian noise 0.2": c_noise, "gaussian blur 1.5": c_blur, "contrast 0.3": c_contrast,
    "pixelate 7x7": c_pixelate, "inverted": c_invert, "rotated 90": c_rot90,
}


# --- scoring ------------------------------------------------------------------------------------------------

def all_scores(pred, x_u8: np.ndarray) -> Dict[str, np.ndarray]:
    from edge_quq.scores import compute_scores
    from edge_quq_export.datasets import preprocess_array

    b = pred.bundle
    x = preprocess_array(x_u8[..., None], b.input.shape, b.input.preprocess, "bench")
    feats = np.concatenate([pred.features(x[i : i + 256]) for i in range(0, len(x), 256)])
    m = pred.sampler.sample(feats, pred.settings.num_iter)  # batched: the same stream as one call per sample
    s = compute_scores(m.mean, m.std, m.logits, m.expected_entropy, pred.head.activation)
    out = {"msp": -s["max_prob"], **{k: s[k] for k in MC_SCORES[1:]}}
    out.update(pred.detectors.score_all(feats, pred.head))
    return out, feats


def cost(pred, feats: np.ndarray, reps: int) -> Dict[str, Dict[str, float]]:
    res = {}
    rows = feats[:reps]
    for n, d in pred.detectors.detectors.items():
        for f in rows[:20]:
            d.score(f[None], pred.head)  # warm caches
        ts = []
        for f in rows:
            t0 = time.perf_counter_ns()
            d.score(f[None], pred.head)
            ts.append(time.perf_counter_ns() - t0)
        tracemalloc.start()
        d.score(rows[0][None], pred.head)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res[n] = {"us_p50": float(np.percentile(ts, 50)) / 1e3, "us_p90": float(np.percentile(ts, 90)) / 1e3,
                  "call_peak_kib": peak / 1024, "resident_kib": d.memory_bytes() / 1024, "stored_kib": d.nbytes() / 1024,
                  "stored_dtype": d.dtype}
    ts = []
    for f in rows:
        t0 = time.perf_counter_ns()
        pred.sampler.sample(f, pred.settings.num_iter)
        ts.append(time.perf_counter_ns() - t0)
    res["_mc_head"] = {"us_p50": float(np.percentile(ts, 50)) / 1e3, "us_p90": float(np.percentile(ts, 90)) / 1e3}
    return res


def knn_ablation(pred, train_feats, train_y, id_feats, ood_feats: Dict[str, np.ndarray], shift_feats: Dict[str, np.ndarray]) -> List[Dict]:
    """KNN bank size / k / storage against mean far-OOD and shift AUROC and cost (bank subsampled from the fit data)."""
    from edge_quq.detectors import fit_detectors
    from edge_quq.metrics import ood_metrics

    rows = []
    for bank, k, dtypes in ((256, 1, None), (256, 10, None), (1024, 1, None), (1024, 10, None), (1024, 10, ("int8",)),
                            (2048, 1, None), (2048, 10, None), (8192, 1, None), (8192, 10, None)):
        kw = {"dtypes": dtypes, "tolerance": 1.0} if dtypes else {}  # forced storage
        ds = fit_detectors(train_feats, train_y, pred.head, ["knn"], seed=0, config={"knn": {"k": k, "bank_size": bank}}, **kw)
        d = ds.detectors["knn"]
        s_id = d.score(id_feats, pred.head)
        au = [ood_metrics(s_id, d.score(f, pred.head))["auroc"] for f in ood_feats.values()]
        au_shift = [ood_metrics(s_id, d.score(f, pred.head))["auroc"] for f in shift_feats.values()]
        t0 = time.perf_counter()
        for f in id_feats[:300]:
            d.score(f[None], pred.head)
        us = (time.perf_counter() - t0) / 300 * 1e6
        rows.append({"bank_size": bank, "k": k, "stored": d.dtype, "stored_kib": d.nbytes() / 1024,
                     "mean_far_auroc": float(np.mean(au)), "mean_shift_auroc": float(np.mean(au_shift)),
                     "id_test_flagged": float(np.mean(d.flag(s_id))), "us_per_sample": us})
    return rows


def fmt(v: float) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def ood_sets(samples: int):
    """(far sets, shift functions, description): the benchmark suite's sets when importable, so the numbers
    sit beside its tables, else this script's own."""
    try:
        from bench.suite.corruptions import corrupt
        from bench.suite.ood import far_ood_sets
    except ImportError:
        return FAR_OOD, SHIFTS, "own (bench/bench_detectors.py)"
    suite_far = far_ood_sets(samples, 0)
    far_sets = {k: (lambda n, r, _v=v: _v) for k, v in suite_far.items()}
    shift_fns = {f"{c} s{SUITE_SEVERITY}": (lambda x, r, _c=c: corrupt(_c, x, SUITE_SEVERITY, 0)) for c in SUITE_CORRUPTIONS}
    shift_fns.update({"inverted": c_invert, "rotated 90": c_rot90})
    return far_sets, shift_fns, (f"bench.suite (far_ood_sets; corruptions {', '.join(SUITE_CORRUPTIONS)} at severity "
                                 f"{SUITE_SEVERITY}) plus inversion and 90-degree rotation")


def summarise(sets: Dict[str, Dict], names: List[str]) -> Dict[str, Dict[str, float]]:
    """Per score: the OOD metrics averaged over the far sets and over the shifted sets."""
    summary = {}
    for n in names:
        far = [s["metrics"][n] for s in sets.values() if s["kind"] == "far"]
        sh = [s["metrics"][n] for s in sets.values() if s["kind"] == "shift"]
        summary[n] = {f"{grp}_{m}": float(np.mean([x[m] for x in lst])) for grp, lst in (("far", far), ("shift", sh))
                      for m in ("auroc", "aupr_in", "aupr_out", "fpr95")}
    return summary


@click.command(help=__doc__.split("\n")[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", default=None, help="bundle with detectors (default: the embedded one)")
@click.option("--id-samples", type=int, default=10000, show_default=True)
@click.option("--ood-samples", type=int, default=2000, show_default=True)
@click.option("--reps", type=int, default=500, show_default=True, help="single-sample calls timed per detector")
@click.option("--no-ablation", is_flag=True, help="skip the KNN bank-size ablation (needs the training set)")
@click.option("--out", default=str(ROOT / "bench" / "results"), show_default=True)
def main(bundle: Optional[str], id_samples: int, ood_samples: int, reps: int, no_ablation: bool, out: str) -> None:

    from edge_quq.metrics import ood_metrics
    from edge_quq.predictor import Predictor
    from edge_quq_export.datasets import load_fashion_mnist

    t_start = time.time()
    load0 = os.getloadavg()
    pred = Predictor.from_bundle(bundle, seed=0)
    if pred.detectors is None:
        click.echo(f"error: {pred.bundle.path} has no detectors; run edge-quq fit-detectors first", err=True)
        sys.exit(2)
    rng = np.random.default_rng(0)
    xt, yt = load_fashion_mnist("test")
    far_sets, shift_fns, source = ood_sets(ood_samples)
    idx = np.sort(rng.choice(len(xt), min(id_samples, len(xt)), replace=False))
    id_scores, id_feats = all_scores(pred, xt[idx])
    names = list(MC_SCORES) + pred.detectors.names
    sets: Dict[str, Dict] = {}
    ood_feats: Dict[str, np.ndarray] = {}
    shift_feats: Dict[str, np.ndarray] = {}
    shift_src = xt[np.sort(rng.choice(len(xt), min(ood_samples, len(xt)), replace=False))]
    for kind, table in (("far", far_sets), ("shift", shift_fns)):
        for sname, fn in table.items():
            x = fn(ood_samples, rng) if kind == "far" else fn(shift_src, rng)
            sc, fe = all_scores(pred, x)
            (ood_feats if kind == "far" else shift_feats)[sname] = fe
            metrics = {n: ood_metrics(id_scores[n], sc[n]) for n in names}
            flagged = {n: float(np.mean(hit)) for n, hit in pred.detectors.flags(sc).items()}
            sets[sname] = {"kind": kind, "samples": len(x), "metrics": metrics, "flagged_at_threshold": flagged}
            print(f"{sname:<22} " + " ".join(f"{n}={metrics[n]['auroc']:.3f}" for n in names), file=sys.stderr)
    id_flagged = {n: float(np.mean(hit)) for n, hit in pred.detectors.flags(id_scores).items()}
    costs = cost(pred, id_feats, reps)
    ablation = []
    if not no_ablation:
        xtr, ytr = load_fashion_mnist("train")
        from edge_quq_export.datasets import preprocess_array

        b = pred.bundle
        xx = preprocess_array(xtr[..., None], b.input.shape, b.input.preprocess, "train")
        tf = np.concatenate([pred.features(xx[i : i + 256]) for i in range(0, len(xx), 256)])
        ablation = knn_ablation(pred, tf, ytr, id_feats, ood_feats, shift_feats)

    summary = summarise(sets, names)
    report = {
        "bundle": str(pred.bundle.path), "detectors_meta": pred.detectors.meta,
        "id": {"data": "Fashion-MNIST test", "samples": int(len(idx)), "flagged_at_threshold": id_flagged},
        "mc": {"num_iter": pred.settings.num_iter, "sampler": pred.sampler.name},
        "sets_source": source, "sets": sets, "summary": summary, "cost": costs, "knn_ablation": ablation,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "backend": pred.backbone.describe(), "numpy": np.__version__},
        "seconds": round(time.time() - t_start, 1),
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "detectors.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "detectors.md").write_text(markdown(report, names) + "\n")
    print(f"wrote {out_dir / 'detectors.json'} and {out_dir / 'detectors.md'} in {report['seconds']} s", file=sys.stderr)


def markdown(r: Dict, names: List[str]) -> str:
    m = r["machine"]
    L = ["# OOD detectors: detection quality and cost", "",
         f"Bundle `{Path(r['bundle']).name}`; ID = {r['id']['data']} ({r['id']['samples']} images); MC scores from the "
         f"`{r['mc']['sampler']}` head sampler at T={r['mc']['num_iter']}; detectors fitted on "
         f"{r['detectors_meta'].get('fit', {}).get('data', '?')} ({r['detectors_meta'].get('fit', {}).get('features', '')}).",
         f"Machine: {m['platform']}, {m['cpus']} CPUs, load average {m['loadavg_start'][0]:.2f} at start and "
         f"{m['loadavg_end'][0]:.2f} at end (shared with other jobs: compare ratios within this run). Backbone: {m['backend']}.",
         f"OOD and shift sets: {r['sets_source']}.",
         "", "Higher score = more OOD for every row (MSP is -max_prob). AUROC / AUPR-out: OOD positive; AUPR-in: ID positive; "
         "FPR@95: ID share flagged at the threshold that catches 95% of the OOD set (lower is better).", "",
         "## Summary (mean over sets)", "",
         "| score | far AUROC | far AUPR-in | far AUPR-out | far FPR@95 | shift AUROC | shift AUPR-in | shift AUPR-out | shift FPR@95 |",
         "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = r["summary"][n]
        L.append(f"| {n} | " + " | ".join(fmt(s[f"{g}_{k}"]) for g in ("far", "shift") for k in ("auroc", "aupr_in", "aupr_out", "fpr95")) + " |")
    L += ["", "## AUROC per set", "", "| score | " + " | ".join(r["sets"]) + " |", "|---|" + "---|" * len(r["sets"])]
    for n in names:
        L.append(f"| {n} | " + " | ".join(fmt(s["metrics"][n]["auroc"]) for s in r["sets"].values()) + " |")
    L += ["", "## FPR@95 per set", "", "| score | " + " | ".join(r["sets"]) + " |", "|---|" + "---|" * len(r["sets"])]
    for n in names:
        L.append(f"| {n} | " + " | ".join(fmt(s["metrics"][n]["fpr95"]) for s in r["sets"].values()) + " |")
    thr = list(r["id"]["flagged_at_threshold"])
    L += ["", "## The fitted thresholds (ID TPR target "
          f"{r['detectors_meta'].get('tpr')}): share flagged", "",
          "| detector | ID test | " + " | ".join(r["sets"]) + " |", "|---|---|" + "---|" * len(r["sets"])]
    for n in thr:
        L.append(f"| {n} | {r['id']['flagged_at_threshold'][n]:.3f} | " + " | ".join(f"{s['flagged_at_threshold'][n]:.3f}" for s in r["sets"].values()) + " |")
    c = r["cost"]
    L += ["", "## Cost per sample (one feature vector per call, as on the board)", "",
          f"MC head sampling at T={r['mc']['num_iter']} for reference: p50 {c['_mc_head']['us_p50']:.1f} µs, p90 {c['_mc_head']['us_p90']:.1f} µs.", "",
          "| detector | p50 µs | p90 µs | peak allocation per call KiB | resident arrays KiB | stored KiB (dtype) |", "|---|---|---|---|---|---|"]
    for n, v in c.items():
        if n.startswith("_"):
            continue
        L.append(f"| {n} | {v['us_p50']:.1f} | {v['us_p90']:.1f} | {v['call_peak_kib']:.1f} | {v['resident_kib']:.1f} | {v['stored_kib']:.1f} ({v['stored_dtype']}) |")
    if r["knn_ablation"]:
        L += ["", "## KNN: bank size, k and storage", "",
              "Bank subsampled from the training features (seed 0, 10% held out for the threshold); mean AUROC over the far-OOD and "
              "shift sets; ID test share flagged at the fitted threshold (target 0.05). The int8 row forces int8 storage, which the "
              "fit's precision check refuses by default.", "",
              "| bank | k | stored | stored KiB | mean far AUROC | mean shift AUROC | ID test flagged | µs/sample |", "|---|---|---|---|---|---|---|---|"]
        for a in r["knn_ablation"]:
            L.append(f"| {a['bank_size']} | {a['k']} | {a['stored']} | {a['stored_kib']:.0f} | {a['mean_far_auroc']:.3f} | "
                     f"{a['mean_shift_auroc']:.3f} | {a['id_test_flagged']:.3f} | {a['us_per_sample']:.1f} |")
    L += ["", f"Run time {r['seconds']} s."]
    return "\n".join(L)


if __name__ == "__main__":
    main()
