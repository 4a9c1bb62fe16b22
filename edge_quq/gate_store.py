"""The calibration data file of a bundle (gate.npz): reading it with its checks, and adding it to a bundle.

What it holds (an npz without pickle, checksummed in the manifest's `files` like every other file):
- `cal/<detector>`: float64 [n], every fitted detector's score on n held-out in-distribution samples that
  fitted neither the model nor the detectors, in sample order (sorted at load for the p-values;
  edge_quq.conformal);
- `risk/confidence` float64 [n], `risk/correct` uint8 [n]: the confidence score the manifest names
  (`gate.risk_score`) and whether the MC-mean top class was right, for Learn-then-Test (edge_quq.risk);
- `risk/rule_keep` uint8 [n]: whether the paper's rule at the bundle's decision defaults kept the sample;
- `meta`: JSON (format, version, the fingerprints below, what data).
The manifest's `gate` object (edge_quq.bundle.GateSpec) names the file, the default policy, alpha, delta,
the gate's detectors and the exporter's validation. Both the manifest and the file record the sha256 of the
head weights, the backbones and the detectors file they were made with: calibration scores of other
detectors or another model would silently void the guarantees, so a mismatch is refused in one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from edge_quq.bundle import Bundle, DecisionDefaults, GateSpec, load_bundle, sha256_file, write_manifest
from edge_quq.detector_store import fitted_for, read_npz, write_npz
from edge_quq.conformal import CalibrationScores, gate_pvalues, sort_calibration
from edge_quq.errors import BundleError, OptionError
from edge_quq.risk import CalibrationTable

GATE_FILE = "gate.npz"
GATE_FORMAT = "edge-quq-gate"
GATE_VERSION = 1
REGATE_HINT = "recalibrate with `edge-quq fit-detectors BUNDLE --data ...`"


def gate_fingerprints(bundle: Bundle) -> Dict[str, Any]:
    """What calibration data must have been made with to be used with this bundle."""

    det = bundle.extra.get("detectors")
    det_file = det.get("file") if isinstance(det, Mapping) else None
    want = fitted_for(bundle)
    want.pop("feature_size")
    want["detectors_sha256"] = bundle.files.get(str(det_file), {}).get("sha256") if det_file else None
    return want


@dataclass(frozen=True)
class GateData:
    """The arrays of gate.npz, in calibration-sample order."""

    scores: Dict[str, np.ndarray]  # detector -> [n]
    confidence: np.ndarray  # [n], higher = more confident
    correct: np.ndarray  # [n] bool
    rule_keep: np.ndarray  # [n] bool
    meta: Dict[str, Any]

    def to_arrays(self) -> Dict[str, np.ndarray]:
        out = {f"cal/{n}": np.asarray(v, np.float64) for n, v in self.scores.items()}
        out["risk/confidence"] = np.asarray(self.confidence, np.float64)
        out["risk/correct"] = np.asarray(self.correct, np.uint8)
        out["risk/rule_keep"] = np.asarray(self.rule_keep, np.uint8)
        meta = dict(self.meta, format=GATE_FORMAT, version=GATE_VERSION)
        out["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], where: str) -> "GateData":
        try:
            meta = json.loads(bytes(np.asarray(arrays["meta"], np.uint8)).decode("utf-8"))
            scores = {k[4:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("cal/")}
            conf = np.asarray(arrays["risk/confidence"], np.float64)
            correct = np.asarray(arrays["risk/correct"]).astype(bool)
            rule_keep = np.asarray(arrays["risk/rule_keep"]).astype(bool)
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{where}: not an edge-quq calibration file ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != GATE_FORMAT:
            raise BundleError(f"{where}: not an edge-quq calibration file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != GATE_VERSION:
            raise BundleError(f"{where}: calibration file version {meta.get('version')!r} is not supported (this edge-quq reads {GATE_VERSION})")
        n = conf.size
        if n == 0 or any(v.shape != (n,) for v in list(scores.values()) + [correct, rule_keep]):
            raise BundleError(f"{where}: calibration arrays must be non-empty and of one length")
        if not all(np.all(np.isfinite(v)) for v in list(scores.values()) + [conf]):
            raise BundleError(f"{where}: calibration scores must all be finite")
        return cls(scores, conf, correct, rule_keep, meta)


@dataclass(frozen=True)
class LoadedGate:
    """A verified gate file with its manifest record, ready for the predictor."""

    spec: GateSpec
    data: GateData

    @property
    def size(self) -> int:
        return int(self.data.confidence.size)

    def calibration(self, names: Sequence[str]) -> CalibrationScores:
        missing = [n for n in names if n not in self.data.scores]
        if missing:
            raise OptionError(f"the bundle's calibration data has no scores for {', '.join(missing)}; "
                              f"it has {', '.join(self.data.scores)}")
        return sort_calibration([self.data.scores[n] for n in names])

    def risk_table(self, names: Sequence[str], alpha: float, combine_rule: str) -> CalibrationTable:
        """(confidence, correct) of the calibration samples the rule kept and the gate passed, at this alpha:
        the risk threshold is chosen among the inputs it will be applied to."""
        cal = self.calibration(names)
        cols = np.stack([self.data.scores[n] for n in names], axis=1)
        passed = gate_pvalues(cols, cal, combine_rule) >= alpha
        use = passed & self.data.rule_keep
        return CalibrationTable.build(self.data.confidence[use], self.data.correct[use])


def load_gate(bundle: Bundle) -> Optional[LoadedGate]:
    """The bundle's calibration data, or None when the manifest has no `gate`. BundleError when it does not
    match the bundle (checksum, head, backbone or detectors fingerprint)."""
    spec = bundle.gate
    if spec is None:
        return None
    path = bundle.path / spec.file
    entry = bundle.files.get(spec.file, {})
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        raise BundleError(f"{path}: calibration data missing or its sha256 does not match the manifest; {REGATE_HINT}")
    data = GateData.from_arrays(read_npz(path, "calibration data"), str(path))
    want = gate_fingerprints(bundle)
    for source, rec in (("manifest", spec.fingerprints), ("file", data.meta.get("fingerprints", {}))):
        for key, value in want.items():
            if rec.get(key) != value:
                what = key.replace("_sha256", "")
                raise BundleError(f"{path}: calibration data was made for another {what} ({source} record): "
                                  f"stale or copied from another bundle; {REGATE_HINT}")
    missing = [n for n in spec.detectors if n not in data.scores]
    if missing:
        raise BundleError(f"{path}: the gate's detectors {', '.join(missing)} have no calibration scores")
    return LoadedGate(spec, data)


def attach_gate(bundle_path: os.PathLike, data: GateData, spec: GateSpec, decision: Optional[DecisionDefaults] = None) -> Bundle:
    """Write `data` into an existing bundle as gate.npz and record `spec` in the manifest (fingerprints
    filled in here), with `decision` as the new decision defaults when given (data.rule_keep was made with them). The npz goes to a temporary name first; the manifest swap is atomic; the result is
    loaded back and checked before returning."""
    bundle = load_bundle(bundle_path, verify=True)
    fp = gate_fingerprints(bundle)
    data = replace(data, meta=dict(data.meta, fingerprints=fp))
    root = bundle.path
    tmp = root / f".{GATE_FILE}.tmp-{os.getpid()}"
    try:
        files = dict(bundle.files)
        files[GATE_FILE] = write_npz(tmp, data.to_arrays())
        os.replace(tmp, root / GATE_FILE)
        out = write_manifest(root, replace(bundle, files=files, gate=replace(spec, file=GATE_FILE, fingerprints=fp),
                                           decision=decision or bundle.decision))
    finally:
        if tmp.exists():
            tmp.unlink()
    load_gate(out)
    return out
