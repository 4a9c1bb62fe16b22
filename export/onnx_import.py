"""`edge-quq export model.onnx`: a float ONNX classifier -> an edge-quq bundle (ONNX int8 backbone, numpy head).

Same stages as the Keras pipeline (export/pipeline.py), with an ONNX graph in place of a Keras model:
`prepare_onnx` checks everything the user gave (model, split, head, data) before anything is written; the
backbone (graph up to the split) is quantized by ONNX Runtime's static quantization (QDQ, per-channel int8);
parity is measured with the runtime's own backends; the manifest is written by the same Staging writer.

The TFLite backbone: onnx2tf, run from its own virtualenv (onnx2tf_backbone.py, `--onnx2tf PATH` or
EDGE_QUQ_ONNX2TF), converts the float backbone to full int8. Without it, when it fails, or when its features
lose parity with float (TFLITE_MIN_COSINE, TFLITE_MAX_AGREEMENT_DROP), the bundle is ONNX-only: manifest
`backbone.tflite` absent, the reason recorded as `backbone_note`, and the parity report says so. The exported
TFLite head is written either way, so the `tflite` head sampler works with the ONNX backbone.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from edge_quq.bundle import Bundle, HeadLayer, HeadSpec, InputSpec, ModelFile, Preprocess, QuantParams
from edge_quq.errors import ExportError
from edge_quq.head import HeadWeights, save_head_weights
from edge_quq.preprocess import to_layout

from edge_quq_export.onnx_graph import Graph, find_split, parse_head
from edge_quq_export.pipeline import ExportOptions, HeldOut
from edge_quq_export.writer import Staging, check_out

MIN_OPSET = 13
ONNX_ONLY_NOTE = ("ONNX only: no ONNX->TFLite converter was given (--onnx2tf PATH or EDGE_QUQ_ONNX2TF naming onnx2tf "
                  "in its own venv, docs/export.md), so this bundle has no TFLite backbone")
# The onnx2tf backbone is kept only when it is about as faithful to float as the ONNX int8 one: mean feature
# cosine with float at least this, and top-1 agreement with float at most this far below ONNX int8's.
TFLITE_MIN_COSINE = 0.98
TFLITE_MAX_AGREEMENT_DROP = 0.05
# Head extraction is exact up to float32 rounding; above this the graph holds something the parser missed.
HEAD_REPRODUCTION_TOL = 1e-4


@dataclass
class OnnxPrepared:
    model: Any  # onnx.ModelProto, the float classifier
    path: Path
    layout: str  # "NCHW" | "NHWC"
    shape: Tuple[int, int, int]  # (H, W, C)
    split: str
    split_how: str
    head: HeadWeights
    head_nodes: List[str]
    classes: Tuple[str, ...]
    spec: Preprocess
    quant: np.ndarray  # [N, H, W, C], the runtime's preprocess output
    test: HeldOut
    title: str
    seed: int


def load_onnx(path: Union[str, Path]):
    """The ONNX model at `path`, checked: readable, opset >= 13, one image input with fixed H, W, C, one output."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: model file not found")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise ExportError(f"{p}: cannot be read as an ONNX model ({type(e).__name__}: {str(e).strip()[:200]})") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"{p}: opset {opset}; opset {MIN_OPSET} or later is required (re-export with a newer opset)")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ExportError(f"{p}: the model has {len(inputs)} inputs and {len(model.graph.output)} outputs; one image input and one output are required")
    return model


def input_layout(model) -> Tuple[str, Tuple[int, int, int]]:
    """("NCHW" or "NHWC", (H, W, C)) from the input's shape; only the batch may be dynamic."""
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    shown = [d if d is not None else "?" for d in dims]
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise ExportError(f"the model input {inp.name!r} has shape {shown}; a fixed image shape is required "
                          "(only the batch may be dynamic): export with fixed height, width and channels")
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        return "NCHW", (dims[2], dims[3], dims[1])
    if dims[3] in (1, 3):
        return "NHWC", (dims[1], dims[2], dims[3])
    if dims[1] in (1, 3):
        return "NCHW", (dims[2], dims[3], dims[1])
    raise ExportError(f"the model input has shape {shown}; 1 (gray) or 3 (rgb/bgr) channels are supported")


