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
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from edge_quq.defaults import COMBINE_RULES, DECISION_DEFAULTS, GATE_DEFAULTS, MAX_NUM_ITER, MIXED_POLICIES, POLICIES, RISK_SCORES
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


# -- validation ------------------------------------------------------------------------------------------
# Every value the runtime reads goes through one of these checks in from_json, so a wrong type, a missing
# key or a non-finite or out-of-range number is one BundleError line naming the field, never a traceback
# from int("abc") or a silent decision on a scale of 0. The checks return the value unchanged (or as the
# type the dataclass holds), so to_json stays the exact inverse of from_json.
_MISSING = object()
# Upper bounds that no real model reaches but that keep a typo from allocating gigabytes.
MAX_SIDE = 1 << 15
MAX_UNITS = 1 << 20


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"{v!r}"
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else "a long string"
    return "an array" if isinstance(v, (list, tuple)) else ("an object" if isinstance(v, Mapping) else type(v).__name__)


def _bad(where: str, name: str, what: str, v: Any) -> BundleError:
    return BundleError(f"{where}: {name} must be {what}, got {_json_type(v)}")


def _field(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
    if not isinstance(d, Mapping):
        raise BundleError(f"{where}: expected an object, got {_json_type(d)}")
    if key not in d:
        if default is _MISSING:
            raise BundleError(f"{where}: missing required field {key!r}")
        return default
    return d[key]


def _int(v: Any, where: str, name: str, lo: int, hi: Optional[int] = None) -> int:
    # bool is an int in Python; `true` in a manifest is a mistake, not 1.
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise _bad(where, name, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]", v)
    return v


def _num(v: Any, where: str, name: str, lo: float = -math.inf, hi: float = math.inf,
         lo_open: bool = False, hi_open: bool = False) -> float:
    # abs() first: float() of a 400-digit integer overflows instead of answering.
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and abs(v) < 1e300
    if ok:
        x = float(v)
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise _bad(where, name, "a finite number" + ("" if (lo, hi) == (-math.inf, math.inf) else f" in {rng}"), v)
    return float(v)


def _str(v: Any, where: str, name: str, choices: Optional[Sequence[str]] = None) -> str:
    if not isinstance(v, str) or not v or (choices is not None and v not in choices):
        raise _bad(where, name, f"one of {', '.join(choices)}" if choices else "a non-empty string", v)
    return v


def _text(v: Any, where: str, name: str) -> str:
    """A string that may be empty (names shown to people, not looked up)."""
    if not isinstance(v, str):
        raise _bad(where, name, "a string", v)
    return v


def _opt_str(v: Any, where: str, name: str) -> Optional[str]:
    return None if v is None else _str(v, where, name)


def _list(v: Any, where: str, name: str, min_len: int = 0) -> List[Any]:
    if not isinstance(v, list) or len(v) < min_len:
        raise _bad(where, name, "an array" + (f" of at least {min_len} entries" if min_len else ""), v)
    return v


@dataclass(frozen=True)
class QuantParams:
    """Affine int8/uint8 quantization: real = scale * (q - zero_point)."""

    dtype: str  # "int8" | "uint8" | "float32"
    scale: float = 1.0
    zero_point: int = 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "QuantParams":
        dtype = _str(_field(d, "dtype", where), where, "dtype", ("int8", "uint8", "float32"))
        lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}.get(dtype, (-2**31, 2**31 - 1))
        return cls(dtype=dtype, scale=_num(_field(d, "scale", where, 1.0), where, "scale", 0.0, lo_open=True),
                   zero_point=_int(_field(d, "zero_point", where, 0), where, "zero_point", lo, hi))

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
        color = _str(_field(d, "color", where), where, "color", ("gray", "rgb", "bgr"))
        interp = _str(_field(d, "interpolation", where, "area"), where, "interpolation", ("area", "linear", "nearest", "cubic"))
        resize = _list(_field(d, "resize", where), where, "resize")
        if len(resize) != 2:
            raise _bad(where, "resize", "[height, width]", resize)
        size = tuple(_int(v, where, "resize", 1, MAX_SIDE) for v in resize)
        crop = _num(_field(d, "crop_fraction", where, 1.0), where, "crop_fraction", 0.0, 1.0, lo_open=True)
        channels = 1 if color == "gray" else 3
        mean = tuple(_num(v, where, "mean", -1e6, 1e6) for v in _list(_field(d, "mean", where, [0.0] * channels), where, "mean"))
        # std divides: a zero or tiny std turns every pixel into inf or noise that the model decides on.
        std = tuple(_num(v, where, "std", 1e-6, 1e6) for v in _list(_field(d, "std", where, [1.0] * channels), where, "std"))
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise BundleError(f"{where}: mean/std must have 1 or {channels} entries")
        return cls(
            color=color,
            resize=(size[0], size[1]),
            interpolation=interp,
            crop_fraction=crop,
            # A pixel scale of 0 makes every image the same input: the model then "keeps" one class for all.
            pixel_scale=_num(_field(d, "pixel_scale", where, 1.0 / 255.0), where, "pixel_scale", 1e-6, 1e3),
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
        raw = _list(_field(d, "shape", f"{where} input"), where, "input.shape")
        if len(raw) != 3:
            raise _bad(where, "input.shape", "[height, width, channels]", raw)
        shape = tuple(_int(v, where, "input.shape", 1, MAX_SIDE) for v in raw)
        pre = Preprocess.from_json(_field(d, "preprocess", f"{where} input"))
        if pre.channels != shape[2] or tuple(pre.resize) != shape[:2]:
            raise BundleError(
                f"{where}: input.preprocess ({pre.color}, resize {list(pre.resize)}) does not match input.shape {list(shape)}"
            )
        spec = cls(shape=(shape[0], shape[1], shape[2]), preprocess=pre, layout=_field(d, "layout", where, "NHWC"))
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
            file=_str(_field(d, "file", where), where, "file"),
            input=QuantParams.from_json(_field(d, "input", where), f"{where}.input"),
            output=QuantParams.from_json(_field(d, "output", where), f"{where}.output"),
            input_name=_opt_str(d.get("input_name"), where, "input_name"),
            output_name=_opt_str(d.get("output_name"), where, "output_name"),
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
        rate = _num(_field(d, "dropout", where, 0.0), where, "dropout rate", 0.0, 1.0, hi_open=True)
        return cls(name=_str(_field(d, "name", where), where, "name"), dropout=rate,
                   units=_int(_field(d, "units", where), where, "units", 1, MAX_UNITS),
                   activation=_str(_field(d, "activation", where), where, "activation"))

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
        raw = _list(_field(d, "layers", f"{where} head"), where, "head.layers")
        layers = tuple(HeadLayer.from_json(ld, f"{where} head.layers[{i}]") for i, ld in enumerate(raw))
        if not layers:
            raise BundleError(f"{where}: head.layers is empty")
        for hl in layers[:-1]:
            if hl.activation not in HIDDEN_ACTIVATIONS:
                raise BundleError(f"{where}: hidden head layer {hl.name!r} has activation {hl.activation!r}; "
                                  f"one of {', '.join(HIDDEN_ACTIVATIONS)} is supported")
        if layers[-1].activation not in ("sigmoid", "softmax", "linear"):
            raise BundleError(f"{where}: output activation {layers[-1].activation!r} is not sigmoid, softmax or linear")
        return cls(
            weights=_str(_field(d, "weights", f"{where} head"), where, "head.weights"),
            layers=layers,
            feature_size=_int(_field(d, "feature_size", f"{where} head"), where, "head.feature_size", 1, MAX_UNITS),
            tflite=_opt_str(d.get("tflite"), where, "head.tflite"),
            onnx=_opt_str(d.get("onnx"), where, "head.onnx"),
            tflite_int8=_opt_str(d.get("tflite_int8"), where, "head.tflite_int8"),
            mask_inputs=tuple(_str(m, where, "head.mask_inputs[]") for m in _list(d.get("mask_inputs", []), where, "head.mask_inputs")),
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
    def from_json(cls, d: Mapping[str, Any], where: str = "manifest") -> "DecisionDefaults":
        base, w = cls(), f"{where} decision"
        return cls(
            threshold=_num(_field(d, "threshold", w, base.threshold), where, "decision.threshold", 0.0, 1.0, True, True),
            num_iter=_int(_field(d, "num_iter", w, base.num_iter), where, "decision.num_iter", 2, MAX_NUM_ITER),
            z=_num(_field(d, "z", w, base.z), where, "decision.z", 0.0, 100.0),
            mixed=_str(_field(d, "mixed", w, base.mixed), where, "decision.mixed", MIXED_POLICIES),
        )

    def to_json(self) -> Dict[str, Any]:
        return {"threshold": self.threshold, "num_iter": self.num_iter, "z": self.z, "mixed": self.mixed}


@dataclass(frozen=True)
class GateSpec:
    """The manifest's `gate` object: the calibration data file (gate.npz, edge_quq.gate_store) and the
    default decision policy it enables. `to_json` and `from_json` are exact inverses."""

    file: str
    version: int
    policy: str
    alpha: float
    delta: float
    combine: str
    detectors: Tuple[str, ...]  # the detectors the default gate combines
    risk_score: str  # the confidence score the risk threshold is chosen on
    fingerprints: Dict[str, Any] = field(default_factory=dict)  # head/backbone/detectors sha256 it was made for
    calibration: Dict[str, Any] = field(default_factory=dict)  # what data, how many samples, the seed
    validation: Dict[str, Any] = field(default_factory=dict)  # the exporter's selection table

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "GateSpec":
        if not isinstance(d, Mapping):
            raise BundleError(f"{where}: gate must be an object, got {type(d).__name__}")

        def level(key: str) -> float:
            v = d.get(key, GATE_DEFAULTS[key])
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
                raise BundleError(f"{where}: gate.{key} must be a number strictly between 0 and 1, got {v!r}")
            return float(v)

        policy = str(d.get("policy", GATE_DEFAULTS["policy"]))
        if policy not in POLICIES:
            raise BundleError(f"{where}: gate.policy {policy!r} is not one of {', '.join(POLICIES)}")
        dets = d.get("detectors")
        if not isinstance(dets, (list, tuple)) or not dets or not all(isinstance(n, str) for n in dets):
            raise BundleError(f"{where}: gate.detectors must be a non-empty list of detector names")
        w = f"{where} gate"

        def obj(key: str) -> Dict[str, Any]:
            v = d.get(key, {})
            if not isinstance(v, Mapping):
                raise _bad(w, key, "an object", v)
            return copy.deepcopy(dict(v))

        return cls(file=_str(_field(d, "file", w), w, "file"), version=_int(d.get("version", 1), w, "version", 1),
                   policy=policy, alpha=level("alpha"), delta=level("delta"),
                   combine=_str(d.get("combine", GATE_DEFAULTS["combine"]), w, "combine", COMBINE_RULES),
                   detectors=tuple(dets), risk_score=_str(d.get("risk_score", "max_prob"), w, "risk_score", RISK_SCORES),
                   fingerprints=obj("fingerprints"), calibration=obj("calibration"), validation=obj("validation"))

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "version": self.version, "policy": self.policy, "alpha": self.alpha,
                "delta": self.delta, "combine": self.combine, "detectors": list(self.detectors),
                "risk_score": self.risk_score, "fingerprints": copy.deepcopy(self.fingerprints),
                "calibration": copy.deepcopy(self.calibration), "validation": copy.deepcopy(self.validation)}


# Top-level keys the runtime reads; any other (`created`, `producer`, `accuracy`, `parity`, `training`,
# `detectors`, ...) is kept in Bundle.extra and written back unchanged.
_TOP_KEYS = ("format", "schema_version", "name", "classes", "input", "backbone", "head", "decision", "calibration", "gate", "files")


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
    # Calibration data of the OOD gate and risk control (gate.npz); None: only the `paper` policy.
    gate: Optional[GateSpec] = None
    # Top-level key order of the manifest read, so that a rewrite (set-temperature, detectors) keeps the
    # file's layout and its diff small.
    key_order: Tuple[str, ...] = field(default=(), compare=False, repr=False)
    # sha256 of manifest.json's bytes as read (no file lists it: it lists the others). `edge-quq info` shows
    # it and install.sh --bundle-sha256 pins it; "" for a bundle not read from a file.
    manifest_sha256: str = field(default="", compare=False, repr=False)

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
        if self.gate is not None:
            d["gate"] = self.gate.to_json()
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
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{where}: schema_version missing or not an integer (got {_json_type(version)})")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema version {version} is newer than this edge-quq supports "
            f"({SCHEMA_VERSION}); upgrade edge-quq"
        )
    if version < 1:
        raise BundleError(f"{where}: schema_version {version} is invalid")
    return version


