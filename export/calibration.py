"""The quantization calibration dilemma report, and post-hoc temperature scaling of a bundle.

    python -m edge_quq_export.calibration report --model bench/models/reference.keras \\
        --bundle edge_quq/data/default_bundle --out bench/results/calibration
    python -m edge_quq_export.calibration set-temperature BUNDLE --fit-data fashion-mnist-val
    python -m edge_quq_export.calibration set-temperature BUNDLE --value 1.25     (or --clear)

`report` simulates post-training quantization of a float Keras model (edge_quq_export.fakequant: weights
per-channel symmetric at 8, 7, 6, 5, 4 bits, activations 8-bit per-tensor asymmetric calibrated on a few
training batches), runs the bundle's real int8 TFLite backbone as one more column, and writes
calibration.json, calibration.md and PNG figures: swapped predictions against the float model, change in
error, their ratio, histograms of the float confidence over the swapped predictions, reliability diagrams
with confidence histograms, ECE (15 equal-width bins), NLL and top-1, before and after temperature scaling.
docs/calibration.md explains every figure.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_quq.bundle import Bundle, Preprocess, load_bundle, set_calibration, sha256_file
from edge_quq.calibration import (calibration_summary, confidence_and_prediction, fit_temperature,
                                  temperature_objective)
from edge_quq.errors import EdgeQuqError, ExportError, OptionError
from edge_quq.head import load_head_weights, output_activation
from edge_quq.metrics import reliability_bins

from edge_quq_export.datasets import FASHION_MNIST_DIR, load_fashion_mnist, load_inputs

DEFAULT_BITS = (8, 7, 6, 5, 4)
BINS = 15
# The reference recipe trains on the first 55k Fashion-MNIST training images and validates on the last 5k:
# those 5k are held out from training and are where temperatures are fitted.
FMNIST_VAL = 5000
FMNIST_VAL_NAME = "fashion-mnist-val"


# --- data -----------------------------------------------------------------------------------------------

@dataclass
class ReportData:
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray
    x_temp: Optional[np.ndarray]
    y_temp: Optional[np.ndarray]
    sources: Dict[str, str] = field(default_factory=dict)


def _pixels_to_input(x: np.ndarray, spec: Preprocess, shape: Sequence[int]) -> np.ndarray:
    from edge_quq_export.datasets import preprocess_array

    return preprocess_array(x, shape, spec, "Fashion-MNIST")


def fashion_mnist_val(root: Path, spec: Preprocess, shape: Sequence[int], limit: Optional[int] = None,
                      seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The reference recipe's validation split (last 5k training images), preprocessed."""
    x, y = load_fashion_mnist("train", root)
    x, y = x[-FMNIST_VAL:], y[-FMNIST_VAL:]
    if limit is not None and limit < len(x):
        keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
        x, y = x[keep], y[keep]
    return _pixels_to_input(x, spec, shape), y


def fashion_mnist_data(root: Path, spec: Preprocess, shape: Sequence[int], test_samples: Optional[int],
                       calib_batches: int, batch_size: int, temp_samples: Optional[int], seed: int) -> ReportData:
    xtr, _ = load_fashion_mnist("train", root)
    xt, yt = load_fashion_mnist("test", root)
    rng = np.random.default_rng(seed)
    if test_samples is not None and test_samples < len(xt):
        keep = np.sort(rng.choice(len(xt), test_samples, replace=False))
        xt, yt = xt[keep], yt[keep]
    n_cal = calib_batches * batch_size
    calib_idx = rng.permutation(len(xtr) - FMNIST_VAL)[:n_cal]  # training part only
    xv, yv = fashion_mnist_val(root, spec, shape, temp_samples, seed)
    return ReportData(
        x_test=_pixels_to_input(xt, spec, shape), y_test=yt,
        x_calib=_pixels_to_input(xtr[np.sort(calib_idx)], spec, shape), x_temp=xv, y_temp=yv,
        sources={"test": f"Fashion-MNIST t10k ({len(xt)} images)",
                 "activation_calibration": f"{calib_batches} batches of {batch_size} Fashion-MNIST training images",
                 "temperature": f"Fashion-MNIST validation split (last {FMNIST_VAL} training images, held out from "
                                f"training; {len(yv)} used)"},
    )


