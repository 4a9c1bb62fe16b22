"""Parity report: how much the int8 backbones change what the model says, measured with the real runtimes.

Rows: the float Keras model, and the numpy head (eval mode) on features from the int8 TFLite and int8 ONNX
backbones. Columns: top-1 accuracy (when labels are given), top-1 agreement with float, feature cosine
similarity, probability differences; plus the exported heads against the numpy reference with the same masks,
and file sizes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edge_quq.bundle import ModelFile, QuantParams
from edge_quq.head import HeadWeights
from edge_quq.samplers.base import full_keep_masks
from edge_quq.result import dumps

# ONNX backbones take and return float32 (the quantization is inside the graph, QDQ).
_FLOAT = QuantParams("float32")


def _batched(backbone, x: np.ndarray, batch: int) -> np.ndarray:
    outs = [backbone(x[s : s + batch]) for s in range(0, len(x), batch)]
    return np.concatenate(outs).reshape(len(x), -1).astype(np.float32)


def run_tflite(path: Path, x: np.ndarray, io: Dict[str, Any], batch: int = 256) -> np.ndarray:
    """Features from a (quantized) TFLite backbone, through the runtime's own backend (edge_quq.backends)."""
    from edge_quq.backends import TFLiteBackbone
    from edge_quq_export.convert import quiet_fds

    spec = ModelFile(path.name, QuantParams.from_json(io["input"], "tflite input"), QuantParams.from_json(io["output"], "tflite output"))
    with quiet_fds():  # XNNPACK announces itself on stderr, on creation and on each allocation
        return _batched(TFLiteBackbone(path, spec, threads=2), x, batch)


def run_onnx(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Features from an ONNX backbone (float input and output, QDQ inside), through the runtime's backend."""
    from edge_quq.backends import OnnxBackbone

    return _batched(OnnxBackbone(path, ModelFile(path.name, _FLOAT, _FLOAT), threads=2), x, batch)


def run_head_model(kind: str, path: Path, features: np.ndarray, masks: List[np.ndarray]) -> np.ndarray:
    """Probabilities of an exported head model for given features and 0/1 masks (one per block), run by the
    runtime's head-model runner (edge_quq.samplers.exported)."""
    from edge_quq.samplers.exported import OnnxHeadModel, TFLiteHeadModel, default_mask_names
    from edge_quq_export.convert import quiet_fds

    names = default_mask_names(len(masks))
    with quiet_fds():
        model = OnnxHeadModel(path, names, threads=1) if kind == "onnx" else TFLiteHeadModel(path, names, threads=1)
        return model.run(np.asarray(features, np.float32), masks)[0]


def random_masks(head: HeadWeights, t: int, seed: int = 0) -> List[np.ndarray]:
    """T rows of keep masks for every block from the runtime's mask stream (all ones where a block has no dropout)."""
    return full_keep_masks(np.random.default_rng(seed), head, t)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    den = na * nb
    # No epsilon clamp: features of an untrained network can have norms of 1e-10 and still be compared.
    cos = np.divide(np.sum(a * b, axis=1), den, out=np.zeros_like(den), where=den > 0)
    # Two all-zero feature vectors are identical, not orthogonal.
    cos[(na == 0) & (nb == 0)] = 1.0
    return cos


def compare(float_probs: np.ndarray, float_feats: np.ndarray, feats: np.ndarray, head: HeadWeights,
            labels: Optional[np.ndarray]) -> Dict[str, Any]:
    probs = head.probs(feats)
    cos = _cosine(float_feats, feats)
    row: Dict[str, Any] = {
        "top1_agreement": float(np.mean(probs.argmax(1) == float_probs.argmax(1))),
        "feature_cosine_mean": float(cos.mean()),
        "feature_cosine_min": float(cos.min()),
        "feature_rel_l2_mean": float(np.mean(np.linalg.norm(feats - float_feats, axis=1) / np.maximum(np.linalg.norm(float_feats, axis=1), 1e-12))),
        "prob_abs_diff_mean": float(np.mean(np.abs(probs - float_probs))),
        "prob_abs_diff_max": float(np.max(np.abs(probs - float_probs))),
    }
    if labels is not None:
        row["top1_accuracy"] = float(np.mean(probs.argmax(1) == labels))
    return row


def build_report(*, n: int, data_source: str, labels: Optional[np.ndarray], float_probs: np.ndarray, float_feats: np.ndarray,
                 head: HeadWeights, backends: Dict[str, np.ndarray], head_check: Dict[str, float], sizes: Dict[str, int],
                 head_reproduction: float) -> Dict[str, Any]:
    report: Dict[str, Any] = {"samples": int(n), "data": data_source, "labels": labels is not None}
    fl: Dict[str, Any] = {}
    if labels is not None:
        fl["top1_accuracy"] = float(np.mean(float_probs.argmax(1) == labels))
    report["float"] = fl
    report["head_reproduction_max_abs"] = float(head_reproduction)
    report["int8"] = {name: compare(float_probs, float_feats, f, head, labels) for name, f in backends.items()}
    report["exported_head_vs_numpy_max_abs"] = {k: float(v) for k, v in head_check.items()}
    report["sizes_bytes"] = {k: int(v) for k, v in sizes.items()}
    red = {}
    if sizes.get("backbone_f32.tflite") and sizes.get("backbone_int8.tflite"):
        red["tflite"] = sizes["backbone_f32.tflite"] / sizes["backbone_int8.tflite"]
    if sizes.get("backbone_f32.onnx") and sizes.get("backbone_int8.onnx"):
        red["onnx"] = sizes["backbone_f32.onnx"] / sizes["backbone_int8.onnx"]
    report["size_reduction_factor"] = red
    return report


def markdown(report: Dict[str, Any], title: str) -> str:
    lines = [f"# Parity report: {title}", "",
             f"{report['samples']} samples from {report['data']}. Int8 rows: the int8 backbone's features through the "
             "numpy head in eval mode (no dropout); agreement is top-1 agreement with the float Keras model.", ""]
    has_acc = bool(report.get("labels"))
    hdr = ["model"] + (["top-1 acc"] if has_acc else []) + ["agreement", "cos mean", "cos min", "max |dp|"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    fl = ["float Keras"] + ([f"{100 * report['float']['top1_accuracy']:.2f}%"] if has_acc else []) + ["100%", "1", "1", "0"]
    lines.append("| " + " | ".join(fl) + " |")
    for name, r in report["int8"].items():
        row = [f"int8 {name}"] + ([f"{100 * r['top1_accuracy']:.2f}%"] if has_acc else [])
        row += [f"{100 * r['top1_agreement']:.2f}%", f"{r['feature_cosine_mean']:.5f}", f"{r['feature_cosine_min']:.5f}", f"{r['prob_abs_diff_max']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Numpy head on float features vs the Keras model (eval mode): max |dp| = {report['head_reproduction_max_abs']:.2e}.", ""]
    if report["exported_head_vs_numpy_max_abs"]:
        lines.append("Exported head models vs the numpy head, same masks: " +
                     ", ".join(f"{k} max |dp| = {v:.2e}" for k, v in report["exported_head_vs_numpy_max_abs"].items()) + ".")
        lines.append("")
    lines += ["| file | bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in report["sizes_bytes"].items()]
    if report["size_reduction_factor"]:
        lines += ["", "Size reduction (float backbone / int8 backbone): " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in report["size_reduction_factor"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: Dict[str, Any], title: str) -> None:
    (folder / "parity.json").write_text(dumps(report, indent=2, separators=None) + "\n", encoding="utf-8")
    (folder / "parity.md").write_text(markdown(report, title), encoding="utf-8")
