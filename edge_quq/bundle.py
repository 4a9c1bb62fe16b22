"""The artifact bundle: the contract between the host-side exporter and the on-device runtime.

A bundle is a folder holding `manifest.json` and the files it names. The manifest is versioned
(`schema_version`); a runtime refuses a newer major schema, a file whose size or sha256 differs from the
manifest, and a manifest missing a required field, each with one line naming the file and the problem.
docs/bundle-format.md describes every field; this module is the only reader and the writer's checker.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from edge_quq.defaults import DECISION_DEFAULTS
from edge_quq.errors import BundleError

FORMAT_NAME = "edge-quq-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Where the embedded default bundle lives inside the installed package.
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "data" / "default_bundle"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class QuantParams:
    """Affine int8/uint8 quantization: real = scale * (q - zero_point)."""

    dtype: str  # "int8" | "uint8" | "float32"
    scale: float = 1.0
    zero_point: int = 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "QuantParams":
        dtype = _req(d, "dtype", where)
        if dtype not in ("int8", "uint8", "float32"):
            raise BundleError(f"{where}: dtype {dtype!r} is not one of int8, uint8, float32")
        return cls(dtype=dtype, scale=float(d.get("scale", 1.0)), zero_point=int(d.get("zero_point", 0)))

    def to_json(self) -> Dict[str, Any]:
        if self.dtype == "float32":  # scale and zero point mean nothing on a float tensor
            return {"dtype": self.dtype}
        return {"dtype": self.dtype, "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes the model's float input, before input quantization.

    value = (pixel * pixel_scale - mean[c]) / std[c], where `pixel` is on the 0..255 scale
    (16-bit images are divided by 257 first), after color conversion to `color`, an optional center crop
    to `crop_fraction` of the shorter side, and a resize to the input height and width.
    """

    color: str  # "gray" | "rgb" | "bgr"
    resize: Tuple[int, int]  # (height, width)
    interpolation: str = "area"  # "area" | "linear" | "nearest" | "cubic"
    crop_fraction: float = 1.0  # 1.0 = no crop
    pixel_scale: float = 1.0 / 255.0
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Preprocess":
        where = "manifest input.preprocess"
        color = _req(d, "color", where)
        if color not in ("gray", "rgb", "bgr"):
            raise BundleError(f"{where}: color {color!r} is not one of gray, rgb, bgr")
        interp = d.get("interpolation", "area")
        if interp not in ("area", "linear", "nearest", "cubic"):
            raise BundleError(f"{where}: interpolation {interp!r} is not one of area, linear, nearest, cubic")
        resize = tuple(int(v) for v in _req(d, "resize", where))
        if len(resize) != 2 or min(resize) < 1:
            raise BundleError(f"{where}: resize must be [height, width], got {list(resize)}")
        crop = float(d.get("crop_fraction", 1.0))
        if not 0.0 < crop <= 1.0:
            raise BundleError(f"{where}: crop_fraction must be in (0, 1], got {crop}")
        channels = 1 if color == "gray" else 3
        mean = tuple(float(v) for v in d.get("mean", [0.0] * channels))
        std = tuple(float(v) for v in d.get("std", [1.0] * channels))
        if len(mean) not in (1, channels) or len(std) not in (1, channels) or any(s == 0 for s in std):
            raise BundleError(f"{where}: mean/std must have 1 or {channels} non-zero entries")
        return cls(
            color=color,
            resize=(resize[0], resize[1]),
            interpolation=interp,
            crop_fraction=crop,
            pixel_scale=float(d.get("pixel_scale", 1.0 / 255.0)),
            mean=mean,
            std=std,
        )

    def to_json(self) -> Dict[str, Any]:
        return {
            "color": self.color,
            "resize": list(self.resize),
            "interpolation": self.interpolation,
            "crop_fraction": self.crop_fraction,
            "pixel_scale": self.pixel_scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3


# How the backbone takes its input batch: NHWC (Keras, TFLite) or NCHW (PyTorch, most ONNX classifiers).
LAYOUTS = ("NHWC", "NCHW")


@dataclass(frozen=True)
class InputSpec:
    # (height, width, channels), batch excluded, whatever the layout: the preprocess makes [H, W, C] images
    # and the backends transpose a batch to `layout` just before the model runs.
    shape: Tuple[int, int, int]
    preprocess: Preprocess
    layout: str = "NHWC"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "InputSpec":
        shape = tuple(int(v) for v in _req(d, "shape", f"{where} input"))
        if len(shape) != 3:
            raise BundleError(f"{where}: input.shape must be [height, width, channels], got {list(shape)}")
        pre = Preprocess.from_json(_req(d, "preprocess", f"{where} input"))
        if pre.channels != shape[2] or tuple(pre.resize) != shape[:2]:
            raise BundleError(
                f"{where}: input.preprocess ({pre.color}, resize {list(pre.resize)}) does not match input.shape {list(shape)}"
            )
        spec = cls(shape=(shape[0], shape[1], shape[2]), preprocess=pre, layout=d.get("layout", "NHWC"))
        if spec.layout not in LAYOUTS:
            raise BundleError(f"{where}: input.layout {spec.layout!r} is not one of {', '.join(LAYOUTS)}")
        return spec

    def to_json(self) -> Dict[str, Any]:
        return {"shape": list(self.shape), "layout": self.layout, "preprocess": self.preprocess.to_json()}


@dataclass(frozen=True)
class ModelFile:
    """One runtime model file and the quantization of its (single) input and output."""

    file: str
    input: QuantParams
    output: QuantParams
    input_name: Optional[str] = None
    output_name: Optional[str] = None

    @classmethod
    def from_json(cls, d: Optional[Mapping[str, Any]], where: str) -> Optional["ModelFile"]:
        if d is None:
            return None
        return cls(
            file=str(_req(d, "file", where)),
            input=QuantParams.from_json(_req(d, "input", where), f"{where}.input"),
            output=QuantParams.from_json(_req(d, "output", where), f"{where}.output"),
            input_name=d.get("input_name"),
            output_name=d.get("output_name"),
        )

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"file": self.file, "input": self.input.to_json(), "output": self.output.to_json()}
        if self.input_name is not None:
            d["input_name"] = self.input_name
        if self.output_name is not None:
            d["output_name"] = self.output_name
        return d