def file_data(test: Path, calib: Path, temp: Optional[Path], spec: Preprocess, shape: Sequence[int],
              classes: Optional[Sequence[str]], calib_samples: int, test_samples: Optional[int], seed: int) -> ReportData:
    xt, yt = load_inputs(test, shape, spec, "test data", test_samples, seed, classes)
    if yt is None:
        raise ExportError(f"{test}: test data has no labels (.npz with 'x' and 'y', or one sub-folder per class)")
    xc, _ = load_inputs(calib, shape, spec, "calibration data", calib_samples, seed)
    xv = yv = None
    if temp is not None:
        xv, yv = load_inputs(temp, shape, spec, "temperature data", None, seed, classes)
        if yv is None:
            raise ExportError(f"{temp}: temperature data has no labels")
    return ReportData(xt, yt, xc, xv, yv, {"test": f"{test} ({len(xt)} images)",
                                           "activation_calibration": f"{calib} ({len(xc)} images)",
                                           "temperature": f"{temp} ({len(yv)} images)" if temp else "none"})


# --- metrics ----------------------------------------------------------------------------------------------

def swap_stats(float_logits: np.ndarray, q_logits: np.ndarray, labels: np.ndarray, activation: str) -> Dict[str, Any]:
    """Xia et al.'s dilemma figures of a quantized model against its float original.

    swapped: share of samples whose top-1 class differs from the float model's; delta_error: quantized minus
    float error rate; ratio = swapped / delta_error (how many predictions change per net error added; null
    when the error did not grow). The histograms bin the float model's confidence (top-class probability)."""
    pf = output_activation(float_logits.astype(np.float64), activation)
    conf_f, pred_f = confidence_and_prediction(pf)
    pred_q = q_logits.argmax(axis=1)
    swapped = pred_q != pred_f
    err_f, err_q = float(np.mean(pred_f != labels)), float(np.mean(pred_q != labels))
    delta = err_q - err_f
    edges = np.linspace(0.0, 1.0, BINS + 1)
    idx = np.clip(np.ceil(conf_f * BINS).astype(int) - 1, 0, BINS - 1)
    n_all = np.bincount(idx, minlength=BINS)
    n_sw = np.bincount(idx[swapped], minlength=BINS)
    return {
        "swapped_pct": 100.0 * float(swapped.mean()),
        "swapped_count": int(swapped.sum()),
        "error_float_pct": 100.0 * err_f,
        "error_pct": 100.0 * err_q,
        "delta_error_pp": 100.0 * delta,
        "swap_to_error_ratio": (float(swapped.mean()) / delta) if delta > 0 else None,
        "swapped_became_correct": int(np.sum(swapped & (pred_q == labels))),
        "swapped_became_wrong": int(np.sum(swapped & (pred_f == labels))),
        "float_confidence_of_swapped_mean": float(conf_f[swapped].mean()) if swapped.any() else None,
        "float_confidence_mean": float(conf_f.mean()),
        "hist_edges": edges.round(6).tolist(),
        "hist_swapped": n_sw.tolist(),
        "hist_all": n_all.tolist(),
        "swap_rate_by_bin_pct": [round(100.0 * s / a, 3) if a else None for s, a in zip(n_sw, n_all)],
    }


def _bins(logits: np.ndarray, labels: np.ndarray, activation: str, temperature: float) -> Dict[str, List[float]]:
    p = output_activation(logits.astype(np.float64) / temperature, activation)
    conf, pred = confidence_and_prediction(p)
    b = reliability_bins(conf, pred == labels, BINS)
    return {k: np.asarray(v).round(6).tolist() for k, v in b.items()}


# --- the report --------------------------------------------------------------------------------------------

