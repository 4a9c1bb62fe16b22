"""The detectors file of a bundle: reading it with its staleness checks, and adding it to a bundle.

The manifest's optional `detectors` object names the file (an npz without pickle, checksummed in `files`
like every other file) and records what it was fitted for: the feature size and the sha256 of the backbone
models and of the head weights. The file's own meta record repeats them, so a detectors file copied from
another bundle, or left behind when the backbone was re-exported, is refused with one line naming the
mismatch instead of silently scoring features it was never fitted on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from edge_quq.bundle import MANIFEST_NAME, Bundle, load_bundle, manifest_text, sha256_file
from edge_quq.detectors import _WHITENERS as WHITENERS, FILE_VERSION, DetectorSet
from edge_quq.errors import BundleError
from edge_quq.gradients import CLASS_WEIGHTINGS
from edge_quq.head import read_npz
from edge_quq.result import json_safe

DETECTORS_FILE = "detectors.npz"
REFIT_HINT = "refit with `edge-quq fit-detectors BUNDLE --data ...`"


def fitted_for(bundle: Bundle) -> Dict[str, Any]:
    """What a detectors file must have been fitted for to be used with this bundle."""
    backbone = {}
    for kind, mf in (("tflite", bundle.backbone_tflite), ("onnx", bundle.backbone_onnx)):
        if mf is not None:
            backbone[kind] = bundle.files[mf.file]["sha256"]
    return {"feature_size": bundle.head.feature_size, "backbone_sha256": backbone,
            "head_sha256": bundle.files[bundle.head.weights]["sha256"]}


def write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Write a compressed npz and flush it to disk; returns its checksum entry {sha256, bytes}."""
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def load_detectors(bundle: Bundle) -> Optional[DetectorSet]:
    """The bundle's fitted detectors, or None when its manifest has none. Raises BundleError when stale."""
    entry = bundle.manifest.get("detectors")
    if entry is None:
        return None
    where = str(bundle.path / MANIFEST_NAME)
    if not isinstance(entry, dict) or "file" not in entry:
        raise BundleError(f"{where}: detectors must be an object with a 'file' field")
    name = str(entry["file"])
    if name not in bundle.files:
        raise BundleError(f"{where}: detectors file {name!r} has no checksum entry in files")
    version = entry.get("version")
    if not isinstance(version, int) or not 1 <= version <= FILE_VERSION:
        raise BundleError(f"{where}: detectors version {version!r} is not supported (this edge-quq reads 1..{FILE_VERSION}); upgrade edge-quq or {REFIT_HINT}")
    path = bundle.path / name
    dset = DetectorSet.from_arrays(read_npz(path, "detectors"), str(path))
    want = fitted_for(bundle)
    for source, rec in (("manifest", entry), ("file", dset.meta)):
        if not isinstance(rec.get("backbone_sha256", {}), dict):
            raise BundleError(f"{path}: detectors {source} record: backbone_sha256 must be an object")
        got_fs = rec.get("feature_size")
        if got_fs != want["feature_size"]:
            raise BundleError(f"{path}: detectors were fitted for {got_fs} features ({source} record) but the head takes {want['feature_size']}; {REFIT_HINT}")
        got_bb = rec.get("backbone_sha256", {})
        for kind, sha in want["backbone_sha256"].items():
            if got_bb.get(kind) != sha:
                have = str(got_bb.get(kind))[:12]
                raise BundleError(f"{path}: detectors were fitted for another {kind} backbone (sha256 {have}…, {source} record; "
                                  f"the bundle's is {sha[:12]}…): stale or copied from another bundle; {REFIT_HINT}")
        if rec.get("head_sha256") != want["head_sha256"]:
            raise BundleError(f"{path}: detectors were fitted for other head weights ({source} record); {REFIT_HINT}")
    check_arrays(dset, bundle.head.feature_size, bundle.num_classes, str(path))
    return dset


# The arrays each detector scores with, by shape: F features, C classes, "n" any count >= 1. A file whose
# arrays differ would fail deep inside a matmul on the first frame, or score garbage; it is refused at load.
ARRAY_SHAPES: Dict[str, Dict[str, Tuple[Any, ...]]] = {
    "react": {"clip": (1,)},
    "mahalanobis": {"whitener": ("F", "F"), "means_w": ("C", "F")},
    "rel_mahalanobis": {"whitener": ("F", "F"), "means_w": ("C", "F"), "whitener0": ("F", "F"), "mean0_w": (1, "F")},
    # detectors file version 4: the background as a low-rank term on the class whitener (detectors._background)
    "rel_mahalanobis/low_rank": {"whitener": ("F", "F"), "means_w": ("C", "F"), "between_w": ("F", "n"), "mean0_w": (1, "F")},
    "knn": {"bank": ("n", "F")},
    "vim": {"origin": ("F",), "null_space": ("F", "n"), "alpha": (1,)},
}
# A class absent from the fit data has no mean (NaN row, never the nearest); nothing else may be non-finite.
MAY_HOLD_NAN = {"means_w"}
# An int8 whitener (edge_quq.detectors.quantize_whitener) comes with its per-row scales and its diagonal.
INT8_WHITENER_PARTS = {"_scale": ("F",), "_diag": ("F",)}