@dataclass(frozen=True)
class HeadLayer:
    """One block of the droppable head: dropout (rate may be 0), then a dense layer."""

    name: str  # key prefix in the weights file: <name>/kernel [in, out], <name>/bias [out]
    dropout: float
    units: int
    activation: str  # "relu" for hidden layers; "sigmoid" | "softmax" | "linear" for the last

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "HeadLayer":
        rate = float(d.get("dropout", 0.0)) if isinstance(d, Mapping) else 0.0
        if not 0.0 <= rate < 1.0:
            raise BundleError(f"{where}: dropout rate {rate} is not in [0, 1)")
        return cls(name=str(_req(d, "name", where)), dropout=rate, units=int(_req(d, "units", where)),
                   activation=str(_req(d, "activation", where)))

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "dropout": self.dropout, "units": self.units, "activation": self.activation}


# Hidden head activations by their manifest names (edge_quq.head.hidden_activation defines them).
HIDDEN_ACTIVATIONS = ("relu", "hardswish", "silu", "gelu")

# Keys of `head` the runtime reads; any other key (the exporter's `keras_layers`, `dropout_source`) is kept
# in HeadSpec.extra so that rewriting a manifest loses nothing.
_HEAD_KEYS = ("weights", "feature_size", "layers", "tflite", "onnx", "tflite_int8", "mask_inputs")