def prepare_onnx(path: Union[str, Path], opts: ExportOptions, split_node: Optional[str] = None) -> OnnxPrepared:
    """Every check on user input, before anything is written."""
    from edge_quq_export import pipeline as pl

    p = Path(path)
    model = load_onnx(p)
    layout, shape = input_layout(model)
    g = Graph(model)
    split, how = find_split(g, split_node, opts.dropout)
    head, nodes = parse_head(g, split, opts.dropout)
    classes = pl._class_names(opts.classes, head.num_classes)
    spec = pl._preprocess(opts, shape)
    if opts.quant_data is None:
        raise ExportError("quantization data is required (--quant-data: images or an array the int8 ranges are set on)")
    if opts.temperature_data is not None:
        raise ExportError("--temperature-data is not supported for ONNX models yet (set it later with the runtime's tools)")
    quant = pl._inputs(opts.quant_data, shape, spec, "quantization data", opts.quant_samples, opts.seed)[0]
    test = pl._test_data(opts, shape, spec, classes, quant)
    return OnnxPrepared(model=model, path=p, layout=layout, shape=shape, split=split, split_how=how, head=head,
                        head_nodes=nodes, classes=classes, spec=spec, quant=quant, test=test,
                        title=opts.name or p.stem, seed=opts.seed)


def float_backbone(model, split: str):
    """The float graph from the input to `split`, input `image` (batch made dynamic), output `features` [N, F]."""
    import onnx
    from onnx import helper

    from edge_quq_export import convert as conv

    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    nodes, needed = _ancestors(model.graph, split)
    graph = helper.make_graph(nodes, "backbone", [inp], [], initializer=[t for t in model.graph.initializer if t.name in needed])
    bb = helper.make_model(graph, opset_imports=list(model.opset_import))
    bb.ir_version = model.ir_version
    inp = inp.name
    flat = split + "__flat"
    bb.graph.node.append(helper.make_node("Flatten", [split], [flat], axis=1))
    del bb.graph.output[:]
    bb.graph.output.append(helper.make_tensor_value_info(flat, onnx.TensorProto.FLOAT, ["N", None]))
    _dynamic_batch(bb)
    conv._rename_onnx_value(bb, inp, conv.BACKBONE_INPUT)
    conv._rename_onnx_value(bb, flat, conv.BACKBONE_OUTPUT)
    return bb


def _ancestors(graph, tensor: str):
    """The nodes `tensor` depends on, in graph order, and every value name they read."""
    producer = {o: n for n in graph.node for o in n.output}
    keep, todo, needed = set(), [tensor], set()
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is None or id(n) in keep:
            continue
        keep.add(id(n))
        needed.update(n.input)
        todo.extend(i for i in n.input if i)
    return [n for n in graph.node if id(n) in keep], needed


def _dynamic_batch(model) -> None:
    """Batch dim of the input symbolic; shapes inferred for the fixed batch are dropped (ORT infers them again)."""
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    d.Clear()
    d.dim_param = "N"
    del model.graph.value_info[:]


