"""The quantization report: what post-training quantization does to a model's predictions and confidence.

    python -m edge_quq_export.quant_report --model bench/models/reference_oe.keras \\
        --bundle edge_quq/data/default_bundle --out bench/results/calibration

Simulates post-training quantization of a float Keras model (edge_quq_export.fakequant: weights per-channel
symmetric at 8, 7, 6, 5, 4 bits, activations 8-bit per-tensor asymmetric, their ranges set on a few batches of
quantization data), runs the bundle's real int8 TFLite backbone as one more column, and writes
calibration.json, calibration.md (file names kept from the report's old name) and PNG figures: swapped
predictions against the float model, change in error, their ratio, histograms of the float confidence over
the swapped predictions, reliability diagrams with confidence histograms, ECE (15 equal-width bins), NLL and
top-1, before and after temperature scaling. docs/calibration.md explains every figure.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click
import numpy as np

from edge_quq.bundle import Bundle, Preprocess, load_bundle, sha256_file
from edge_quq.calibration import calibration_summary, confidence_and_prediction, fit_temperature, temperature_objective
from edge_quq.errors import ExportError, OptionError
from edge_quq.head import load_head_weights, output_activation
from edge_quq.metrics import reliability_bins
from edge_quq.result import dumps

from edge_quq_export.cli import CONTEXT, run_command
from edge_quq_export.datasets import (FASHION_MNIST_DIR, FMNIST_VAL, fashion_mnist_val, load_fashion_mnist, load_inputs,
                                      preprocess_array)

DEFAULT_BITS = (8, 7, 6, 5, 4)
BINS = 15
PROG = "python -m edge_quq_export.quant_report"


# --- data -----------------------------------------------------------------------------------------------

@dataclass
class ReportData:
    x_test: np.ndarray
    y_test: np.ndarray
    x_quant: np.ndarray  # sets the simulated activation ranges
    x_temp: Optional[np.ndarray]
    y_temp: Optional[np.ndarray]
    sources: Dict[str, str] = field(default_factory=dict)


def _pixels_to_input(x: np.ndarray, spec: Preprocess, shape: Sequence[int]) -> np.ndarray:
    return preprocess_array(x, shape, spec, "Fashion-MNIST")


def fashion_mnist_data(root: Path, spec: Preprocess, shape: Sequence[int], test_samples: Optional[int],
                       quant_batches: int, batch_size: int, temp_samples: Optional[int], seed: int) -> ReportData:
    xtr, _ = load_fashion_mnist("train", root)
    xt, yt = load_fashion_mnist("test", root)
    rng = np.random.default_rng(seed)
    if test_samples is not None and test_samples < len(xt):
        keep = np.sort(rng.choice(len(xt), test_samples, replace=False))
        xt, yt = xt[keep], yt[keep]
    quant_idx = rng.permutation(len(xtr) - FMNIST_VAL)[: quant_batches * batch_size]  # training part only
    xv, yv = fashion_mnist_val(root, spec, shape, temp_samples, seed)
    return ReportData(
        x_test=_pixels_to_input(xt, spec, shape), y_test=yt,
        x_quant=_pixels_to_input(xtr[np.sort(quant_idx)], spec, shape), x_temp=xv, y_temp=yv,
        sources={"test": f"Fashion-MNIST t10k ({len(xt)} images)",
                 "quant_data": f"{quant_batches} batches of {batch_size} Fashion-MNIST training images",
                 "temperature": f"Fashion-MNIST validation split (last {FMNIST_VAL} training images, held out from "
                                f"training; {len(yv)} used)"},
    )


def file_data(test: Path, quant: Path, temp: Optional[Path], spec: Preprocess, shape: Sequence[int],
              classes: Optional[Sequence[str]], quant_samples: int, test_samples: Optional[int], seed: int) -> ReportData:
    xt, yt = load_inputs(test, shape, spec, "test data", test_samples, seed, classes)
    if yt is None:
        raise ExportError(f"{test}: test data has no labels (.npz with 'x' and 'y', or one sub-folder per class)")
    xq, _ = load_inputs(quant, shape, spec, "quantization data", quant_samples, seed)
    xv = yv = None
    if temp is not None:
        xv, yv = load_inputs(temp, shape, spec, "temperature data", None, seed, classes)
        if yv is None:
            raise ExportError(f"{temp}: temperature data has no labels")
    return ReportData(xt, yt, xq, xv, yv, {"test": f"{test} ({len(xt)} images)",
                                           "quant_data": f"{quant} ({len(xq)} images)",
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
    from edge_quq_export.pipeline import run_backbone_tflite

    mf = bundle.backbone_tflite
    if mf is None:
        raise ExportError(f"{bundle.path}: bundle has no TFLite backbone for the int8 column")
    feats = run_backbone_tflite(bundle.path, mf, x)
    return load_head_weights(bundle).logits(feats).astype(np.float64)


def _temperatures(fq, data: ReportData, bundle: Optional[Bundle], act: str) -> Tuple[Dict[str, Any], float, float]:
    """Temperatures on held-out data: the float model's (applied to every simulated precision: "calibrate the
    float model, then quantize") and the deployed int8 model's (what a bundle would carry)."""
    temps: Dict[str, Any] = {"objective": temperature_objective(act), "data": data.sources.get("temperature")}
    t_float = t_int8 = 1.0
    if data.x_temp is None:
        return temps, t_float, t_int8

    def fitted(z: np.ndarray) -> Tuple[float, Dict[str, Any]]:
        t = fit_temperature(z, data.y_temp, act)
        return t, {"temperature": t, "heldout_before": calibration_summary(z, data.y_temp, act, 1.0, BINS),
                   "heldout_after": calibration_summary(z, data.y_temp, act, t, BINS)}

    t_float, temps["float"] = fitted(fq.logits(data.x_temp, None, quantize_activations=False).astype(np.float64))
    if bundle is not None:
        t_int8, temps["int8_tflite"] = fitted(bundle_logits(bundle, data.x_temp))
        if bundle.temperature != 1.0:
            temps["bundle_manifest_temperature"] = bundle.temperature
    return temps, t_float, t_int8


