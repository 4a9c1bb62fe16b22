"""One export, start to finish: Keras model + quantization data -> verified bundle folder (or nothing).

Four stages, each with a small interface: `prepare` (every check on user input; loads the model and the
data), `convert` (writes the int8 backbones and the head into the staging folder), `verify` (parity with the
real runtimes, written as parity.json/.md) and `write` (the manifest, from edge_quq.bundle's dataclasses);
a post-hoc temperature, when asked for, is fitted between the last two.
Order matters for the "nothing half-written" promise: everything that can fail on user input runs in
`prepare`, before the staging folder exists, and the staging folder only becomes OUT after the manifest has
been written and re-verified.

"Quantization data" is the representative input the int8 converters set activation ranges on (TFLite and
ONNX Runtime call it calibration data); "calibration" in edge-quq means temperature scaling only.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import zipfile
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from edge_quq.bundle import Bundle, DecisionDefaults, HeadLayer, HeadSpec, InputSpec, ModelFile, Preprocess, QuantParams
from edge_quq.defaults import MIXED_POLICIES
from edge_quq.errors import BundleError, ExportError
from edge_quq.head import HeadWeights, save_head_weights

from edge_quq_export import DEFAULT_QUANT_SAMPLES, __version__
from edge_quq_export.writer import Staging, check_out

ArrayOrPath = Union[str, Path, np.ndarray]
_DECISION = DecisionDefaults()
# Exported manifests start with these keys (then the runtime's fields, then the exporter's records).
_KEY_ORDER = ("format", "schema_version", "name", "created", "producer")


@dataclass
class ExportOptions:
    out: Path
    # Representative input for the int8 conversion; `calibration=` is its old name, still accepted.
    quant_data: Optional[ArrayOrPath] = None
    test_data: Optional[ArrayOrPath] = None
    test_labels: Optional[ArrayOrPath] = None
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
    quant_samples: int = DEFAULT_QUANT_SAMPLES
    test_samples: Optional[int] = None
    threshold: float = _DECISION.threshold
    num_iter: int = _DECISION.num_iter
    z: float = _DECISION.z
    mixed: str = _DECISION.mixed
    seed: int = 0
    extra_manifest: Dict[str, Any] = field(default_factory=dict)
    # Labelled held-out data to fit a post-hoc temperature on (the int8 TFLite backbone's head logits);
    # None: no temperature in the manifest. Same forms as test_data / test_labels.
    temperature_data: Optional[ArrayOrPath] = None
    temperature_labels: Optional[ArrayOrPath] = None
    temperature_source: Optional[str] = None
    # Old names of quant_data and quant_samples.
    calibration: InitVar[Optional[ArrayOrPath]] = None
    calib_samples: InitVar[Optional[int]] = None

    def __post_init__(self, calibration: Optional[ArrayOrPath], calib_samples: Optional[int]) -> None:
        if calibration is not None:
            if self.quant_data is not None:
                raise ExportError("give the quantization data once (quant_data, or its old name calibration)")
            self.quant_data = calibration
        if calib_samples is not None:
            self.quant_samples = calib_samples

    @property
    def decision(self) -> DecisionDefaults:
        if self.mixed not in MIXED_POLICIES:
            raise ExportError(f"--mixed must be one of {', '.join(MIXED_POLICIES)}, got {self.mixed!r}")
        return DecisionDefaults(threshold=float(self.threshold), num_iter=int(self.num_iter), z=float(self.z), mixed=str(self.mixed))


@dataclass
class HeldOut:
    """Preprocessed images, their labels when known, and how reports name where they came from."""

    x: np.ndarray
    labels: Optional[np.ndarray]
    source: str


@dataclass
class Prepared:
    """Everything `prepare` checked and loaded; the later stages only read it."""

    model: Any  # keras.Model
    model_path: Optional[Path]
    shape: Tuple[int, int, int]
    split: Any  # edge_quq_export.split.Split
    head: HeadWeights
    classes: Tuple[str, ...]
    spec: Preprocess
    quant: np.ndarray
    test: HeldOut
    temperature: Optional[HeldOut]
    title: str
    seed: int
    decision: DecisionDefaults


@dataclass
class Converted:
    """The model files `convert` wrote and their manifest entries."""

    backbone_tflite: ModelFile
    backbone_onnx: ModelFile
    head: HeadSpec
    sizes: Dict[str, int]  # bytes of the bundle's model files and of the float references (not shipped)


def export_model(model_or_path: Any, opts: ExportOptions) -> Bundle:
    """Keras model (or .keras/.h5 path) -> verified bundle folder at opts.out, or nothing at all."""
    out = Path(opts.out)
    check_out(out, opts.force)  # fail fast, before TensorFlow loads
    p = prepare(model_or_path, opts)
    with Staging(out, opts.force) as st:
        c = convert(p, st.path)
        report = verify(p, c, st.path)
        calibration = temperature_calibration(p, c, st.path)
        return write(st, p, c, report, calibration, opts)


# --- prepare ---------------------------------------------------------------------------------------------

def prepare(model_or_path: Any, opts: ExportOptions) -> Prepared:
    """Every check that can fail on user input, before anything is written: model, head, classes, data."""
    from edge_quq_export.split import find_split

    model_path = Path(model_or_path) if isinstance(model_or_path, (str, Path)) else None
    model = load_keras_model(model_path) if model_path is not None else model_or_path
    shape = _input_shape(model)
    split = find_split(model, opts.split_layer, opts.dropout)
    classes = _class_names(opts.classes, split.num_classes)
    spec = _preprocess(opts, shape)
    decision = opts.decision  # checks --mixed now, not after the conversion
    if opts.quant_data is None:
        raise ExportError("quantization data is required (--quant-data: images or an array the int8 ranges are set on)")
    quant = _inputs(opts.quant_data, shape, spec, "quantization data", opts.quant_samples, opts.seed)[0]
    test = _test_data(opts, shape, spec, classes, quant)
    temperature = _temperature_data(opts, shape, spec, classes, split.activation)
    title = opts.name or (model_path.stem if model_path else model.name)
    return Prepared(model=model, model_path=model_path, shape=shape, split=split, head=split.head_weights(),
                    classes=classes, spec=spec, quant=quant, test=test, temperature=temperature, title=title,
                    seed=opts.seed, decision=decision)


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
    _check_model_file(p)
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


def _check_model_file(p: Path) -> None:
    """A .keras zip archive (intact, with a config.json) or an HDF5 file, checked before TensorFlow loads."""
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



def _class_names(given: Optional[Sequence[str]], num_classes: int) -> Tuple[str, ...]:
    classes = tuple(str(c) for c in given) if given else tuple(f"class{i}" for i in range(num_classes))
    if len(classes) != num_classes:
        raise ExportError(f"{len(classes)} class names given but the model outputs {num_classes} classes")
    if len(set(classes)) != len(classes):
        raise ExportError("class names must be unique")
    return classes


def _inputs(data: ArrayOrPath, shape, spec: Preprocess, what: str, limit: Optional[int], seed: int,
            classes: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Images preprocessed exactly like the runtime will, from an array or a file/folder (which may carry labels)."""
    from edge_quq_export.datasets import load_inputs, preprocess_array

    if not isinstance(data, np.ndarray):
        return load_inputs(data, shape, spec, what, limit, seed, classes=classes)
    x = np.asarray(data)
    if limit is not None and len(x) > limit:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))]
    return preprocess_array(x, shape, spec, what), None


