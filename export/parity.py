"""Parity report: how much the int8 backbones change what the model says, measured with the real runtimes.

Rows: the float Keras model, and the numpy head (eval mode) on features from the int8 TFLite and int8 ONNX
backbones. Columns: top-1 accuracy (when labels are given), top-1 agreement with float, feature cosine
similarity, probability differences; plus the exported heads against the numpy reference with the same masks,
and file sizes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edge_quq.bundle import QuantParams
from edge_quq.head import HeadWeights
from edge_quq.preprocess import dequantize, quantize


def run_tflite(path: Path, x: np.ndarray, io: Dict[str, Any], batch: int = 256) -> np.ndarray:
    """Features from a (quantized) TFLite backbone, through the same quantize/dequantize as the runtime."""
    from ai_edge_litert.interpreter import Interpreter

    qin = QuantParams.from_json(io["input"], "tflite input")
    qout = QuantParams.from_json(io["output"], "tflite output")
    from edge_quq_export.convert import quiet_fds

    with quiet_fds():  # XNNPACK announces itself on stderr
        it = Interpreter(model_path=str(path), num_threads=2)
    d_in = it.get_input_details()[0]
    outs, cur = [], -1
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        if len(xb) != cur:
            it.resize_tensor_input(d_in["index"], [len(xb)] + list(x.shape[1:]))
            with quiet_fds():  # the delegate is applied (and announced) on allocation
                it.allocate_tensors()
            cur = len(xb)
        it.set_tensor(d_in["index"], quantize(xb, qin))
        it.invoke()
        outs.append(dequantize(it.get_tensor(it.get_output_details()[0]["index"]), qout).reshape(len(xb), -1))
    return np.concatenate(outs).astype(np.float32)


def run_onnx(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[s : s + batch].astype(np.float32)})[0] for s in range(0, len(x), batch)]
    return np.concatenate(outs).reshape(len(x), -1).astype(np.float32)


def run_head_model(kind: str, path: Path, features: np.ndarray, masks: List[np.ndarray]) -> np.ndarray:
    """Probabilities of an exported head model for given features and 0/1 masks."""
    feed = {"features": features, **{f"mask{i}": m for i, m in enumerate(masks)}}
    if kind == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(["probs"], feed)[0]
    from ai_edge_litert.interpreter import Interpreter

    from edge_quq_export.convert import quiet_fds

    with quiet_fds():
        it = Interpreter(model_path=str(path))
    for d in it.get_input_details():
        it.resize_tensor_input(d["index"], list(feed[d["name"]].shape))
    with quiet_fds():
        it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.ascontiguousarray(feed[d["name"]], dtype=np.float32))
    it.invoke()
    out = next(d for d in it.get_output_details() if d["name"] == "probs")
    return it.get_tensor(out["index"])


def random_masks(head: HeadWeights, t: int, seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks, fan_in = [], head.feature_size
    for k, r in zip(head.kernels, head.rates):
        masks.append((rng.random((t, fan_in)) >= r).astype(np.float32))
        fan_in = k.shape[1]
    return masks


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
    (folder / "parity.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "parity.md").write_text(markdown(report, title), encoding="utf-8")