def _column(z: np.ndarray, float_logits: Optional[np.ndarray], y: np.ndarray, act: str, t_after: Optional[float]) -> Dict[str, Any]:
    """One report column: calibration before (and after T), swaps against float, reliability bins."""
    col: Dict[str, Any] = {"before": calibration_summary(z, y, act, 1.0, BINS)}
    if t_after is not None:
        col["temperature"] = t_after
        col["after"] = calibration_summary(z, y, act, t_after, BINS)
        col["after_swaps_unchanged"] = True  # one positive T never changes an argmax
    if float_logits is not None:
        col["vs_float"] = swap_stats(float_logits, z, y, act)
    col["reliability_before"] = _bins(z, y, act, 1.0)
    if t_after is not None:
        col["reliability_after"] = _bins(z, y, act, t_after)
    return col


def build_report(model, data: ReportData, bits: Sequence[int] = DEFAULT_BITS, bundle: Optional[Bundle] = None,
                 model_name: str = "model") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(report JSON, arrays for the figures). Columns: float, W{b}A8 for each b, and the bundle's int8 TFLite."""
    from edge_quq_export.fakequant import FakeQuantModel

    t0 = time.perf_counter()
    fq = FakeQuantModel(model)
    act = fq.activation
    if act == "linear":
        raise ExportError("the model's output is linear: the report's confidence figures need a sigmoid or softmax output")
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    fq.set_activation_ranges(data.x_quant)
    timings["activation_ranges_s"] = time.perf_counter() - t
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

    temps, t_float, t_int8 = _temperatures(fq, data, bundle, act)
    columns: Dict[str, Any] = {}
    fig: Dict[str, Any] = {"activation": act, "labels": y, "logits": logits, "columns": {}}
    for name, z in logits.items():
        columns[name] = _column(z, logits["float"] if name != "float" else None, y, act,
                                (t_int8 if name == tfl_name else t_float) if data.x_temp is not None else None)
    report = {
        "title": f"Quantization report: {model_name}",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model_name,
        "bundle": str(bundle.path) if bundle is not None else None,
        "output_activation": act,
        "data": data.sources,
        "test_samples": int(len(y)),
        "simulation": {
            "weights": "per-output-channel symmetric, narrow range, bits " + ", ".join(str(b) for b in bits),
            "activations": "8-bit per-tensor asymmetric, min/max ranges observed on the float model",
            "quant_samples": int(len(data.x_quant)),
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
             f"({r['simulation']['quant_samples']} samples: {r['data'].get('quant_data')}). "
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
    """The report's PNGs into `out`; returns their names (a figure without data is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("reliability.png", _reliability_figure), ("swapped_confidence.png", _swapped_figure),
                       ("precision_trend.png", _trend_figure), ("temperature.png", _temperature_figure)):
        f = draw(plt, r["columns"])
        if f is None:
            continue
        f.tight_layout()
        f.savefig(out / name, dpi=110)
        plt.close(f)
        written.append(name)
    return written


def _reliability_figure(plt, cols: Dict[str, Any]):
    """Reliability diagrams, one column per model, confidence histogram under each."""
    names = list(cols)
    f, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 4.6), gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for i, n in enumerate(names):
        _reliability_panel(axes[0, i], axes[1, i], cols[n]["reliability_before"], n, cols[n]["before"]["ece"])
    axes[0, 0].set_ylabel("accuracy", fontsize=8)
    axes[1, 0].set_ylabel("share", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    f.suptitle("Reliability before temperature scaling", fontsize=10)
    return f


def _swapped_figure(plt, cols: Dict[str, Any]):
    """Float confidence of swapped predictions, per quantized column."""
    qn = [n for n in cols if "vs_float" in cols[n]]
    if not qn:
        return None
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
    return f


def _trend_figure(plt, cols: Dict[str, Any]):
    """Swaps, error and ECE over the simulated weight precision."""
    sim = [n for n in cols if n.startswith("W") and n.endswith("A8")]
    if not sim:
        return None
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
    return f


def _temperature_figure(plt, cols: Dict[str, Any]):
    """Before / after temperature, for the float model and the deployed int8 one."""
    pairs = [n for n in ("float", "int8 TFLite (bundle)") if n in cols and "after" in cols[n]]
    if not pairs:
        return None
    f, axes = plt.subplots(2, 2 * len(pairs), figsize=(2.7 * 2 * len(pairs), 4.6), gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for i, n in enumerate(pairs):
        c = cols[n]
        _reliability_panel(axes[0, 2 * i], axes[1, 2 * i], c["reliability_before"], f"{n}, T = 1", c["before"]["ece"])
        _reliability_panel(axes[0, 2 * i + 1], axes[1, 2 * i + 1], c["reliability_after"], f"{n}, T = {c['temperature']:.3f}", c["after"]["ece"])
    f.suptitle("Temperature scaling: before and after (test data; T fitted on held-out data)", fontsize=10)
    return f


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
        (tmp / "calibration.json").write_text(dumps(r, indent=1, separators=None) + "\n", encoding="utf-8")
        (tmp / "calibration.md").write_text(render_markdown(r, pngs), encoding="utf-8")
        out.mkdir(exist_ok=True)
        for name in ["calibration.json", "calibration.md"] + pngs:
            os.replace(tmp / name, out / name)
            made.append(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return made


# --- command line -------------------------------------------------------------------------------------------

def _bits(value: str) -> List[int]:
    try:
        bits = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"--bits must be comma-separated integers, got {value!r}") from None
    if not bits or any(not 2 <= b <= 16 for b in bits):
        raise OptionError(f"--bits must list weight precisions in 2..16, got {value!r}")
    return bits


def _report_data(model, bundle: Optional[Bundle], out: Path, test_data: Optional[Path], quant_data: Optional[Path],
                 temperature_data: Optional[Path], fashion_mnist: Path, test_samples: Optional[int],
                 temperature_samples: Optional[int], quant_batches: int, batch_size: int, seed: int) -> ReportData:
    from edge_quq_export.pipeline import ExportOptions, _input_shape, _preprocess

    shape = _input_shape(model)
    spec = bundle.input.preprocess if bundle is not None else _preprocess(ExportOptions(out=out), shape)
    if bundle is not None and tuple(bundle.input.shape) != tuple(shape):
        raise ExportError(f"{bundle.path}: bundle input {list(bundle.input.shape)} does not match the model input {list(shape)}")
    if test_data is None:
        return fashion_mnist_data(fashion_mnist, spec, shape, test_samples, quant_batches, batch_size, temperature_samples, seed)
    if quant_data is None:
        raise OptionError("--test-data needs --quant-data (a few training images for the activation ranges)")
    return file_data(test_data, quant_data, temperature_data, spec, shape, bundle.classes if bundle is not None else None,
                     quant_batches * batch_size, test_samples, seed)


@click.command("quant-report", context_settings=CONTEXT)
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Float Keras model (.keras).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for calibration.json, calibration.md and the PNGs.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Bundle exported from the model: its int8 TFLite is one more column.")
@click.option("--bits", default=",".join(str(b) for b in DEFAULT_BITS), show_default=True, help="Weight precisions to simulate.")
@click.option("--fashion-mnist", type=click.Path(path_type=Path), default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder (the default data).")
@click.option("--test-data", type=click.Path(path_type=Path), default=None, help="Labelled test data instead of Fashion-MNIST (.npz x/y or class sub-folders).")
@click.option("--quant-data", "--calibration-data", "quant_data", type=click.Path(path_type=Path), default=None,
              help="Training images the activation ranges are set on (with --test-data).")
@click.option("--temperature-data", type=click.Path(path_type=Path), default=None, help="Labelled held-out data for the temperatures (with --test-data).")
@click.option("--test-samples", type=click.IntRange(min=1), default=None, help="Random subset of the test data (default: all).")
@click.option("--temperature-samples", type=click.IntRange(min=1), default=None, help="Random subset of the Fashion-MNIST validation split.")
@click.option("--quant-batches", "--calib-batches", "quant_batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Batches of quantization data for the activation ranges.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def report_cmd(model: Path, out: Path, bundle: Optional[Path], bits: str, fashion_mnist: Path, test_data: Optional[Path],
               quant_data: Optional[Path], temperature_data: Optional[Path], test_samples: Optional[int],
               temperature_samples: Optional[int], quant_batches: int, batch_size: int, seed: int) -> None:
    """Simulated PTQ at several weight precisions vs float (and the bundle's int8 TFLite): swapped predictions,
    reliability, ECE, NLL, temperature scaling."""
    from edge_quq_export.pipeline import load_keras_model

    weight_bits = _bits(bits)
    import matplotlib  # noqa: F401  (fail before minutes of work, not after)

    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: output path exists and is not a folder")
    b = load_bundle(bundle) if bundle is not None else None
    keras_model = load_keras_model(model)
    data = _report_data(keras_model, b, out, test_data, quant_data, temperature_data, fashion_mnist, test_samples,
                        temperature_samples, quant_batches, batch_size, seed)
    r, _ = build_report(keras_model, data, weight_bits, b, model_name=model.name)
    r["model_sha256"] = sha256_file(model)
    root = click.get_current_context().find_root()
    r["command"] = " ".join([root.info_name or PROG, *(root.obj or {}).get("argv", [])])
    made = write_report(r, out)
    for name, c in r["columns"].items():
        s = c.get("vs_float")
        extra = f", swapped {s['swapped_pct']:.2f}%, Δerror {s['delta_error_pp']:+.2f} pp" if s else ""
        after = f", after T={c['temperature']:.3f} ECE {c['after']['ece']:.4f}" if "after" in c else ""
        click.echo(f"{name:>22}: top-1 {100 * c['before']['top1']:.2f}%, ECE {c['before']['ece']:.4f}, NLL {c['before']['nll']:.4f}{extra}{after}")
    click.echo(f"wrote {', '.join(str(p) for p in made)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(report_cmd, sys.argv[1:] if argv is None else argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
