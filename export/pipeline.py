"""One export, start to finish: Keras model + calibration data -> verified bundle folder (or nothing).

Order matters for the "nothing half-written" promise: every check that can fail on user input (output
folder, model file, head layout, calibration shape) runs before the staging folder exists, and the staging
folder only becomes OUT after the manifest has been written and re-verified.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_quq.bundle import Bundle, Preprocess
from edge_quq.errors import BundleError, ExportError
from edge_quq.head import save_head_weights

from edge_quq_export import __version__
from edge_quq_export.writer import Staging, check_out


@dataclass
class ExportOptions:
    calibration: Union[str, Path, np.ndarray]
    out: Path
    test_data: Union[str, Path, np.ndarray, None] = None
    test_labels: Union[str, Path, np.ndarray, None] = None
    test_source: Optional[str] = None  # how the report names in-memory test data
    split_layer: Optional[str] = None
    dropout: Optional[Sequence[float]] = None
    classes: Optional[Sequence[str]] = None
    color: Optional[str] = None
    pixel_scale: float = 1.0 / 255.0
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    interpolation: str = "area"
    crop_fraction: float = 1.0
    name: Optional[str] = None
    force: bool = False
    calib_samples: int = 300
    test_samples: Optional[int] = None
    threshold: float = 0.5
    num_iter: int = 50
    z: float = 0.8
    mixed: str = "ignore"
    seed: int = 0
    extra_manifest: Dict[str, Any] = field(default_factory=dict)
    # Labelled held-out data to fit a post-hoc temperature on (the int8 TFLite backbone's head logits);
    # None: no temperature in the manifest. Same forms as test_data / test_labels.
    temperature_data: Union[str, Path, np.ndarray, None] = None
    temperature_labels: Union[str, Path, np.ndarray, None] = None
    temperature_source: Optional[str] = None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def load_keras_model(path: Union[str, Path]):
    """keras.models.load_model with one-line errors for the ways a model file goes wrong."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: model file not found")
    if p.is_dir():
        raise ExportError(f"{p}: is a folder; give a .keras (or .h5) model file (SavedModel folders are not Keras 3 models)")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
                bad = z.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ExportError(f"{p}: Keras model file is truncated or corrupt ({_first_line(e)})") from None
        if bad is not None:
            raise ExportError(f"{p}: Keras model file is corrupt (member {bad!r} fails its CRC check)")
        if "config.json" not in names:
            raise ExportError(f"{p}: is a zip file but not a Keras model (no config.json inside)")
    elif head[:8] != b"\x89HDF\r\n\x1a\n":
        raise ExportError(f"{p}: not a Keras model file (expected a .keras zip archive or an .h5 file)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from edge_quq_export.convert import quiet_fds

    with quiet_fds():  # TensorFlow's import announces CPU features on stderr
        import keras
        import tensorflow  # noqa: F401

    try:
        model = keras.models.load_model(str(p), compile=False)
    except Exception as e:  # keras raises ValueError/TypeError/OSError and more, depending on what is wrong
        raise ExportError(f"{p}: cannot be loaded as a Keras model ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(model, keras.Model):
        raise ExportError(f"{p}: holds a {type(model).__name__}, not a Keras model")
    return model


def _input_shape(model) -> Tuple[int, int, int]:
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(d is None for d in shape):
        raise ExportError(f"the model input has shape {tuple(model.inputs[0].shape)}; a fixed image shape [N, H, W, C] is required")
    h, w, c = (int(d) for d in shape)
    if c not in (1, 3):
        raise ExportError(f"the model input has {c} channels; 1 (gray) or 3 (rgb/bgr) are supported")
    return h, w, c


def _preprocess(opts: ExportOptions, shape: Tuple[int, int, int]) -> Preprocess:
    h, w, c = shape
    color = opts.color or ("gray" if c == 1 else "rgb")
    if (color == "gray") != (c == 1):
        raise ExportError(f"--color {color} does not fit a model input with {c} channel(s)")
    d: Dict[str, Any] = {"color": color, "resize": [h, w], "interpolation": opts.interpolation,
                         "crop_fraction": opts.crop_fraction, "pixel_scale": opts.pixel_scale}
    if opts.mean is not None:
        d["mean"] = list(opts.mean)
    if opts.std is not None:
        d["std"] = list(opts.std)
    try:
        return Preprocess.from_json(d)
    except BundleError as e:
        raise ExportError(str(e).replace("manifest input.preprocess", "preprocessing options")) from None


def _array_input(x: np.ndarray, shape, spec: Preprocess, what: str, limit: Optional[int], seed: int):
    from edge_quq_export.datasets import preprocess_array

    x = np.asarray(x)
    if limit is not None and len(x) > limit:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))]
    return preprocess_array(x, shape, spec, what)