def run_model(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """A float ONNX model on x (in the model's layout) with ONNX Runtime, batch by batch (1 if the batch is fixed)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    i = sess.get_inputs()[0]
    fixed = i.shape[0] if isinstance(i.shape[0], int) else None
    step = fixed or batch
    outs = [sess.run(None, {i.name: x[s : s + step].astype(np.float32)})[0] for s in range(0, len(x), step)]
    return np.concatenate(outs).reshape(len(x), -1).astype(np.float32)


def export_onnx(path: Union[str, Path], opts: ExportOptions, split_node: Optional[str] = None,
                onnx2tf: Optional[Union[str, Path]] = None) -> Bundle:
    """ONNX classifier -> verified bundle folder at opts.out, or nothing at all. `onnx2tf`: the onnx2tf
    executable for the TFLite backbone (default $EDGE_QUQ_ONNX2TF; neither: an ONNX-only bundle)."""
    from edge_quq_export.onnx2tf_backbone import find_onnx2tf

    out = Path(opts.out)
    check_out(out, opts.force)
    exe = find_onnx2tf(onnx2tf)
    p = prepare_onnx(path, opts, split_node)
    bb = float_backbone(p.model, p.split)
    x_test = to_layout(p.test.x, p.layout)
    float_probs = run_model(p.model, x_test)
    try:
        float_feats = run_model(bb, x_test)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the backbone does not run with a dynamic batch ({str(e).strip().splitlines()[0][:200]}); "
                          "export the model with a dynamic batch dimension") from None
    reproduction = float(np.max(np.abs(p.head.probs(float_feats) - float_probs)))
    if reproduction > HEAD_REPRODUCTION_TOL * max(1.0, float(np.max(np.abs(float_probs)))):
        raise ExportError(f"the extracted head does not reproduce the model's output (max |diff| {reproduction:.3g}); "
                          f"the head after {p.split!r} holds something the exporter does not model")
    with Staging(out, opts.force) as st:
        c = _convert(p, bb, st.path, exe)
        report = _verify(p, c, st.path, float_probs, float_feats, reproduction)
        return _write(st, p, c, report, opts)


@dataclass
class _Files:
    backbone_onnx: ModelFile
    head: HeadSpec
    sizes: Dict[str, int]
    backbone_tflite: Optional[ModelFile] = None
    note: Optional[str] = ONNX_ONLY_NOTE  # why there is no TFLite backbone; None when there is one
    converter: Optional[str] = None  # the TFLite converter that was run, whatever came of it


def _convert(p: OnnxPrepared, bb, folder: Path, onnx2tf: Optional[Path]) -> _Files:
    import onnx

    from edge_quq_export import convert as conv

    conv.onnx_int8_backbone(bb, to_layout(p.quant, p.layout), folder / "backbone_int8.onnx")
    names = [f"dense{i}" for i in range(len(p.head.kernels))]
    save_head_weights(folder / "head.npz", names, p.head.kernels, p.head.biases)
    onnx.save(conv.onnx_head(p.head), str(folder / "head_f32.onnx"))
    (folder / "head_f32.tflite").write_bytes(conv.tflite_head(p.head))
    acts = [*p.head.hidden_activations, p.head.activation]
    layers = tuple(HeadLayer(name=n, dropout=float(r), units=int(k.shape[1]), activation=a)
                   for n, r, k, a in zip(names, p.head.rates, p.head.kernels, acts))
    head = HeadSpec(weights="head.npz", layers=layers, feature_size=p.head.feature_size, tflite="head_f32.tflite",
                    onnx="head_f32.onnx", mask_inputs=tuple(f"mask{i}" for i in range(len(layers))),
                    extra={"onnx_nodes": list(p.head_nodes), "split": p.split_how})
    mf = ModelFile(file="backbone_int8.onnx", input=QuantParams("float32"), output=QuantParams("float32"),
                   input_name=conv.BACKBONE_INPUT, output_name=conv.BACKBONE_OUTPUT)
    sizes = {"model.onnx": p.path.stat().st_size, "backbone_f32.onnx": len(bb.SerializeToString())}
    sizes.update({f: (folder / f).stat().st_size for f in (mf.file, *head.files)})
    files = _Files(backbone_onnx=mf, head=head, sizes=sizes)
    if onnx2tf is not None:
        files.converter = "onnx2tf"
        _tflite_backbone(p, bb, folder, onnx2tf, files)
    return files


def _tflite_backbone(p: OnnxPrepared, bb, folder: Path, exe: Path, files: _Files) -> None:
    """backbone_int8.tflite by onnx2tf into `folder` and `files`, or the reason it failed into files.note."""
    import tempfile

    import onnx

    from edge_quq_export import convert as conv
    from edge_quq_export.onnx2tf_backbone import ConversionFailed, convert

    with tempfile.TemporaryDirectory(prefix="edge_quq_bb_") as tmp:
        onnx.save(bb, str(Path(tmp) / "backbone.onnx"))
        try:
            data = convert(exe, Path(tmp) / "backbone.onnx", p.quant, p.layout)
        except ConversionFailed as e:
            files.note = f"ONNX only: onnx2tf could not convert the backbone to TFLite ({e})"
            return
    target = folder / "backbone_int8.tflite"
    try:
        target.write_bytes(conv.rename_tflite_tensors(data, single=(conv.BACKBONE_INPUT, conv.BACKBONE_OUTPUT)))
        files.backbone_tflite = conv.tflite_model_file(target)
    except Exception as e:  # noqa: BLE001  (a model the runtime cannot load: the ONNX backbone still serves)
        target.unlink(missing_ok=True)
        files.note = f"ONNX only: onnx2tf's TFLite backbone does not load ({type(e).__name__}: {str(e).strip()[:200]})"
        return
    files.sizes[target.name] = target.stat().st_size
    files.note = None


def _verify(p: OnnxPrepared, c: _Files, folder: Path, float_probs: np.ndarray, float_feats: np.ndarray,
            reproduction: float) -> Dict[str, Any]:
    from edge_quq_export.parity import build_report, random_masks, run_head_model, run_onnx, write_report

    x = to_layout(p.test.x, p.layout)
    backends = {"onnx": run_onnx(folder / c.backbone_onnx.file, x)}
    rejected = _check_tflite(p, c, folder, x, float_probs, float_feats, backends)
    t = min(16, len(float_feats))
    masks = random_masks(p.head, t, p.seed)
    ref = p.head.probs(float_feats[:t], masks)
    head_check = {k: float(np.max(np.abs(run_head_model(k, folder / f, float_feats[:t], masks) - ref)))
                  for k, f in (("onnx", c.head.onnx), ("tflite", c.head.tflite))}
    report = build_report(n=len(p.test.x), data_source=p.test.source, labels=p.test.labels, float_probs=float_probs,
                          float_feats=float_feats, head=p.head, backends=backends, head_check=head_check,
                          sizes=c.sizes, head_reproduction=reproduction)
    report["quant_samples"] = int(len(p.quant))
    report["source"] = "onnx"
    report["tflite_converter"] = c.converter
    if rejected:
        report["tflite_rejected"] = rejected
    if c.note:
        report["backbone_note"] = c.note
    write_report(folder, report, p.title)
    if c.note:
        with open(folder / "parity.md", "a", encoding="utf-8") as f:
            f.write(f"\n{c.note}.\n")
    return report


def _check_tflite(p: OnnxPrepared, c: _Files, folder: Path, x: np.ndarray, float_probs: np.ndarray,
                  float_feats: np.ndarray, backends: Dict[str, np.ndarray]) -> Optional[Dict[str, Any]]:
    """Adds the onnx2tf backbone's features to `backends` when it keeps parity; otherwise removes its file,
    records why in c.note and returns its parity row (kept in the report as `tflite_rejected`)."""
    from edge_quq_export.parity import compare, run_tflite

    if c.backbone_tflite is None:
        return None
    mf = c.backbone_tflite
    try:
        feats = run_tflite(folder / mf.file, x, {"input": mf.input.to_json(), "output": mf.output.to_json()})
    except Exception as e:  # noqa: BLE001  (e.g. a batch the converted graph cannot be resized to)
        _drop_tflite(c, folder, f"ONNX only: onnx2tf's TFLite backbone does not run ({type(e).__name__}: {str(e).strip()[:200]})")
        return None
    row = compare(float_probs, float_feats, feats, p.head, p.test.labels)
    onnx_row = compare(float_probs, float_feats, backends["onnx"], p.head, p.test.labels)
    floor = onnx_row["top1_agreement"] - TFLITE_MAX_AGREEMENT_DROP
    if row["feature_cosine_mean"] >= TFLITE_MIN_COSINE and row["top1_agreement"] >= floor:
        backends["tflite"] = feats
        return None
    _drop_tflite(c, folder, f"ONNX only: the onnx2tf TFLite backbone lost parity with float (top-1 agreement "
                            f"{100 * row['top1_agreement']:.1f}%, needed {100 * floor:.1f}%; feature cosine mean "
                            f"{row['feature_cosine_mean']:.4f}, needed {TFLITE_MIN_COSINE}), so it was left out")
    return row


def _drop_tflite(c: _Files, folder: Path, note: str) -> None:
    if c.backbone_tflite is not None:
        (folder / c.backbone_tflite.file).unlink(missing_ok=True)
        c.sizes.pop(c.backbone_tflite.file, None)
    c.backbone_tflite = None
    c.note = note


def _write(st: Staging, p: OnnxPrepared, c: _Files, report: Dict[str, Any], opts: ExportOptions) -> Bundle:
    from edge_quq_export.pipeline import _KEY_ORDER, _producer

    extra: Dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "producer": _producer(),
        "parity": "parity.json",
        "source_model": {"format": "onnx", "file": p.path.name, "split": p.split_how},
    }
    if c.note:
        extra["backbone_note"] = c.note
    else:
        extra["backbone_converter"] = "onnx2tf (full-integer int8, per-channel)"
    if p.test.labels is not None:
        extra["accuracy"] = {"data": p.test.source, "samples": int(len(p.test.x)),
                             "float": report["float"]["top1_accuracy"]}
        extra["accuracy"].update({f"int8_{k}": r["top1_accuracy"] for k, r in report["int8"].items()})
    extra.update(opts.extra_manifest)
    bundle = Bundle(path=st.path, name=p.title, classes=p.classes,
                    input=InputSpec(shape=p.shape, preprocess=p.spec, layout=p.layout),
                    backbone_tflite=c.backbone_tflite, backbone_onnx=c.backbone_onnx, split_layer=p.split, head=c.head,
                    decision=opts.decision, calibration=None, extra=extra, key_order=_KEY_ORDER)
    return st.commit(bundle)