@dataclass(frozen=True)
class HeadSpec:
    weights: str  # .npz file, numpy-loadable without pickle
    layers: Tuple[HeadLayer, ...]
    feature_size: int
    # Exported head models taking features [T, F] and one keep mask per dropout layer ([T, in_i], values
    # 0/1; the model applies the 1/(1-p) scaling), outputting logits and probabilities [T, C].
    tflite: Optional[str] = None
    onnx: Optional[str] = None
    tflite_int8: Optional[str] = None
    mask_inputs: Tuple[str, ...] = ()
    extra: Dict[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "HeadSpec":
        layers = tuple(HeadLayer.from_json(ld, f"{where} head.layers[{i}]")
                       for i, ld in enumerate(_req(d, "layers", f"{where} head")))
        if not layers:
            raise BundleError(f"{where}: head.layers is empty")
        for hl in layers[:-1]:
            if hl.activation not in HIDDEN_ACTIVATIONS:
                raise BundleError(f"{where}: hidden head layer {hl.name!r} has activation {hl.activation!r}; "
                                  f"one of {', '.join(HIDDEN_ACTIVATIONS)} is supported")
        if layers[-1].activation not in ("sigmoid", "softmax", "linear"):
            raise BundleError(f"{where}: output activation {layers[-1].activation!r} is not sigmoid, softmax or linear")
        return cls(
            weights=str(_req(d, "weights", f"{where} head")),
            layers=layers,
            feature_size=int(_req(d, "feature_size", f"{where} head")),
            tflite=d.get("tflite"),
            onnx=d.get("onnx"),
            tflite_int8=d.get("tflite_int8"),
            mask_inputs=tuple(d.get("mask_inputs", ())),
            extra={k: copy.deepcopy(v) for k, v in d.items() if k not in _HEAD_KEYS},
        )

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"weights": self.weights, "feature_size": self.feature_size,
                             "layers": [hl.to_json() for hl in self.layers]}
        for key in ("tflite", "onnx", "tflite_int8"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.mask_inputs:
            d["mask_inputs"] = list(self.mask_inputs)
        return _merge_extra(d, self.extra, "head")

    @property
    def files(self) -> List[str]:
        return [self.weights] + [f for f in (self.tflite, self.onnx, self.tflite_int8) if f]

    @property
    def output_activation(self) -> str:
        return self.layers[-1].activation

    @property
    def num_classes(self) -> int:
        return self.layers[-1].units


@dataclass(frozen=True)
class DecisionDefaults:
    threshold: float = float(DECISION_DEFAULTS["threshold"])  # type: ignore[arg-type]
    num_iter: int = int(DECISION_DEFAULTS["num_iter"])  # type: ignore[call-overload]
    z: float = float(DECISION_DEFAULTS["z"])  # type: ignore[arg-type]
    mixed: str = str(DECISION_DEFAULTS["mixed"])

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DecisionDefaults":
        base = cls()
        return cls(
            threshold=float(d.get("threshold", base.threshold)),
            num_iter=int(d.get("num_iter", base.num_iter)),
            z=float(d.get("z", base.z)),
            mixed=str(d.get("mixed", base.mixed)),
        )

    def to_json(self) -> Dict[str, Any]:
        return {"threshold": self.threshold, "num_iter": self.num_iter, "z": self.z, "mixed": self.mixed}


# Top-level keys the runtime reads; any other (`created`, `producer`, `accuracy`, `parity`, `training`,
# `detectors`, ...) is kept in Bundle.extra and written back unchanged.
_TOP_KEYS = ("format", "schema_version", "name", "classes", "input", "backbone", "head", "decision", "calibration", "files")


@dataclass
class Bundle:
    """A parsed manifest. `to_json()` is the exact inverse of `parse_manifest`: parse(b.to_json()) == b.

    `manifest` is that JSON (a fresh copy each time); the exporter builds a Bundle and writes it through
    `write_manifest`, so the format name and schema version live only in this module.
    """

    path: Path
    name: str
    classes: Tuple[str, ...]
    input: InputSpec
    backbone_tflite: Optional[ModelFile]
    backbone_onnx: Optional[ModelFile]
    split_layer: str
    head: HeadSpec
    decision: DecisionDefaults = field(default_factory=DecisionDefaults)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Post-hoc temperature scaling: {"temperature": T, ...how it was fitted}; None: no temperature (T = 1).
    calibration: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Top-level key order of the manifest read, so that a rewrite (set-temperature, detectors) keeps the
    # file's layout and its diff small.
    key_order: Tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def temperature(self) -> float:
        """The runtime divides the head's logits by it before sigmoid/softmax (1 = none)."""
        return 1.0 if self.calibration is None else float(self.calibration.get("temperature", 1.0))

    @property
    def manifest(self) -> Dict[str, Any]:
        return self.to_json()

    def to_json(self) -> Dict[str, Any]:
        backbone: Dict[str, Any] = {}
        if self.split_layer:
            backbone["split_layer"] = self.split_layer
        for key, mf in (("tflite", self.backbone_tflite), ("onnx", self.backbone_onnx)):
            if mf is not None:
                backbone[key] = mf.to_json()
        d: Dict[str, Any] = {
            "format": FORMAT_NAME, "schema_version": self.schema_version, "name": self.name,
            "classes": list(self.classes), "input": self.input.to_json(), "backbone": backbone,
            "head": self.head.to_json(), "decision": self.decision.to_json(),
        }
        if self.calibration is not None:
            d["calibration"] = copy.deepcopy(self.calibration)
        d = _merge_extra(d, self.extra, "manifest")
        d["files"] = copy.deepcopy(self.files)
        order = [k for k in self.key_order if k in d]
        return {**{k: d[k] for k in order}, **{k: v for k, v in d.items() if k not in order}}

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def total_bytes(self) -> int:
        return sum(int(v.get("bytes", 0)) for v in self.files.values())


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise BundleError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise BundleError(f"{where}: missing required field {key!r}")
    return d[key]


def _merge_extra(d: Dict[str, Any], extra: Mapping[str, Any], where: str) -> Dict[str, Any]:
    clash = sorted(set(d) & set(extra))
    if clash:
        raise ValueError(f"{where} extra keys {clash} would overwrite fields the runtime reads")
    return {**d, **copy.deepcopy(dict(extra))}


def parse_temperature(manifest: Mapping[str, Any], where: str) -> float:
    """`calibration.temperature` (optional; absent means 1): a finite number > 0."""
    cal = manifest.get("calibration")
    if cal is None:
        return 1.0
    if not isinstance(cal, Mapping):
        raise BundleError(f"{where}: calibration must be an object, got {type(cal).__name__}")
    t = cal.get("temperature", 1.0)
    # bool is an int in Python; true/false here is a mistake, not a temperature.
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(float(t)) or float(t) <= 0.0:
        raise BundleError(f"{where}: calibration.temperature must be a finite number > 0, got {t!r}")
    return float(t)


def _schema_version(manifest: Mapping[str, Any], where: str) -> int:
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{where}: not an edge-quq bundle manifest (format is {manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{where}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema version {version} is newer than this edge-quq supports "
            f"({SCHEMA_VERSION}); upgrade edge-quq"
        )
    if version < 1:
        raise BundleError(f"{where}: schema_version {version} is invalid")
    return version


def parse_manifest(manifest: Mapping[str, Any], path: Path) -> Bundle:
    """Build a Bundle from a manifest dict, checking schema and internal consistency (not files)."""
    where = f"{path / MANIFEST_NAME}"
    version = _schema_version(manifest, where)
    classes = tuple(str(c) for c in _req(manifest, "classes", where))
    if len(classes) < 1:
        raise BundleError(f"{where}: classes is empty")
    input_spec = InputSpec.from_json(_req(manifest, "input", where), where)
    bb = _req(manifest, "backbone", where)
    tfl = ModelFile.from_json(bb.get("tflite"), f"{where} backbone.tflite")
    onx = ModelFile.from_json(bb.get("onnx"), f"{where} backbone.onnx")
    if tfl is None and onx is None:
        raise BundleError(f"{where}: backbone names neither a tflite nor an onnx model")
    head = HeadSpec.from_json(_req(manifest, "head", where), where)
    if head.num_classes != len(classes):
        raise BundleError(f"{where}: head outputs {head.num_classes} classes but classes lists {len(classes)}")
    temperature = parse_temperature(manifest, where)
    if temperature != 1.0 and head.output_activation == "linear":
        raise BundleError(f"{where}: calibration.temperature {temperature:g} needs a sigmoid or softmax head; this head is linear")
    files = _req(manifest, "files", where)
    if not isinstance(files, Mapping) or not files:
        raise BundleError(f"{where}: files must be a non-empty object of name -> {{sha256, bytes}}")
    for n in [m.file for m in (tfl, onx) if m is not None] + head.files:
        if n not in files:
            raise BundleError(f"{where}: file {n!r} is used but has no checksum entry in files")
    cal = manifest.get("calibration")
    return Bundle(
        path=path,
        name=str(manifest.get("name", path.name)),
        classes=classes,
        input=input_spec,
        backbone_tflite=tfl,
        backbone_onnx=onx,
        split_layer=str(bb.get("split_layer", "")),
        head=head,
        decision=DecisionDefaults.from_json(manifest.get("decision", {})),
        files={str(k): dict(v) for k, v in files.items()},
        calibration=None if cal is None else copy.deepcopy(dict(cal)),
        extra={k: copy.deepcopy(v) for k, v in manifest.items() if k not in _TOP_KEYS},
        schema_version=version,
        key_order=tuple(manifest),
    )


def verify_files(bundle: Bundle) -> None:
    """Check every file named in the manifest exists with the recorded size and sha256."""
    for name, entry in bundle.files.items():
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise BundleError(f"{bundle.path}: manifest file name {name!r} points outside the bundle")
        p = bundle.path / name
        if not p.is_file():
            raise BundleError(f"{p}: file named in the manifest is missing")
        size = p.stat().st_size
        if "bytes" in entry and int(entry["bytes"]) != size:
            raise BundleError(f"{p}: size {size} bytes does not match the manifest ({entry['bytes']} bytes); truncated or replaced")
        want = entry.get("sha256")
        if not want:
            raise BundleError(f"{p}: manifest has no sha256 for this file")
        got = sha256_file(p)
        if got != want:
            raise BundleError(f"{p}: sha256 mismatch (manifest {want[:12]}…, file {got[:12]}…); the bundle was modified or corrupted")


def load_bundle(path: Optional[os.PathLike] = None, verify: bool = True) -> Bundle:
    """Load and (by default) verify a bundle folder; None means the embedded default bundle."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    if not root.exists():
        raise BundleError(f"{root}: bundle folder does not exist")
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: manifest must be a JSON object")
    bundle = parse_manifest(manifest, root)
    if verify:
        verify_files(bundle)
    return bundle


def file_entries(folder: Path, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Checksum entries for the writer: {name: {sha256, bytes}}."""
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def _replace_manifest_file(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write manifest.json through a temporary file and a rename, so a reader never sees half of it."""
    mpath = folder / MANIFEST_NAME
    tmp = mpath.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, mpath)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_manifest(folder: Path, bundle: Bundle) -> Bundle:
    """Write `bundle` as manifest.json into `folder`; check it reads back as the same bundle and verifies
    (the writer's self-check)."""
    manifest = bundle.to_json()
    parse_manifest(manifest, Path(folder))  # a manifest the reader would refuse is never written
    _replace_manifest_file(Path(folder), manifest)
    loaded = load_bundle(folder, verify=True)
    # Compared as JSON text: NaN in a recorded metric is equal to itself there.
    if json.dumps(loaded.to_json(), sort_keys=True) != json.dumps(manifest, sort_keys=True):
        raise BundleError(f"{folder / MANIFEST_NAME}: the manifest does not read back as the bundle that was written")
    return loaded


def set_calibration(path: os.PathLike, calibration: Optional[Mapping[str, Any]]) -> Bundle:
    """Replace the `calibration` object of an existing bundle's manifest (None removes it), atomically.

    The manifest is not among the checksummed files, so only manifest.json changes; the bundle is verified
    before and after, and a value the reader would refuse is never written.
    """
    bundle = load_bundle(path, verify=True)
    return write_manifest(bundle.path, replace(bundle, calibration=None if calibration is None else dict(calibration)))


def bundle_summary(bundle: Bundle) -> List[Tuple[str, str]]:
    """Rows for `edge-quq info`."""
    rows = [
        ("bundle", str(bundle.path)),
        ("name", bundle.name),
        ("schema", f"{FORMAT_NAME} v{bundle.schema_version}"),
        ("classes", f"{bundle.num_classes}: " + ", ".join(bundle.classes)),
        ("input", f"{bundle.input.shape[0]}x{bundle.input.shape[1]}x{bundle.input.shape[2]} {bundle.input.layout}, "
                  f"{bundle.input.preprocess.color}, pixel_scale {bundle.input.preprocess.pixel_scale:.6g}, "
                  f"mean {list(bundle.input.preprocess.mean)}, std {list(bundle.input.preprocess.std)}"),
        ("split layer", bundle.split_layer or "-"),
        ("feature size", str(bundle.head.feature_size)),
        ("head", " -> ".join(f"dropout {l.dropout:g} / dense {l.units} {l.activation}" for l in bundle.head.layers)),
    ]
    for label, mf in (("backbone tflite", bundle.backbone_tflite), ("backbone onnx", bundle.backbone_onnx)):
        if mf is not None:
            size = bundle.files.get(mf.file, {}).get("bytes", 0)
            rows.append((label, f"{mf.file} ({size / 1024:.1f} KiB), in {mf.input.dtype} scale {mf.input.scale:.6g} "
                                f"zp {mf.input.zero_point}, out {mf.output.dtype} scale {mf.output.scale:.6g} zp {mf.output.zero_point}"))
    if bundle.backbone_tflite is None:  # ONNX-only bundles (from ONNX/PyTorch models) say why
        rows.append(("backbone tflite", "none: " + str(bundle.extra.get("backbone_note", "this bundle is ONNX-only"))))
    for label, f in (("head tflite", bundle.head.tflite), ("head onnx", bundle.head.onnx), ("head tflite int8", bundle.head.tflite_int8)):
        if f:
            rows.append((label, f))
    if bundle.temperature != 1.0:
        rows.append(("temperature", f"{bundle.temperature:.4g} (head logits are divided by it before {bundle.head.output_activation})"))
    det = bundle.extra.get("detectors")
    if isinstance(det, Mapping):
        size = bundle.files.get(str(det.get("file")), {}).get("bytes", 0)
        rows.append(("detectors", f"{', '.join(det.get('names', []))} ({det.get('file')}, {size / 1024:.1f} KiB; thresholds at ID TPR {det.get('tpr')})"))
    d = bundle.decision
    rows.append(("decision defaults", f"threshold {d.threshold}, num_iter {d.num_iter}, z {d.z}, mixed {d.mixed}"))
    rows.append(("total size", f"{bundle.total_bytes() / 1024:.1f} KiB in {len(bundle.files)} files"))
    return rows