def _check_files(files: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(files, Mapping) or not files:
        raise BundleError(f"{where}: files must be a non-empty object of name -> {{sha256, bytes}}")
    for name, entry in files.items():
        if not isinstance(entry, Mapping):
            raise _bad(where, f"files[{name!r}]", "an object {sha256, bytes}", entry)
        if "sha256" in entry and not (isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64):
            raise _bad(where, f"files[{name!r}].sha256", "64 hex digits", entry["sha256"])
        if "bytes" in entry:
            _int(entry["bytes"], where, f"files[{name!r}].bytes", 0)
    return files


def _check_detectors_entry(det: Any, where: str) -> None:
    """The optional `detectors` record: its shape here (info prints it); detector_store checks its meaning."""
    if det is None:
        return
    _str(_field(det, "file", f"{where} detectors"), where, "detectors.file")
    for i, n in enumerate(_list(det.get("names", []), where, "detectors.names")):
        _str(n, where, f"detectors.names[{i}]")
    thresholds = det.get("thresholds", {})
    if not isinstance(thresholds, Mapping):
        raise _bad(where, "detectors.thresholds", "an object", thresholds)
    for n, t in thresholds.items():
        if t is not None:
            _num(t, where, f"detectors.thresholds.{n}")
    if det.get("tpr") is not None:
        _num(det["tpr"], where, "detectors.tpr", 0.0, 1.0, True, True)
    if "feature_size" in det:
        _int(det["feature_size"], where, "detectors.feature_size", 1, MAX_UNITS)
    for key in ("backbone_sha256",):
        if not isinstance(det.get(key, {}), Mapping):
            raise _bad(where, f"detectors.{key}", "an object", det[key])


def parse_manifest(manifest: Mapping[str, Any], path: Path) -> Bundle:
    """Build a Bundle from a manifest dict, checking schema and internal consistency (not files)."""
    where = f"{path / MANIFEST_NAME}"
    version = _schema_version(manifest, where)
    classes = tuple(_str(c, where, "classes[]") for c in _list(_field(manifest, "classes", where), where, "classes", 1))
    input_spec = InputSpec.from_json(_field(manifest, "input", where), where)
    bb = _field(manifest, "backbone", where)
    tfl = ModelFile.from_json(_field(bb, "tflite", f"{where} backbone", None), f"{where} backbone.tflite")
    onx = ModelFile.from_json(bb.get("onnx"), f"{where} backbone.onnx")
    if tfl is None and onx is None:
        raise BundleError(f"{where}: backbone names neither a tflite nor an onnx model")
    head = HeadSpec.from_json(_field(manifest, "head", where), where)
    if head.num_classes != len(classes):
        raise BundleError(f"{where}: head outputs {head.num_classes} classes but classes lists {len(classes)}")
    temperature = parse_temperature(manifest, where)
    if temperature != 1.0 and head.output_activation == "linear":
        raise BundleError(f"{where}: calibration.temperature {temperature:g} needs a sigmoid or softmax head; this head is linear")
    files = _check_files(_field(manifest, "files", where), where)
    for n in [m.file for m in (tfl, onx) if m is not None] + head.files:
        if n not in files:
            raise BundleError(f"{where}: file {n!r} is used but has no checksum entry in files")
    _check_detectors_entry(manifest.get("detectors"), where)
    cal = manifest.get("calibration")
    gate = manifest.get("gate")
    gate_spec = None if gate is None else GateSpec.from_json(gate, where)
    if gate_spec is not None and gate_spec.file not in files:
        raise BundleError(f"{where}: gate file {gate_spec.file!r} has no checksum entry in files")
    return Bundle(
        path=path,
        name=_text(manifest.get("name", path.name), where, "name"),
        classes=classes,
        input=input_spec,
        backbone_tflite=tfl,
        backbone_onnx=onx,
        split_layer=_text(bb.get("split_layer", ""), where, "backbone.split_layer"),
        head=head,
        decision=DecisionDefaults.from_json(manifest.get("decision", {}), where),
        files={str(k): dict(v) for k, v in files.items()},
        calibration=None if cal is None else copy.deepcopy(dict(cal)),
        extra={k: copy.deepcopy(v) for k, v in manifest.items() if k not in _TOP_KEYS},
        schema_version=version,
        gate=gate_spec,
        key_order=tuple(manifest),
    )


def bundle_file(root: Path, name: str) -> Path:
    """`root/name`, refused unless it is a regular file inside the bundle folder once symlinks are resolved:
    a manifest must not make the runtime read (or install.sh copy) a file from elsewhere on the board."""
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise BundleError(f"{root}: manifest file name {name!r} points outside the bundle")
    p = root / name
    try:
        real, base = p.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, dangling link, or a symlink loop
        raise BundleError(f"{p}: file named in the manifest is missing (or a broken symlink)") from None
    if real != base and base not in real.parents:
        raise BundleError(f"{p}: is a symlink to {real}, outside the bundle folder; bundle files must be inside it")
    if not stat.S_ISREG(real.stat().st_mode):
        raise BundleError(f"{p}: not a regular file")
    return p


def verify_files(bundle: Bundle) -> None:
    """Check every file named in the manifest is a regular file inside the bundle, with the recorded size and sha256."""
    for name, entry in bundle.files.items():
        p = bundle_file(bundle.path, name)
        size = p.stat().st_size
        if "bytes" in entry and int(entry["bytes"]) != size:
            raise BundleError(f"{p}: size {size} bytes does not match the manifest ({entry['bytes']} bytes); truncated or replaced")
        want = entry.get("sha256")
        if not want:
            raise BundleError(f"{p}: manifest has no sha256 for this file")
        got = sha256_file(p)
        if got != want:
            raise BundleError(f"{p}: sha256 mismatch (manifest {want[:12]}…, file {got[:12]}…); the bundle was modified or corrupted")


def read_manifest(root: Path) -> Tuple[Dict[str, Any], str]:
    """(manifest object, sha256 of its bytes) of the bundle folder `root`."""
    if not (root / MANIFEST_NAME).exists() and not (root / MANIFEST_NAME).is_symlink():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST_NAME})")
    mpath = bundle_file(root, MANIFEST_NAME)
    data = mpath.read_bytes()
    try:
        manifest = json.loads(data.decode("utf-8"))
    # ValueError: also a JSONDecodeError, and an integer longer than Python's digit limit;
    # RecursionError: arrays nested thousands deep.
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{mpath}: manifest is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: manifest must be a JSON object")
    return manifest, hashlib.sha256(data).hexdigest()