def bundle_logits(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    """Raw head logits (no temperature) of the bundle's int8 TFLite backbone + float head, eval mode."""
    from edge_quq_export.parity import run_tflite

    mf = bundle.backbone_tflite
    if mf is None:
        raise ExportError(f"{bundle.path}: bundle has no TFLite backbone for the int8 column")
    feats = run_tflite(bundle.file(mf.file), x, {"input": mf.input.to_json(), "output": mf.output.to_json()})
    return load_head_weights(bundle).logits(feats).astype(np.float64)


def build_report(model, data: ReportData, bits: Sequence[int] = DEFAULT_BITS, bundle: Optional[Bundle] = None,
                 model_name: str = "model") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(report JSON, arrays for the figures). Columns: float, W{b}A8 for each b, and the bundle's int8 TFLite."""
    from edge_quq_export.fakequant import FakeQuantModel

    t0 = time.perf_counter()
    fq = FakeQuantModel(model)
    act = fq.activation
    if act == "linear":
        raise ExportError("the model's output is linear: calibration figures need a sigmoid or softmax output")
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    fq.calibrate(data.x_calib)
    timings["activation_calibration_s"] = time.perf_counter() - t
    logits: Dict[str, np.ndarray] = {}
    t = time.perf_counter()
    logits["float"] = fq.logits(data.x_test, None, quantize_activations=False).astype(np.float64)
    timings["float_s"] = time.perf_counter() - t
    for b in bits:
        t = time.perf_counter()
        logits[f"W{b}A8"] = fq.logits(data.x_test, b).astype(np.float64)
        timings[f"W{b}A8_s"] = time.perf_counter() - t
    tfl_name = "int8 TFLite (bundle)"
    if bundle is not None:
        t = time.perf_counter()
        logits[tfl_name] = bundle_logits(bundle, data.x_test)
        timings["int8_tflite_s"] = time.perf_counter() - t
    y = data.y_test

    # Temperatures on held-out data: the float model's (applied to every simulated precision: "calibrate
    # the float model, then quantize") and the deployed int8 model's (what a bundle would carry).
    temps: Dict[str, Any] = {"objective": temperature_objective(act), "data": data.sources.get("temperature")}
    t_float = t_int8 = 1.0
    if data.x_temp is not None:
        vf = fq.logits(data.x_temp, None, quantize_activations=False).astype(np.float64)
        t_float = fit_temperature(vf, data.y_temp, act)
        temps["float"] = {"temperature": t_float, "heldout_before": calibration_summary(vf, data.y_temp, act, 1.0, BINS),
                          "heldout_after": calibration_summary(vf, data.y_temp, act, t_float, BINS)}
        if bundle is not None:
            vq = bundle_logits(bundle, data.x_temp)
            t_int8 = fit_temperature(vq, data.y_temp, act)
            temps["int8_tflite"] = {"temperature": t_int8, "heldout_before": calibration_summary(vq, data.y_temp, act, 1.0, BINS),
                                    "heldout_after": calibration_summary(vq, data.y_temp, act, t_int8, BINS)}
        if bundle is not None and bundle.temperature != 1.0:
            temps["bundle_manifest_temperature"] = bundle.temperature

    columns: Dict[str, Any] = {}
    fig: Dict[str, Any] = {"activation": act, "labels": y, "logits": logits, "columns": {}}
    for name, z in logits.items():
        t_after = t_int8 if name == tfl_name else t_float
        col: Dict[str, Any] = {"before": calibration_summary(z, y, act, 1.0, BINS)}
        if data.x_temp is not None:
            col["temperature"] = t_after
            col["after"] = calibration_summary(z, y, act, t_after, BINS)
            col["after_swaps_unchanged"] = True  # one positive T never changes an argmax
        if name != "float":
            col["vs_float"] = swap_stats(logits["float"], z, y, act)
        col["reliability_before"] = _bins(z, y, act, 1.0)
        if data.x_temp is not None:
            col["reliability_after"] = _bins(z, y, act, t_after)
        columns[name] = col
    report = {
        "title": f"Quantization calibration report: {model_name}",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model_name,
        "bundle": str(bundle.path) if bundle is not None else None,
        "output_activation": act,
        "data": data.sources,
        "test_samples": int(len(y)),
        "simulation": {
            "weights": "per-output-channel symmetric, narrow range, bits " + ", ".join(str(b) for b in bits),
            "activations": "8-bit per-tensor asymmetric, min/max calibrated on the float model",
            "activation_calibration_samples": int(len(data.x_calib)),
            **fq.describe(),
        },
        "confidence": "top-class probability" + (" (largest per-class sigmoid)" if act == "sigmoid" else ""),
        "ece_bins": BINS,
        "temperature": temps,
        "columns": columns,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "load": {"cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
                 "total_s": round(time.perf_counter() - t0, 1)},
    }
    return report, fig


# --- writing ------------------------------------------------------------------------------------------------

def _fmt(v: Optional[float], nd: int = 2) -> str:
    if v is None:
        return "∞ (error did not grow)"
    return f"{v:.{nd}f}"


def render_markdown(r: Dict[str, Any], pngs: Sequence[str]) -> str:
    cols = r["columns"]
    lines = [f"# {r['title']}", "",
             f"Created {r['created']}. Test data: {r['data'].get('test')}. Output activation: {r['output_activation']}; "
             f"confidence = {r['confidence']}; ECE with {r['ece_bins']} equal-width bins.", "",
             f"Simulated PTQ: weights {r['simulation']['weights']}; activations {r['simulation']['activations']} "
             f"({r['simulation']['activation_calibration_samples']} samples: {r['data'].get('activation_calibration')}). "
             f"BN folded into: {', '.join(sorted(set(r['simulation']['folded_batchnorm'].values()))) or 'none'}. "
             f"Quantized tensors: {', '.join(r['simulation']['quantized_tensors'])}.", ""]
    if r.get("bundle"):
        lines += [f"The last column runs the bundle's real int8 TFLite backbone ({r['bundle']}) with its float head.", ""]
    lines += ["## Predictions swapped by quantization", "",
              "| column | top-1 % | error % | swapped % | Δ error (pp) | swapped / Δ error | mean float conf. of swapped | mean float conf. (all) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, c in cols.items():
        b = c["before"]
        if "vs_float" not in c:
            lines.append(f"| {name} | {100 * b['top1']:.2f} | {100 * (1 - b['top1']):.2f} | – | – | – | – | {b['mean_confidence']:.3f} |")
            continue
        s = c["vs_float"]
        cs = s["float_confidence_of_swapped_mean"]
        lines.append(f"| {name} | {100 * b['top1']:.2f} | {s['error_pct']:.2f} | {s['swapped_pct']:.2f} | {s['delta_error_pp']:+.2f} | "
                     f"{_fmt(s['swap_to_error_ratio'], 1)} | {'–' if cs is None else f'{cs:.3f}'} | {s['float_confidence_mean']:.3f} |")
    lines += ["", "Swapped = top-1 class differs from the float model's. A ratio well above 1 means most swaps cancel out "
              "in the error rate: quantization moves many predictions while the accuracy barely changes.", ""]
    lines += ["## Calibration", "",
              "| column | ECE | NLL | binary NLL | Brier | mean conf. | T | ECE after T | NLL after T |" if r["output_activation"] == "sigmoid"
              else "| column | ECE | NLL | Brier | mean conf. | T | ECE after T | NLL after T |",
              "|---|---|---|---|---|---|---|---|---|" if r["output_activation"] == "sigmoid" else "|---|---|---|---|---|---|---|---|"]
    for name, c in cols.items():
        b = c["before"]
        a = c.get("after")
        tail = (f"{c['temperature']:.3f} | {a['ece']:.4f} | {a['nll']:.4f}" if a else "– | – | –")
        mid = f"{b['binary_nll']:.4f} | " if "binary_nll" in b else ""
        lines.append(f"| {name} | {b['ece']:.4f} | {b['nll']:.4f} | {mid}{b['brier']:.4f} | {b['mean_confidence']:.3f} | {tail} |")
    lines += [""]
    if r["output_activation"] == "sigmoid":
        lines += ["NLL is the categorical NLL of the per-class sigmoids renormalised to sum to 1; binary NLL is the "
                  "training objective (BCE summed over classes), which the temperature minimises.", ""]
    t = r["temperature"]
    if "float" in t:
        lines += ["## Temperature scaling", "",
                  f"Fitted on {t.get('data')}, objective: {t['objective']}.", "",
                  "| model | T | held-out ECE before → after | held-out NLL before → after |", "|---|---|---|---|"]
        for key, label in (("float", "float (applied to every simulated precision)"), ("int8_tflite", "int8 TFLite (bundle)")):
            if key in t:
                e = t[key]
                lines.append(f"| {label} | {e['temperature']:.4f} | {e['heldout_before']['ece']:.4f} → {e['heldout_after']['ece']:.4f} | "
                             f"{e['heldout_before']['nll']:.4f} → {e['heldout_after']['nll']:.4f} |")
        lines += ["", "A single positive temperature never changes a top-1 class, so the swap figures above hold "
                  "unchanged after scaling.", ""]
    lines += ["## Figures", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    lines += [f"Run time {r['load']['total_s']} s on {r['load']['cpus']} CPUs, 1-minute load average at the end "
              f"{r['load']['loadavg_1m_at_end']} (the machine is shared). Per stage: " +
              ", ".join(f"{k} {v}" for k, v in r["timings"].items()) + ".", ""]
    return "\n".join(lines)


def _reliability_panel(ax_top, ax_bot, rb: Dict[str, List[float]], title: str, ece_value: float) -> None:
    edges = np.asarray(rb["edges"])
    width = edges[1] - edges[0]
    count = np.asarray(rb["count"])
    acc = np.where(count > 0, rb["accuracy"], np.nan)
    conf = np.where(count > 0, rb["confidence"], np.nan)
    ax_top.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", color="#4477aa", edgecolor="k", lw=0.4, label="accuracy")
    ax_top.bar(edges[:-1], np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=width, align="edge",
               color="#ee6677", alpha=0.45, edgecolor="#cc3311", lw=0.4, label="gap to confidence")
    ax_top.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax_top.set_xlim(0, 1)
    ax_top.set_ylim(0, 1)
    ax_top.set_title(f"{title}\nECE {ece_value:.4f}", fontsize=9)
    ax_top.tick_params(labelsize=7)
    ax_bot.bar(edges[:-1], count / max(count.sum(), 1), width=width, align="edge", color="#999999", edgecolor="k", lw=0.4)
    ax_bot.set_xlim(0, 1)
    ax_bot.set_xlabel("confidence", fontsize=8)
    ax_bot.tick_params(labelsize=7)


def write_figures(r: Dict[str, Any], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = r["columns"]
    names = list(cols)
    written = []

    # Reliability diagrams, one column per model, confidence histogram under each.
    f, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 4.6), gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for i, n in enumerate(names):
        _reliability_panel(axes[0, i], axes[1, i], cols[n]["reliability_before"], n, cols[n]["before"]["ece"])
    axes[0, 0].set_ylabel("accuracy", fontsize=8)
    axes[1, 0].set_ylabel("share", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    f.suptitle("Reliability before temperature scaling", fontsize=10)
    f.tight_layout()
    f.savefig(out / "reliability.png", dpi=110)
    plt.close(f)
    written.append("reliability.png")

    # Float confidence of swapped predictions, per quantized column.
    qn = [n for n in names if "vs_float" in cols[n]]
    if qn:
        f, axes = plt.subplots(1, len(qn), figsize=(2.8 * len(qn), 3.0), squeeze=False)
        for i, n in enumerate(qn):
            s = cols[n]["vs_float"]
            edges = np.asarray(s["hist_edges"])
            ax = axes[0, i]
            ax.bar(edges[:-1], s["hist_swapped"], width=edges[1] - edges[0], align="edge", color="#cc6677", edgecolor="k", lw=0.4)
            ax.set_title(f"{n}: {s['swapped_count']} swapped ({s['swapped_pct']:.2f}%)", fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_xlabel("float confidence", fontsize=8)
            ax.tick_params(labelsize=7)
            ax2 = ax.twinx()
            rate = [np.nan if v is None else v for v in s["swap_rate_by_bin_pct"]]
            ax2.plot(0.5 * (edges[:-1] + edges[1:]), rate, "k.-", lw=0.8, ms=3)
            ax2.tick_params(labelsize=7)
            if i == len(qn) - 1:
                ax2.set_ylabel("swap rate in bin (%)", fontsize=8)
        axes[0, 0].set_ylabel("swapped predictions", fontsize=8)
        f.suptitle("Which predictions quantization swaps: the float model's confidence over them", fontsize=10)
        f.tight_layout()
        f.savefig(out / "swapped_confidence.png", dpi=110)
        plt.close(f)
        written.append("swapped_confidence.png")

    # Trend over weight precision.
    sim = [n for n in names if n.startswith("W") and n.endswith("A8")]
    if sim:
        bits = [int(n[1:-2]) for n in sim]
        f, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.0))
        a1.plot(bits, [cols[n]["vs_float"]["swapped_pct"] for n in sim], "o-", label="swapped %")
        a1.plot(bits, [cols[n]["vs_float"]["delta_error_pp"] for n in sim], "s-", label="Δ error (pp)")
        a1.axhline(0, color="k", lw=0.5)
        a1.set_xlabel("weight bits")
        a1.invert_xaxis()
        a1.legend(fontsize=7)
        a2.plot(bits, [cols[n]["before"]["ece"] for n in sim], "o-", label="ECE")
        a2.axhline(cols["float"]["before"]["ece"], color="k", ls="--", lw=0.8, label="float ECE")
        if "after" in cols["float"]:
            a2.plot(bits, [cols[n]["after"]["ece"] for n in sim], "o:", label="ECE after float T")
        a2.set_xlabel("weight bits")
        a2.invert_xaxis()
        a2.legend(fontsize=7)
        f.tight_layout()
        f.savefig(out / "precision_trend.png", dpi=110)
        plt.close(f)
        written.append("precision_trend.png")

    # Before / after temperature, for the float model and the deployed int8 one.
    pairs = [n for n in ("float", "int8 TFLite (bundle)") if n in cols and "after" in cols[n]]
    if pairs:
        f, axes = plt.subplots(2, 2 * len(pairs), figsize=(2.7 * 2 * len(pairs), 4.6), gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
        for i, n in enumerate(pairs):
            c = cols[n]
            _reliability_panel(axes[0, 2 * i], axes[1, 2 * i], c["reliability_before"], f"{n}, T = 1", c["before"]["ece"])
            _reliability_panel(axes[0, 2 * i + 1], axes[1, 2 * i + 1], c["reliability_after"], f"{n}, T = {c['temperature']:.3f}", c["after"]["ece"])
        f.suptitle("Temperature scaling: before and after (test data; T fitted on held-out data)", fontsize=10)
        f.tight_layout()
        f.savefig(out / "temperature.png", dpi=110)
        plt.close(f)
        written.append("temperature.png")
    return written


def write_report(r: Dict[str, Any], out: Path) -> List[Path]:
    """calibration.json, calibration.md and the PNGs into `out`, all or nothing (rendered in a temporary
    folder next to it, then moved in)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: output path exists and is not a folder")
    parent = out.parent if out.parent.exists() else None
    made = []
    if parent is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pngs = write_figures(r, tmp)
        (tmp / "calibration.json").write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
        (tmp / "calibration.md").write_text(render_markdown(r, pngs), encoding="utf-8")
        out.mkdir(exist_ok=True)
        for name in ["calibration.json", "calibration.md"] + pngs:
            os.replace(tmp / name, out / name)
            made.append(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return made


# --- temperature on a bundle ---------------------------------------------------------------------------------

def fit_bundle_temperature(bundle: Bundle, x: np.ndarray, y: np.ndarray, source: str, backend: str = "auto") -> Dict[str, Any]:
    """Fit T on the bundle's own int8 backbone + head logits (eval mode), through the device runtime."""
    from edge_quq.backends import make_backbone

    head = load_head_weights(bundle)
    act = head.activation
    temperature_objective(act)
    bb = make_backbone(bundle, backend)
    feats = np.concatenate([bb(x[s : s + 256]) for s in range(0, len(x), 256)])
    z = head.logits(feats).astype(np.float64)
    t = fit_temperature(z, y, act)
    before = calibration_summary(z, y, act, 1.0, BINS)
    after = calibration_summary(z, y, act, t, BINS)
    return {
        "temperature": round(t, 6),
        "method": "temperature scaling of the head logits (edge_quq.calibration)",
        "objective": temperature_objective(act),
        "fitted_on": source,
        "samples": int(len(y)),
        "backbone": bb.name,
        "heldout": {"ece_before": round(before["ece"], 6), "ece_after": round(after["ece"], 6),
                    "nll_before": round(before["nll"], 6), "nll_after": round(after["nll"], 6)},
    }


def load_temperature_data(spec: str, bundle: Bundle, labels: Optional[Path], limit: Optional[int], seed: int,
                          root: Path = FASHION_MNIST_DIR) -> Tuple[np.ndarray, np.ndarray, str]:
    shape = bundle.input.shape
    if spec == FMNIST_VAL_NAME:
        x, y = fashion_mnist_val(root, bundle.input.preprocess, shape, limit, seed)
        return x, y, f"Fashion-MNIST validation split (last {FMNIST_VAL} training images, held out from training)"
    x, y = load_inputs(Path(spec), shape, bundle.input.preprocess, "temperature data", limit, seed, bundle.classes)
    if labels is not None:
        from edge_quq_export.datasets import load_labels

        y = load_labels(labels, len(x))
    if y is None:
        raise ExportError(f"{spec}: temperature data needs labels (.npz 'x' and 'y', class sub-folders, or --labels)")
    if y.min() < 0 or y.max() >= bundle.num_classes:
        raise ExportError(f"{spec}: labels must be class indices 0..{bundle.num_classes - 1}")
    return x, y, str(spec)


# --- command line -------------------------------------------------------------------------------------------

def _bits(value: str) -> List[int]:
    try:
        bits = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"--bits must be comma-separated integers, got {value!r}") from None
    if not bits or any(not 2 <= b <= 16 for b in bits):
        raise OptionError(f"--bits must list weight precisions in 2..16, got {value!r}")
    return bits


def cmd_report(a: argparse.Namespace) -> int:
    from edge_quq_export.pipeline import _input_shape, _preprocess, ExportOptions, load_keras_model

    bits = _bits(a.bits)
    import matplotlib  # noqa: F401  (fail before minutes of work, not after)

    if a.out.exists() and not a.out.is_dir():
        raise ExportError(f"{a.out}: output path exists and is not a folder")
    bundle = load_bundle(a.bundle) if a.bundle is not None else None
    model = load_keras_model(a.model)
    shape = _input_shape(model)
    spec = bundle.input.preprocess if bundle is not None else _preprocess(ExportOptions(calibration=np.zeros(1), out=a.out), shape)
    if bundle is not None and tuple(bundle.input.shape) != tuple(shape):
        raise ExportError(f"{a.bundle}: bundle input {list(bundle.input.shape)} does not match the model input {list(shape)}")
    if a.test_data is not None:
        if a.calibration_data is None:
            raise OptionError("--test-data needs --calibration-data (a few training images for the activation ranges)")
        data = file_data(a.test_data, a.calibration_data, a.temperature_data, spec, shape,
                         bundle.classes if bundle is not None else None, a.calib_batches * a.batch_size, a.test_samples, a.seed)
    else:
        data = fashion_mnist_data(a.fashion_mnist, spec, shape, a.test_samples, a.calib_batches, a.batch_size,
                                  a.temperature_samples, a.seed)
    r, _ = build_report(model, data, bits, bundle, model_name=a.model.name)
    r["model_sha256"] = sha256_file(a.model)
    r["command"] = "python -m edge_quq_export.calibration " + " ".join(a.argv)
    made = write_report(r, a.out)
    for name, c in r["columns"].items():
        s = c.get("vs_float")
        extra = f", swapped {s['swapped_pct']:.2f}%, Δerror {s['delta_error_pp']:+.2f} pp" if s else ""
        after = f", after T={c['temperature']:.3f} ECE {c['after']['ece']:.4f}" if "after" in c else ""
        print(f"{name:>22}: top-1 {100 * c['before']['top1']:.2f}%, ECE {c['before']['ece']:.4f}, NLL {c['before']['nll']:.4f}{extra}{after}")
    print(f"wrote {', '.join(str(p) for p in made)}")
    return 0


def cmd_set_temperature(a: argparse.Namespace) -> int:
    given = sum(v is not None and v is not False for v in (a.value, a.fit_data, a.clear or None))
    if given != 1:
        raise OptionError("give exactly one of --value T, --fit-data DATA or --clear")
    bundle = load_bundle(a.bundle)
    if a.clear:
        set_calibration(bundle.path, None)
        print(f"{bundle.path}: temperature removed (T = 1)")
        return 0
    if a.value is not None:
        cal = {"temperature": a.value, "method": "set by hand (python -m edge_quq_export.calibration set-temperature --value)"}
    else:
        x, y, source = load_temperature_data(a.fit_data, bundle, a.labels, a.samples, a.seed, a.fashion_mnist)
        cal = fit_bundle_temperature(bundle, x, y, source, a.backend)
    b = set_calibration(bundle.path, cal)
    msg = f"{b.path}: temperature {b.temperature:.4g}"
    if "heldout" in cal:
        h = cal["heldout"]
        msg += (f" fitted on {cal['samples']} samples ({cal['backbone']} backbone): ECE {h['ece_before']:.4f} -> {h['ece_after']:.4f}, "
                f"NLL {h['nll_before']:.4f} -> {h['nll_after']:.4f}")
    print(msg)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m edge_quq_export.calibration", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="simulated PTQ at several weight precisions vs float (and the bundle's int8 TFLite): "
                                      "swapped predictions, reliability, ECE, NLL, temperature scaling")
    r.add_argument("--model", type=Path, required=True, help="float Keras model (.keras)")
    r.add_argument("--out", type=Path, required=True, help="folder for calibration.json, calibration.md and the PNGs")
    r.add_argument("--bundle", type=Path, default=None, help="bundle exported from the model: its int8 TFLite is one more column")
    r.add_argument("--bits", default=",".join(str(b) for b in DEFAULT_BITS), help="weight precisions to simulate")
    r.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder (the default data)")
    r.add_argument("--test-data", type=Path, default=None, help="labelled test data instead of Fashion-MNIST (.npz x/y or class sub-folders)")
    r.add_argument("--calibration-data", type=Path, default=None, help="training images for the activation ranges (with --test-data)")
    r.add_argument("--temperature-data", type=Path, default=None, help="labelled held-out data for the temperatures (with --test-data)")
    r.add_argument("--test-samples", type=int, default=None, help="random subset of the test data (default: all)")
    r.add_argument("--temperature-samples", type=int, default=None, help="random subset of the Fashion-MNIST validation split")
    r.add_argument("--calib-batches", type=int, default=4, help="activation calibration batches")
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("set-temperature", help="store a temperature in an existing bundle's manifest")
    s.add_argument("bundle", type=Path)
    s.add_argument("--value", type=float, default=None, help="the temperature T (> 0)")
    s.add_argument("--fit-data", default=None, help=f"fit T on labelled held-out data: .npz x/y, class sub-folders, or {FMNIST_VAL_NAME!r}")
    s.add_argument("--labels", type=Path, default=None, help="labels for --fit-data (.npy or text)")
    s.add_argument("--samples", type=int, default=None, help="random subset of --fit-data")
    s.add_argument("--clear", action="store_true", help="remove the temperature (T = 1)")
    s.add_argument("--backend", default="auto", help="backbone backend for the fit (auto, tflite, onnx)")
    s.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST_DIR)
    s.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.argv = argv
    try:
        for k in ("test_samples", "temperature_samples", "samples"):
            if getattr(a, k, None) is not None and getattr(a, k) < 1:
                raise OptionError(f"--{k.replace('_', '-')} must be >= 1")
        if a.cmd == "report" and (a.calib_batches < 1 or a.batch_size < 1):
            raise OptionError("--calib-batches and --batch-size must be >= 1")
        return cmd_report(a) if a.cmd == "report" else cmd_set_temperature(a)
    except EdgeQuqError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        print("error: the report's figures need matplotlib (pip install 'edge-quq[bench]')", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