def _labels(given: Optional[ArrayOrPath], found: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    """Labels given separately (array or file) win over labels found with the images."""
    from edge_quq_export.datasets import load_labels

    if given is None:
        return found
    if isinstance(given, np.ndarray):
        return np.asarray(given).reshape(-1).astype(np.int64)
    return load_labels(given, n)


def _check_labels(labels: np.ndarray, n: int, num_classes: int, what: str) -> None:
    if len(labels) != n:
        raise ExportError(f"{len(labels)} {what} labels for {n} {what} images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ExportError(f"{what} labels must be class indices 0..{num_classes - 1}")


def _test_data(opts: ExportOptions, shape, spec: Preprocess, classes: Sequence[str], quant: np.ndarray) -> HeldOut:
    """Held-out data for the parity report (the quantization data when none is given)."""
    if opts.test_data is None:
        return HeldOut(quant, None, "the quantization data (no --test-data given)")
    x, found = _inputs(opts.test_data, shape, spec, "test data", None, opts.seed, classes)
    labels = _labels(opts.test_labels, found, len(x))
    source = (opts.test_source or "an in-memory array") if isinstance(opts.test_data, np.ndarray) else str(opts.test_data)
    if labels is not None and len(labels) != len(x):
        raise ExportError(f"{len(labels)} test labels for {len(x)} test images")
    if opts.test_samples is not None and len(x) > opts.test_samples:
        # Subset after labels are attached, so images and labels stay paired.
        keep = np.sort(np.random.default_rng(opts.seed).choice(len(x), opts.test_samples, replace=False))
        x, labels = x[keep], (labels[keep] if labels is not None else None)
    if labels is not None:
        _check_labels(labels, len(x), len(classes), "test")
    return HeldOut(x, labels, source)


def _temperature_data(opts: ExportOptions, shape, spec: Preprocess, classes: Sequence[str], activation: str) -> Optional[HeldOut]:
    """Held-out images and labels for the temperature fit, checked before anything is written."""
    if opts.temperature_data is None:
        if opts.temperature_labels is not None:
            raise ExportError("--temperature-labels given without --temperature-data")
        return None
    if activation not in ("sigmoid", "softmax"):
        raise ExportError(f"a temperature needs a sigmoid or softmax head; this head's output is {activation!r}")
    x, found = _inputs(opts.temperature_data, shape, spec, "temperature data", None, opts.seed, classes)
    labels = _labels(opts.temperature_labels, found, len(x))
    default_source = "an in-memory array" if isinstance(opts.temperature_data, np.ndarray) else str(opts.temperature_data)
    if labels is None:
        raise ExportError("temperature data needs labels (.npz 'x' and 'y', class sub-folders, or --temperature-labels)")
    _check_labels(labels, len(x), len(classes), "temperature")
    return HeldOut(x, labels, opts.temperature_source or default_source)


# --- convert ---------------------------------------------------------------------------------------------

def convert(p: Prepared, folder: Path) -> Converted:
    """The int8 backbones (TFLite, ONNX QDQ), the head weights and the float head models, into `folder`."""
    import onnx

    from edge_quq_export import convert as conv

    tflite = folder / "backbone_int8.tflite"
    tflite.write_bytes(conv.tflite_backbone(p.split.backbone, p.quant, p.shape))
    onnx_f32 = conv.onnx_float_backbone(p.split.backbone, p.shape)
    conv.onnx_int8_backbone(onnx_f32, p.quant, folder / "backbone_int8.onnx")
    blocks = p.split.blocks
    save_head_weights(folder / "head.npz", [b.name for b in blocks], p.head.kernels, p.head.biases)
    (folder / "head_f32.tflite").write_bytes(conv.tflite_head(p.head))
    onnx.save(conv.onnx_head(p.head), str(folder / "head_f32.onnx"))
    head = HeadSpec(
        weights="head.npz", layers=p.split.layer_specs(), feature_size=p.split.feature_size,
        tflite="head_f32.tflite", onnx="head_f32.onnx", mask_inputs=tuple(f"mask{i}" for i in range(len(blocks))),
        extra={"keras_layers": list(p.split.head_layers),
               "dropout_source": "option --dropout" if p.split.dropout_from_option else "model"},
    )
    onnx_file = ModelFile(file="backbone_int8.onnx", input=QuantParams("float32"), output=QuantParams("float32"),
                          input_name=conv.BACKBONE_INPUT, output_name=conv.BACKBONE_OUTPUT)
    sizes = _reference_sizes(p, onnx_f32)
    sizes.update({f: (folder / f).stat().st_size for f in (tflite.name, onnx_file.file, *head.files)})
    return Converted(backbone_tflite=conv.tflite_model_file(tflite), backbone_onnx=onnx_file, head=head, sizes=sizes)


def _reference_sizes(p: Prepared, onnx_f32) -> Dict[str, int]:
    """Sizes of the float originals, for the size-reduction figure (not shipped in the bundle)."""
    import onnx

    from edge_quq_export import convert as conv

    sizes: Dict[str, int] = {}
    if p.model_path is not None:
        sizes["model.keras"] = p.model_path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="edge_quq_ref_") as tmp:
        f32_tfl = Path(tmp) / "backbone_f32.tflite"
        f32_tfl.write_bytes(conv.tflite_backbone(p.split.backbone, None, p.shape))
        f32_onnx = Path(tmp) / "backbone_f32.onnx"
        onnx.save(onnx_f32, str(f32_onnx))
        sizes["backbone_f32.tflite"] = f32_tfl.stat().st_size
        sizes["backbone_f32.onnx"] = f32_onnx.stat().st_size
    return sizes


# --- verify ----------------------------------------------------------------------------------------------

def run_backbone_tflite(folder: Path, mf: ModelFile, x: np.ndarray) -> np.ndarray:
    """Features of a bundle's int8 TFLite backbone, quantized and dequantized like the runtime does."""
    from edge_quq_export.parity import run_tflite

    return run_tflite(folder / mf.file, x, {"input": mf.input.to_json(), "output": mf.output.to_json()})


def verify(p: Prepared, c: Converted, folder: Path) -> Dict[str, Any]:
    """Parity with the real runtimes on the held-out data; written as parity.json and parity.md."""
    from edge_quq_export.parity import build_report, random_masks, run_head_model, run_onnx, write_report

    x = p.test.x
    float_probs = _predict(p.model, x)
    float_feats = _predict(p.split.backbone, x)
    reproduction = float(np.max(np.abs(p.head.probs(float_feats) - float_probs)))
    backends = {"tflite": run_backbone_tflite(folder, c.backbone_tflite, x), "onnx": run_onnx(folder / c.backbone_onnx.file, x)}
    t = min(16, len(float_feats))
    masks = random_masks(p.head, t, p.seed)
    ref = p.head.probs(float_feats[:t], masks)
    head_files = {"tflite": c.head.tflite, "onnx": c.head.onnx}
    head_check = {k: float(np.max(np.abs(run_head_model(k, folder / f, float_feats[:t], masks) - ref))) for k, f in head_files.items()}
    report = build_report(n=len(x), data_source=p.test.source, labels=p.test.labels, float_probs=float_probs,
                          float_feats=float_feats, head=p.head, backends=backends, head_check=head_check, sizes=c.sizes,
                          head_reproduction=reproduction)
    report["quant_samples"] = int(len(p.quant))
    write_report(folder, report, p.title)
    return report


def _predict(fn, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns that a tensor is not a one-element list of inputs
        return np.concatenate([np.asarray(fn(x[s : s + batch], training=False)) for s in range(0, len(x), batch)]).astype(np.float32)


def temperature_calibration(p: Prepared, c: Converted, folder: Path) -> Optional[Dict[str, Any]]:
    """The manifest's `calibration` (None without temperature data): T fitted on the deployed model, the int8
    TFLite backbone's features through the float head."""
    if p.temperature is None:
        return None
    from edge_quq_export.calibration import temperature_record

    z = p.head.logits(run_backbone_tflite(folder, c.backbone_tflite, p.temperature.x))
    return temperature_record(z, p.temperature.labels, p.head.activation, p.temperature.source, "tflite")


# --- write -----------------------------------------------------------------------------------------------

def write(st: Staging, p: Prepared, c: Converted, report: Dict[str, Any], calibration: Optional[Dict[str, Any]],
          opts: ExportOptions) -> Bundle:
    """The manifest, built from the bundle dataclasses; the staging folder becomes the bundle."""
    extra: Dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "producer": _producer(),
        "parity": "parity.json",
    }
    if p.test.labels is not None:
        extra["accuracy"] = {
            "data": p.test.source, "samples": int(len(p.test.x)),
            "float": report["float"]["top1_accuracy"],
            "int8_tflite": report["int8"]["tflite"]["top1_accuracy"],
            "int8_onnx": report["int8"]["onnx"]["top1_accuracy"],
        }
    extra.update(opts.extra_manifest)
    bundle = Bundle(path=st.path, name=p.title, classes=p.classes, input=InputSpec(shape=p.shape, preprocess=p.spec),
                    backbone_tflite=c.backbone_tflite, backbone_onnx=c.backbone_onnx, split_layer=p.split.split_layer,
                    head=c.head, decision=p.decision, calibration=calibration, extra=extra, key_order=_KEY_ORDER)
    return st.commit(bundle)


def _producer() -> Dict[str, str]:
    versions = {"edge_quq_export": __version__}
    for mod in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return versions