def check_arrays(dset: DetectorSet, feature_size: int, num_classes: int, where: str) -> None:
    """Refuse detector arrays of the wrong shape or with non-finite values, and configs the scores cannot use."""
    sizes = {"F": feature_size, "C": num_classes}
    for name, det in dset.detectors.items():
        low_rank = name == "rel_mahalanobis" and "between_w" in det.arrays
        shapes = dict(ARRAY_SHAPES.get(name + "/low_rank" if low_rank else name, {}))
        for key in [k for k in shapes if k in WHITENERS and det.arrays.get(k) is not None and det.arrays[k].dtype == np.int8]:
            shapes.update({key + part: shape for part, shape in INT8_WHITENER_PARTS.items()})
        for key, shape in shapes.items():
            a = det.arrays.get(key)
            want = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in shape)
            ok = a is not None and a.ndim == len(want) and all(
                w == "n" and g >= 1 or g == w for g, w in zip(a.shape, want))
            if not ok:
                got = "missing" if a is None else f"shape {a.shape}"
                raise BundleError(f"{where}: detector {name!r} array {key!r} is {got}, expected {want}; {REFIT_HINT}")
            bad = np.isinf(a) if key in MAY_HOLD_NAN else ~np.isfinite(a)
            if bad.any():
                raise BundleError(f"{where}: detector {name!r} array {key!r} holds non-finite values; {REFIT_HINT}")
            if key.endswith("_scale") and not (a > 0).all():
                raise BundleError(f"{where}: detector {name!r} array {key!r} holds scales <= 0; {REFIT_HINT}")
        _check_config(name, det.config, where)


def _check_config(name: str, cfg: Dict[str, Any], where: str) -> None:
    if name == "knn":
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BundleError(f"{where}: detector 'knn' config k must be an integer >= 1, got {k!r}")
    if name == "gradient":
        base, weighting = cfg.get("layer_base"), cfg.get("class_weighting")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not np.isfinite(base) or base <= 0 \
                or weighting not in CLASS_WEIGHTINGS:
            raise BundleError(f"{where}: detector 'gradient' config needs a finite layer_base > 0 and class_weighting "
                              f"in {', '.join(CLASS_WEIGHTINGS)}, got {base!r}, {weighting!r}")


def attach_detectors(bundle_path: os.PathLike, dset: DetectorSet, fit_info: Optional[Dict[str, Any]] = None) -> Bundle:
    """Write `dset` into an existing bundle as detectors.npz and record it in the manifest.

    The bundle is verified first. The npz is written to a temporary name and moved into place, then the
    manifest is replaced atomically; the result is loaded back (checksums and staleness checks) before
    returning. A failure before the manifest swap leaves the old bundle as it was.
    """
    bundle = load_bundle(bundle_path, verify=True)
    want = fitted_for(bundle)
    dset.meta.update(want)
    if fit_info:
        dset.meta["fit"] = dict(fit_info)
    root = bundle.path
    tmp_npz = root / f".{DETECTORS_FILE}.tmp-{os.getpid()}"
    tmp_man = root / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    try:
        write_npz(tmp_npz, dset.to_arrays())
        manifest = dict(bundle.manifest)
        # calibration data made with the old detectors no longer fits them: it goes (fit-detectors remakes it)
        stale_gate = manifest.pop("gate", None)
        files = dict(manifest["files"])
        if isinstance(stale_gate, dict):
            files.pop(str(stale_gate.get("file")), None)
        files[DETECTORS_FILE] = {"sha256": sha256_file(tmp_npz), "bytes": tmp_npz.stat().st_size}
        manifest["files"] = files
        manifest["detectors"] = dict(want, file=DETECTORS_FILE, version=dset.file_version(), names=dset.names,
                                     thresholds={n: d.threshold for n, d in dset.detectors.items()},
                                     tpr=dset.meta.get("tpr"))
        tmp_man.write_text(manifest_text(json_safe(manifest)), encoding="utf-8")
        os.replace(tmp_npz, root / DETECTORS_FILE)
        os.replace(tmp_man, root / MANIFEST_NAME)
    finally:
        for t in (tmp_npz, tmp_man):
            if t.exists():
                t.unlink()
    out = load_bundle(root, verify=True)
    load_detectors(out)
    return out