def load_bundle(path: Optional[os.PathLike] = None, verify: bool = True) -> Bundle:
    """Load and (by default) verify a bundle folder; None means the embedded default bundle."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    if not root.exists():
        raise BundleError(f"{root}: bundle folder does not exist")
    if root.is_file() and root.name == MANIFEST_NAME:
        root = root.parent
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle folder")
    manifest, digest = read_manifest(root)
    bundle = replace(parse_manifest(manifest, root), manifest_sha256=digest)
    if verify:
        verify_files(bundle)
    return bundle


def file_entries(folder: Path, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Checksum entries for the writer: {name: {sha256, bytes}}."""
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """manifest.json's text: strict JSON (a NaN in a recorded metric is written as null; allow_nan=False
    makes any non-finite number the runtime reads, which validation refuses anyway, fail here, loudly)."""
    from edge_quq.result import dumps

    return dumps(manifest, indent=2, separators=(",", ": ")) + "\n"


def _replace_manifest_file(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write manifest.json through a temporary file and a rename, so a reader never sees half of it."""
    mpath = folder / MANIFEST_NAME
    tmp = mpath.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(manifest_text(manifest), encoding="utf-8")
        os.replace(tmp, mpath)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_manifest(folder: Path, bundle: Bundle) -> Bundle:
    """Write `bundle` as manifest.json into `folder`; check it reads back as the same bundle and verifies
    (the writer's self-check)."""
    from edge_quq.result import json_safe

    manifest = json_safe(bundle.to_json())  # what the file will hold: recorded NaN metrics become null
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
        ("manifest sha256", bundle.manifest_sha256 or "-"),
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
    rows.extend(gate_summary(bundle))
    d = bundle.decision
    rows.append(("decision defaults", f"threshold {d.threshold}, num_iter {d.num_iter}, z {d.z}, mixed {d.mixed}"))
    rows.append(("total size", f"{bundle.total_bytes() / 1024:.1f} KiB in {len(bundle.files)} files"))
    return rows


# The exporter's held-out ID figures for the whole default decision (edge_quq_export.detectors.select_gate).
WITH_RULE_RATES = {"id_ignored_with_rule": "ignored", "id_error_kept": "error among kept", "id_wrong_decisions": "wrong decisions"}


def gate_summary(bundle: Bundle) -> List[Tuple[str, str]]:
    """`edge-quq info` rows for the default policy: the gate, its level and the exporter's validation."""
    g = bundle.gate
    if g is None:
        return [("policy", "paper (no calibration data in this bundle: the gated and risk policies are unavailable)")]
    cal = g.calibration
    rows = [("policy", f"{g.policy} (default); gate alpha {g.alpha:g} over {', '.join(g.detectors)} ({g.combine}); "
                       f"risk delta {g.delta:g} on {g.risk_score}"),
            ("calibration", f"{cal.get('samples', '?')} held-out samples: {cal.get('data', '?')} ({g.file})")]
    val = g.validation
    sets = val.get("chosen", {}) if isinstance(val, Mapping) else {}
    # The validation table is the exporter's record, shown as it is: a value that is not a rate is left out.
    rates = {k: v for k, v in sets.items() if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)} \
        if isinstance(sets, Mapping) else {}
    # The id_* entries describe the whole default decision (rule plus gate) on held-out ID data, not the gate's catch.
    with_rule = {k: rates.pop(k) for k in list(rates) if k in WITH_RULE_RATES}
    if rates:
        rows.append(("gate validation", ", ".join(f"{k} {100 * float(v):.1f}%" for k, v in rates.items())
                     + " ignored by the gate (exporter's held-out data)"))
    if with_rule:
        rule_z = val.get("rule_z") if isinstance(val, Mapping) else None
        at = f", rule at z {float(rule_z):g}" if isinstance(rule_z, (int, float)) and not isinstance(rule_z, bool) else ""
        rows.append(("with the rule", ", ".join(f"{WITH_RULE_RATES[k]} {100 * float(v):.1f}%" for k, v in with_rule.items())
                     + f" (held-out ID data{at})"))
    return rows + _default_z_rows(val.get("default_z") if isinstance(val, Mapping) else None)


def _default_z_rows(zc: Any) -> List[Tuple[str, str]]:
    """The exporter's choice of the default z (edge_quq_export.detectors.choose_default_z), when it made one."""
    try:
        row = next(r for r in zc["table"] if r["z"] == zc["z"])
        text = (f"z {float(zc['z']):g} chosen on the calibration data, {zc['choice']} for error among kept <= "
                f"{100 * float(zc['error_target']):g}% at delta {float(zc['delta']):g}: {100 * float(row['error_kept']):.2f}% "
                f"(upper bound {100 * float(row['upper_bound']):.2f}%), {100 * float(row['ignored']):.2f}% ignored")
    except (TypeError, KeyError, ValueError, StopIteration):
        return []
    return [("default z", text)]