def _producer() -> Dict[str, str]:
    versions = {"edge_quq_export": __version__}
    for mod in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return versions


def _predict(fn, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns that a tensor is not a one-element list of inputs
        return np.concatenate([np.asarray(fn(x[s : s + batch], training=False)) for s in range(0, len(x), batch)]).astype(np.float32)


def export_model(model_or_path: Any, opts: ExportOptions) -> Bundle:
    out = Path(opts.out)
    check_out(out, opts.force)  # fail fast, before TensorFlow loads
    model_path = None
    if isinstance(model_or_path, (str, Path)):
        model_path = Path(model_or_path)
        model = load_keras_model(model_path)
    else:
        model = model_or_path

    from edge_quq_export import convert
    from edge_quq_export.datasets import load_inputs, load_labels
    from edge_quq_export.parity import build_report, random_masks, run_head_model, run_onnx, run_tflite, write_report
    from edge_quq_export.split import find_split

    shape = _input_shape(model)
    split = find_split(model, opts.split_layer, opts.dropout)
    head = split.head_weights()
    classes = list(opts.classes) if opts.classes else [f"class{i}" for i in range(split.num_classes)]
    if len(classes) != split.num_classes:
        raise ExportError(f"{len(classes)} class names given but the model outputs {split.num_classes} classes")
    if len(set(classes)) != len(classes):
        raise ExportError("class names must be unique")
    spec = _preprocess(opts, shape)

    # Calibration and held-out data, preprocessed exactly like the runtime will.
    if isinstance(opts.calibration, np.ndarray):
        calib = _array_input(opts.calibration, shape, spec, "calibration data", opts.calib_samples, opts.seed)
    else:
        calib, _ = load_inputs(opts.calibration, shape, spec, "calibration data", opts.calib_samples, opts.seed)
    labels = None
    if opts.test_data is None:
        x_test, source = calib, "the calibration data (no --test-data given)"
    elif isinstance(opts.test_data, np.ndarray):
        x_test = _array_input(opts.test_data, shape, spec, "test data", None, opts.seed)
        source = opts.test_source or "an in-memory array"
        labels = None if opts.test_labels is None else np.asarray(opts.test_labels).reshape(-1).astype(np.int64)
    else:
        x_test, labels = load_inputs(opts.test_data, shape, spec, "test data", None, opts.seed, classes=classes)
        source = str(opts.test_data)
    if opts.test_labels is not None and not isinstance(opts.test_labels, np.ndarray):
        labels = load_labels(opts.test_labels, len(x_test))
    if labels is not None and len(labels) != len(x_test):
        raise ExportError(f"{len(labels)} test labels for {len(x_test)} test images")
    if opts.test_data is not None and opts.test_samples is not None and len(x_test) > opts.test_samples:
        # Subset after labels are attached, so images and labels stay paired.
        keep = np.sort(np.random.default_rng(opts.seed).choice(len(x_test), opts.test_samples, replace=False))
        x_test = x_test[keep]
        labels = labels[keep] if labels is not None else None
    if labels is not None:
        if len(labels) != len(x_test):
            raise ExportError(f"{len(labels)} test labels for {len(x_test)} test images")
        if labels.min() < 0 or labels.max() >= split.num_classes:
            raise ExportError(f"test labels must be class indices 0..{split.num_classes - 1}")
    if opts.mixed not in ("ignore", "keep"):
        raise ExportError(f"--mixed must be 'ignore' or 'keep', got {opts.mixed!r}")
    temp = _temperature_inputs(opts, shape, spec, classes, split.num_classes, split.activation)

    with Staging(out, opts.force) as st:
        d = st.path
        (d / "backbone_int8.tflite").write_bytes(convert.tflite_backbone(split.backbone, calib, shape))
        tfl_in, tfl_out = convert.tflite_io(d / "backbone_int8.tflite")
        onnx_f32 = convert.onnx_float_backbone(split.backbone, shape)
        convert.onnx_int8_backbone(onnx_f32, calib, d / "backbone_int8.onnx")
        names = [b.name for b in split.blocks]
        save_head_weights(d / "head.npz", names, head.kernels, head.biases)
        (d / "head_f32.tflite").write_bytes(convert.tflite_head(head))
        import onnx

        onnx.save(convert.onnx_head(head), str(d / "head_f32.onnx"))

        # Sizes of the float references, for the size-reduction figure (not shipped in the bundle).
        with tempfile.TemporaryDirectory(prefix="edge_quq_ref_") as tmp:
            f32_tfl = Path(tmp) / "backbone_f32.tflite"
            f32_tfl.write_bytes(convert.tflite_backbone(split.backbone, None, shape))
            f32_onnx = Path(tmp) / "backbone_f32.onnx"
            onnx.save(onnx_f32, str(f32_onnx))
            sizes: Dict[str, int] = {}
            if model_path is not None:
                sizes["model.keras"] = model_path.stat().st_size
            sizes["backbone_f32.tflite"] = f32_tfl.stat().st_size
            sizes["backbone_f32.onnx"] = f32_onnx.stat().st_size
        for f in ("backbone_int8.tflite", "backbone_int8.onnx", "head.npz", "head_f32.tflite", "head_f32.onnx"):
            sizes[f] = (d / f).stat().st_size

        # Parity with the real runtimes.
        float_probs = _predict(model, x_test)
        float_feats = _predict(split.backbone, x_test)
        reproduction = float(np.max(np.abs(head.probs(float_feats) - float_probs)))
        tfl_io = {"input": tfl_in, "output": tfl_out}
        backends = {"tflite": run_tflite(d / "backbone_int8.tflite", x_test, tfl_io), "onnx": run_onnx(d / "backbone_int8.onnx", x_test)}
        t = min(16, len(float_feats))
        masks = random_masks(head, t, opts.seed)
        ref = head.probs(float_feats[:t], masks)
        head_check = {k: float(np.max(np.abs(run_head_model(k, d / f"head_f32.{k}", float_feats[:t], masks) - ref))) for k in ("tflite", "onnx")}
        report = build_report(n=len(x_test), data_source=source, labels=labels, float_probs=float_probs, float_feats=float_feats,
                              head=head, backends=backends, head_check=head_check, sizes=sizes, head_reproduction=reproduction)
        report["calibration_samples"] = int(len(calib))
        title = opts.name or (model_path.stem if model_path else model.name)
        write_report(d, report, title)

        def io_entry(q: Dict[str, Any]) -> Dict[str, Any]:
            return {k: v for k, v in q.items() if not k.startswith("_")}

        manifest: Dict[str, Any] = {
            "format": "edge-quq-bundle",
            "schema_version": 1,
            "name": title,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "producer": _producer(),
            "classes": classes,
            "input": {"shape": list(shape), "layout": "NHWC", "preprocess": spec.to_json()},
            "backbone": {
                "split_layer": split.split_layer,
                "tflite": {"file": "backbone_int8.tflite", "input": io_entry(tfl_in), "output": io_entry(tfl_out),
                           "input_name": tfl_in["_name"], "output_name": tfl_out["_name"]},
                "onnx": {"file": "backbone_int8.onnx", "input": {"dtype": "float32"}, "output": {"dtype": "float32"},
                         "input_name": convert.BACKBONE_INPUT, "output_name": convert.BACKBONE_OUTPUT},
            },
            "head": {
                "weights": "head.npz",
                "feature_size": split.feature_size,
                "layers": split.manifest_layers(),
                "tflite": "head_f32.tflite",
                "onnx": "head_f32.onnx",
                "mask_inputs": [f"mask{i}" for i in range(len(split.blocks))],
                "keras_layers": split.head_layers,
                "dropout_source": "option --dropout" if split.dropout_from_option else "model",
            },
            "decision": {"threshold": opts.threshold, "num_iter": opts.num_iter, "z": opts.z, "mixed": opts.mixed},
            "parity": "parity.json",
        }
        if labels is not None:
            manifest["accuracy"] = {
                "data": source, "samples": int(len(x_test)),
                "float": report["float"]["top1_accuracy"],
                "int8_tflite": report["int8"]["tflite"]["top1_accuracy"],
                "int8_onnx": report["int8"]["onnx"]["top1_accuracy"],
            }
        if temp is not None:
            manifest["calibration"] = _fit_temperature(d / "backbone_int8.tflite", tfl_io, head, *temp)
        manifest.update(opts.extra_manifest)
        return st.commit(manifest)


def _temperature_inputs(opts: ExportOptions, shape, spec: Preprocess, classes: Sequence[str], num_classes: int,
                        activation: str) -> Optional[Tuple[np.ndarray, np.ndarray, str]]:
    """Held-out images and labels for the temperature fit, checked before anything is written."""
    if opts.temperature_data is None:
        if opts.temperature_labels is not None:
            raise ExportError("--temperature-labels given without --temperature-data")
        return None
    from edge_quq_export.datasets import load_inputs, load_labels

    if activation not in ("sigmoid", "softmax"):
        raise ExportError(f"a temperature needs a sigmoid or softmax head; this head's output is {activation!r}")
    if isinstance(opts.temperature_data, np.ndarray):
        x = _array_input(opts.temperature_data, shape, spec, "temperature data", None, opts.seed)
        y = None if opts.temperature_labels is None else np.asarray(opts.temperature_labels).reshape(-1).astype(np.int64)
        source = opts.temperature_source or "an in-memory array"
    else:
        x, y = load_inputs(opts.temperature_data, shape, spec, "temperature data", None, opts.seed, classes=classes)
        source = opts.temperature_source or str(opts.temperature_data)
    if opts.temperature_labels is not None and not isinstance(opts.temperature_labels, np.ndarray):
        y = load_labels(opts.temperature_labels, len(x))
    if y is None:
        raise ExportError("temperature data needs labels (.npz 'x' and 'y', class sub-folders, or --temperature-labels)")
    if len(y) != len(x):
        raise ExportError(f"{len(y)} temperature labels for {len(x)} temperature images")
    if y.min() < 0 or y.max() >= num_classes:
        raise ExportError(f"temperature labels must be class indices 0..{num_classes - 1}")
    return x, y, source


def _fit_temperature(tflite: Path, io: Dict[str, Any], head, x: np.ndarray, y: np.ndarray, source: str) -> Dict[str, Any]:
    """T for the deployed model: fitted on the int8 TFLite backbone's features through the float head."""
    from edge_quq.calibration import calibration_summary, fit_temperature, temperature_objective
    from edge_quq_export.parity import run_tflite

    z = head.logits(run_tflite(tflite, x, io)).astype(np.float64)
    t = fit_temperature(z, y, head.activation)
    before = calibration_summary(z, y, head.activation, 1.0)
    after = calibration_summary(z, y, head.activation, t)
    return {
        "temperature": round(t, 6),
        "method": "temperature scaling of the head logits (edge_quq.calibration)",
        "objective": temperature_objective(head.activation),
        "fitted_on": source,
        "samples": int(len(y)),
        "backbone": "tflite",
        "heldout": {"ece_before": round(before["ece"], 6), "ece_after": round(after["ece"], 6),
                    "nll_before": round(before["nll"], 6), "nll_after": round(after["nll"], 6)},
    }
