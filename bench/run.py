"""The benchmark suite of issue 6: paper tables, selective prediction, OOD detection, calibration; and of
issue 14: the decision policies (paper, gated, risk) with their guarantees checked, and the drift alarm.

    python -m bench.run --out bench/results/suite            # full run (Fashion-MNIST, ~15 min here)
    python -m bench.run --out /tmp/suite --quick             # minutes: small subsets, fewer bootstrap reps
    python -m bench.run --out DIR --cifar100 DIR --cifar100-bundle BUNDLE   # CIFAR-100 / CIFAR-100-C

Writes report.json, report.md and PNG figures under --out (docs/bench.md explains every table). The int8
backbone runs once per image set (the clean test set, each corrupted set, each OOD set); the head is
sampled in batch at max(T) and smaller T use the first T samples of the same draw.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = ROOT / "bench" / "models" / "reference_oe.keras"  # the float model the default bundle was exported from
E2E_REPORT = ROOT / "bench" / "results" / "e2e.json"


def machine_info() -> dict:
    import cv2
    import onnxruntime

    info = {
        "platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__,
    }
    try:
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        import ai_edge_litert

        info["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "installed")
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["edge_quq"] = version("edge-quq")
    except Exception:  # noqa: BLE001 - metadata is a nicety
        pass
    return info


def parse_severities(text: str) -> List[int]:
    try:
        sev = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        sev = []
    if not sev or any(v not in (1, 2, 3, 4, 5) for v in sev):
        raise click.UsageError(f"--severities must be comma-separated values among 1..5, got {text!r}")
    return sev


def stratified(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n samples with the classes as balanced as y allows (seeded, sorted)."""
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = n // len(classes)
    idx = [rng.permutation(np.flatnonzero(y == c))[:per] for c in classes]
    got = np.concatenate(idx)
    rest = np.setdiff1d(np.arange(len(y)), got)
    got = np.concatenate([got, rng.permutation(rest)[: n - len(got)]])
    return np.sort(got)


# --- Tables I and II ----------------------------------------------------------------------------------------

def size_table(bundle, float_model: Optional[Path]) -> dict:
    rows = []
    params = None
    if float_model is not None and float_model.is_file():
        rows.append({"model": "float32 Keras model (.keras)", "file": float_model.name, "bytes": float_model.stat().st_size})
        meta = float_model.with_suffix(".keras.json")
        if meta.is_file():
            params = json.loads(meta.read_text()).get("parameters")
        if params:
            rows.append({"model": "float32 weights (parameters x 4 bytes)", "file": "-", "bytes": int(params) * 4})
    head = bundle.file(bundle.head.weights).stat().st_size
    for kind, mf in (("TFLite", bundle.backbone_tflite), ("ONNX", bundle.backbone_onnx)):
        if mf is not None:
            bb = bundle.file(mf.file).stat().st_size
            rows.append({"model": f"int8 {kind} backbone + float32 head", "file": f"{mf.file} + {bundle.head.weights}", "bytes": bb + head,
                         "backbone_bytes": bb, "head_bytes": head})
    return {"rows": rows, "parameters": params}


def float_accuracy(float_model: Path, x_u8: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy of the float Keras model; needs TensorFlow (host side), reported as missing otherwise."""
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
    except ImportError as e:
        return {"error": f"keras/tensorflow not installed ({e})"}
    if not float_model.is_file():
        return {"error": f"{float_model}: no float model"}
    model = keras.models.load_model(float_model, compile=False)
    x = x_u8.astype(np.float32)[..., None] / 255.0
    out = model.predict(x, batch_size=500, verbose=0)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return {"accuracy": round(float(np.mean(np.argmax(out, axis=1) == y)), 4), "n": int(len(y))}


def int8_accuracy(bundle, backend: str, x_u8: np.ndarray, y: np.ndarray, threads: Optional[int]) -> dict:
    """Accuracy of the int8 backbone on one runtime + the head without dropout (argmax)."""
    from edge_quq.backends import make_backbone
    from edge_quq.errors import EdgeQuqError
    from edge_quq.head import load_head_weights
    from bench.suite.core import backbone_features

    try:
        bb = make_backbone(bundle, backend, threads)
    except EdgeQuqError as e:
        return {"error": str(e)}
    head = load_head_weights(bundle)
    probs = head.probs(backbone_features(bb, bundle, x_u8))
    return {"accuracy": round(float(np.mean(np.argmax(probs, axis=1) == y)), 4), "n": int(len(y))}


# --- the run ------------------------------------------------------------------------------------------------

class Dataset:
    """Clean test images, labels and a source of corrupted versions: name, severity -> (x, y)."""

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray, classes: List[str], corrupted, corruption_names: List[str],
                 synthetic_corruptions: bool) -> None:
        self.name, self.x, self.y, self.classes = name, x, y, classes
        self.corrupted = corrupted
        self.corruption_names = corruption_names
        self.synthetic_corruptions = synthetic_corruptions


def fashion_dataset(n_clean: int, n_corrupt: int, seed: int) -> Tuple[Dataset, np.ndarray]:
    from edge_quq_export.datasets import load_fashion_mnist
    from bench.suite.corruptions import CORRUPTIONS, corrupt

    x, y = load_fashion_mnist("test")
    keep = stratified(y, n_clean, seed)
    sub = stratified(y, n_corrupt, seed + 1)

    def corrupted(name: str, sev: int):
        return corrupt(name, x[sub], sev, seed), y[sub]

    ds = Dataset("Fashion-MNIST test", x[keep], y[keep], [], corrupted, list(CORRUPTIONS), True)
    return ds, x


def cifar_dataset(root: Path, n_clean: int, n_corrupt: int, seed: int) -> Dataset:
    from edge_quq_export.datasets import load_cifar100, load_cifar100c
    from bench.suite.corruptions import CORRUPTIONS

    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    x, y, names = load_cifar100(base, "test")
    cdir = next((p for p in (root / "CIFAR-100-C", root) if (p / "labels.npy").is_file()), None)
    keep = stratified(y, n_clean, seed)
    sub = None

    def corrupted(name: str, sev: int):
        nonlocal sub
        xc, yc = load_cifar100c(cdir, name, sev)
        if sub is None:
            sub = stratified(yc, n_corrupt, seed + 1)
        return xc[sub], yc[sub]

    avail = [n for n in CORRUPTIONS if cdir is not None and (cdir / f"{n}.npy").is_file()]
    return Dataset("CIFAR-100 test", x[keep], y[keep], names, corrupted, avail, False)


@dataclass
class Run:
    """What every stage of one dataset's evaluation shares: the bundle's head and backbone, the decision
    defaults, the seed and the clean set's scores (the in-distribution side of every OOD table)."""

    bundle: Any
    head: Any
    backbone: Any
    detectors: Any
    opts: dict
    id_scores: Dict[str, np.ndarray] = field(default_factory=dict)
    policy: Any = None  # bench.suite.policies.PolicyStage once the clean set is calibrated (needs detectors)

    @property
    def rule(self) -> Tuple[float, str, float, int]:
        d = self.bundle.decision
        return d.threshold, d.mixed, d.z, d.num_iter

    def arrays(self, head_run):
        """The policies' per-sample inputs (bench.suite.decisions.SetArrays) at the bundle's decision defaults,
        with the bundle's risk score (max_prob when it has no calibration data)."""
        from bench.suite.decisions import set_arrays

        thr, mixed, z0, t0 = self.rule
        gate = self.bundle.gate
        return set_arrays(head_run, t0, z0, thr, mixed, self.head.activation, gate.risk_score if gate is not None else "max_prob")

    def head_run(self, x_u8: np.ndarray, t: int, seed: int, progress=None):
        from bench.suite.core import backbone_features, run_head

        return run_head(self.head, backbone_features(self.backbone, self.bundle, x_u8, progress=progress), t, seed, self.detectors)


def evaluate_dataset(ds: Dataset, bundle_path: Optional[str], opts: dict, say, results: dict, figures: dict) -> None:
    from edge_quq.backends import make_backbone
    from edge_quq.bundle import load_bundle, sha256_file
    from edge_quq.detector_store import load_detectors
    from edge_quq.head import load_head_weights
    from bench.suite.evaluate import _r

    bundle = load_bundle(bundle_path)
    detectors = None
    if opts["detectors"]:
        try:
            detectors = load_detectors(bundle)
        except Exception as e:  # noqa: BLE001 - detectors are optional columns
            say(f"detectors not used: {e}")
    run = Run(bundle, load_head_weights(bundle), make_backbone(bundle, opts["backend"], opts["threads"]), detectors, opts)
    thr, mixed, z0, t0 = run.rule
    results["bundle"] = {"path": str(bundle.path), "name": bundle.name, "manifest_sha256": sha256_file(bundle.path / "manifest.json"),
                         "backbone_backend": run.backbone.describe() if hasattr(run.backbone, "describe") else opts["backend"],
                         "decision_defaults": {"threshold": thr, "z": z0, "T": t0, "mixed": mixed},
                         "detectors": detectors.names if detectors is not None else []}
    timings = results.setdefault("timings_s", {})
    rule_id_keep, clean = _clean_set(run, ds, say, results, timings)
    _start_policies(run, clean, ds.y, say, results, timings)
    shifted_ood = _corruptions(run, ds, results, figures, timings)
    far_tab, rule_ood, far_sizes = _far_ood(run, timings)
    if run.policy is not None:
        t_start = time.time()
        results["policies"] = run.policy.finish(results["corruptions"]["cells"])
        timings["policies_cost_and_verdict"] = round(time.time() - t_start, 1)
    # shifted sets averaged over the corruption types, per severity
    shifted_mean = {}
    for sev in opts["severities"]:
        keys = [k for k in shifted_ood if k.endswith(f"/{sev}")]
        shifted_mean[str(sev)] = {s: {m: _r(float(np.nanmean([shifted_ood[k][s][m] for k in keys]))) for m in ("auroc", "aupr_in", "aupr_out", "fpr95")}
                                  for s in run.id_scores}
    results["ood"] = {
        "id": ds.name, "n_id": int(len(ds.y)), "n_far": opts["n_ood"], "far_sizes": far_sizes, "far": far_tab, "shifted_by_set": shifted_ood,
        "shifted_mean_by_severity": shifted_mean,
        "rule_ignore_rate": {"in-distribution": round(float(np.mean(~rule_id_keep)), 4), **rule_ood},
    }


def _clean_set(run: Run, ds: Dataset, say, results: dict, timings: dict) -> Tuple[np.ndarray, Any]:
    """Tables III-V, selective prediction and calibration on the clean test set; returns the rule's keep [N]
    and the clean set's HeadRun."""
    from edge_quq.decision import decide_many
    from bench.suite import evaluate as ev
    from bench.suite.core import Progress, score_dict

    thr, mixed, z0, t0 = run.rule
    act, seed = run.head.activation, run.opts["seed"]
    t_start = time.time()
    pb = Progress(len(ds.x), "backbone: clean test set", run.opts["quiet"])
    clean = run.head_run(ds.x, max(max(ev.T_GRID), t0), seed, progress=pb)
    pb.close()
    timings["clean_features_and_head"] = round(time.time() - t_start, 1)
    y = ds.y
    plain_pred = np.argmax(clean.det_probs, axis=1)
    results["clean"] = {"n": int(len(y)), "int8_accuracy_plain": round(float(np.mean(plain_pred == y)), 4)}
    t_start = time.time()
    say("grid: z x T with bootstrap intervals")
    results["grid"] = ev.grid_tables(clean, y, thr, mixed, run.opts["reps"], seed, act)
    timings["grid"] = round(time.time() - t_start, 1)
    results["selective"] = ev.selective(clean, y, t0, thr, mixed, act)
    mean_t0, std_t0, _ = clean.moments(t0)
    results["calibration"] = ev.calibration({"plain int8": clean.det_probs, f"MC mean (T={t0})": mean_t0,
                                             "closed-form mean": clean.an_mean}, y)
    run.id_scores = score_dict(clean, t0, act)
    return decide_many(mean_t0, std_t0, z0, thr, mixed).keep, clean


def _start_policies(run: Run, clean, y: np.ndarray, say, results: dict, timings: dict) -> None:
    """Issue 14's policies, calibrated on a seeded split of the clean set, and as the bundle ships them
    (its own calibration data); they need the bundle's detectors."""
    from edge_quq.gate_store import load_gate
    from bench.suite.decisions import shipped
    from bench.suite.policies import PolicyStage

    if run.detectors is None or not run.opts["policies"]:
        results["policies"] = None
        return
    t_start = time.time()
    gate = run.bundle.gate
    loaded = load_gate(run.bundle) if gate is not None else None
    run.opts["risk_score"] = gate.risk_score if gate is not None else "max_prob"
    run.policy = PolicyStage.on_clean(run.arrays(clean), y, run.opts, say, list(gate.detectors) if gate is not None else None,
                                      shipped(gate, loaded) if loaded is not None else None,
                                      gate.alpha if gate is not None else 0.05)
    timings["policies_clean_splits_drift"] = round(time.time() - t_start, 1)


def _corruptions(run: Run, ds: Dataset, results: dict, figures: dict, timings: dict) -> Dict[str, Dict[str, dict]]:
    """The corruption cells (results["corruptions"]); returns the shifted-set OOD tables by "name/severity"."""
    from bench.suite import evaluate as ev
    from bench.suite.core import Progress, score_dict

    thr, mixed, z0, t0 = run.rule
    seed, sevs = run.opts["seed"], run.opts["severities"]
    t_start = time.time()
    corr: Dict[str, Dict[str, dict]] = {}
    shifted_ood: Dict[str, Dict[str, dict]] = {}
    examples = {}
    pb = Progress(len(ds.corruption_names) * len(sevs), "corruptions", run.opts["quiet"])
    for name in ds.corruption_names:
        corr[name] = {}
        for sev in sevs:
            xc, yc = ds.corrupted(name, sev)
            if sev in (1, 3, 5) and xc.ndim == 3:
                examples[(name, sev)] = xc[0]
            rc = run.head_run(xc, t0, seed + 7 * sev)
            corr[name][str(sev)] = ev.corruption_cell(rc, yc, z0, t0, thr, mixed)
            if run.policy is not None:
                run.policy.shifted_set(name, sev, run.arrays(rc), yc)
            shifted_ood[f"{name}/{sev}"] = ev.ood_table(run.id_scores, score_dict(rc, t0, run.head.activation))
            pb.update()
    pb.close()
    timings["corruptions"] = round(time.time() - t_start, 1)
    results["corruptions"] = {"z": z0, "T": t0, "synthetic": ds.synthetic_corruptions, "cells": corr}
    figures["examples"] = examples
    figures["clean_example"] = ds.x[0] if ds.x.ndim == 3 else None
    return shifted_ood


def _far_ood(run: Run, timings: dict) -> Tuple[dict, Dict[str, float], Dict[str, int]]:
    """OOD tables, the rule's ignore rate and the size of each far-OOD set (fixed sets such as the real
    handwritten digits are smaller than --ood-samples)."""
    from edge_quq.decision import decide_many
    from bench.suite import evaluate as ev
    from bench.suite.core import score_dict
    from bench.suite.ood import far_ood_sets, handwritten_sets, photo_sets

    thr, mixed, z0, t0 = run.rule
    seed = run.opts["seed"]
    t_start = time.time()
    h, w, c = run.bundle.input.shape
    far_tab, rule_ood = {}, {}
    sets = {**far_ood_sets(run.opts["n_ood"], seed, h, w, c), **handwritten_sets(h, w, c), **photo_sets(run.opts["n_ood"], seed)}
    for name, xo in sets.items():
        ro = run.head_run(xo, t0, seed + 99)
        far_tab[name] = ev.ood_table(run.id_scores, score_dict(ro, t0, run.head.activation))
        m, s, _ = ro.moments(t0)
        rule_ood[name] = round(float(np.mean(~decide_many(m, s, z0, thr, mixed).keep)), 4)
        if run.policy is not None:
            run.policy.far_set(name, run.arrays(ro))
    timings["far_ood"] = round(time.time() - t_start, 1)
    return far_tab, rule_ood, {name: int(len(xo)) for name, xo in sets.items()}


def render(results: dict, figures: dict, out: Path) -> None:
    from bench.suite.render import write_figures, write_markdown

    write_figures(results, figures, out)
    (out / "report.md").write_text(write_markdown(results))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Results folder (replaced atomically).")
@click.option("--quick", is_flag=True, help="Small subsets and few bootstrap reps: a smoke run in minutes.")
@click.option("--bundle", default=None, help="Bundle folder (default: the embedded Fashion-MNIST bundle).")
@click.option("--float-model", type=click.Path(dir_okay=False), default=str(REFERENCE_MODEL), show_default=True,
              help="Float Keras model of the bundle, for Tables I-II.")
@click.option("--cifar100", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder with cifar-100-python/ (and CIFAR-100-C/ .npy files): evaluate on CIFAR-100 instead.")
@click.option("--cifar100-bundle", default=None, help="Bundle of a CIFAR-100 model (needed with --cifar100).")
@click.option("--samples", type=int, default=None, help="Clean test samples (default: all; --quick: 500).")
@click.option("--corrupt-samples", type=int, default=None, help="Samples per corrupted set (default 2000; --quick 200).")
@click.option("--ood-samples", type=int, default=None, help="Samples per far-OOD set (default 2000; --quick 200).")
@click.option("--reps", type=int, default=None, help="Bootstrap resamples (default 1000; --quick 100).")
@click.option("--corruptions", default="all", show_default=True, help="Comma-separated corruption types to run (all: the 19).")
@click.option("--severities", default="1,2,3,4,5", show_default=True, help="Comma-separated severities among 1..5.")
@click.option("--backend", type=click.Choice(["auto", "tflite", "onnx"]), default="tflite", show_default=True)
@click.option("--threads", type=int, default=None, help="Backbone threads (default: all cores).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-detectors", is_flag=True, help="Leave out the bundle's fitted OOD detectors as score columns.")
@click.option("--no-policies", is_flag=True, help="Leave out issue 14's decision policies, split check and drift streams.")
@click.option("--gate-detectors", default="bundle;usable", show_default=True,
              help="Detectors the combined gate `gated` combines: 'bundle' (the exporter's choice, the product default), "
                   "'usable' (every usable detector of the bundle) or a comma list; more sets after ';' are evaluated as "
                   "candidate gates `gated[a+b]`.")
@click.option("--drift-detector", default="gate", show_default=True,
              help="The detector whose p-values feed the drift monitor; 'gate': the gate's first, as `edge-quq camera` feeds it.")
@click.option("--splits", type=int, default=None, help="Random calibration/test splits for the guarantee check (default 200; --quick 20); 5x as many i.i.d. "
                   "calibration draws for its population check.")
@click.option("--drift-seeds", type=int, default=None, help="Streams per drift cell and clean false-alarm check (default 20; --quick 5).")
@click.option("--drift-frames", type=int, default=None, help="Frames per clean drift stream (default 10000; --quick 2000).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(out, quick, bundle, float_model, cifar100, cifar100_bundle, samples, corrupt_samples, ood_samples, reps, corruptions,
         severities, backend, threads, seed, no_detectors, no_policies, gate_detectors, drift_detector, splits, drift_seeds, drift_frames,
         quiet) -> None:
    """Run the benchmark suite and write report.json, report.md and figures under OUT."""
    from edge_quq.errors import EdgeQuqError

    t0 = time.time()
    say = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    opts = {
        "quiet": quiet, "seed": seed, "backend": backend, "threads": threads, "detectors": not no_detectors,
        "reps": reps if reps is not None else (100 if quick else 1000),
        "n_ood": ood_samples if ood_samples is not None else (200 if quick else 2000),
        "severities": parse_severities(severities),
        "policies": not no_policies, "gate_detectors": gate_detectors, "drift_detector": drift_detector,
        "splits": splits if splits is not None else (20 if quick else 200),
        # i.i.d. calibration draws for the population check of the risk guarantee (cheap: no test split)
        "population_resamples": 5 * (splits if splits is not None else (20 if quick else 200)),
        "drift_seeds": drift_seeds if drift_seeds is not None else (5 if quick else 20),
        "drift_frames": drift_frames if drift_frames is not None else (2000 if quick else 10000),
        "cost_repeats": 2000 if quick else 20000,
    }
    from bench.suite.corruptions import CORRUPTIONS

    wanted = list(CORRUPTIONS) if corruptions.strip() == "all" else [c.strip() for c in corruptions.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CORRUPTIONS]
    if unknown or not wanted:
        raise click.UsageError(f"unknown corruption {', '.join(unknown) or '(none given)'}; choose from {', '.join(CORRUPTIONS)} or all")
    n_clean = samples if samples is not None else (500 if quick else 10 ** 9)
    n_corr = corrupt_samples if corrupt_samples is not None else (200 if quick else 2000)
    for label, v in (("--samples", n_clean), ("--corrupt-samples", n_corr), ("--ood-samples", opts["n_ood"]), ("--reps", opts["reps"])):
        if v < 20:
            raise click.UsageError(f"{label} must be at least 20, got {v}")
    for label, v in (("--splits", opts["splits"]), ("--drift-seeds", opts["drift_seeds"]), ("--drift-frames", opts["drift_frames"])):
        if v < 1:
            raise click.UsageError(f"{label} must be at least 1, got {v}")
    if cifar100 and not cifar100_bundle:
        raise click.UsageError("--cifar100 needs --cifar100-bundle (a bundle exported from a CIFAR-100 model)")
    out = Path(out)
    results: dict = {
        "suite": "edge-quq benchmark suite (issue 6)",
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "quick": quick, "seed": seed, "machine": machine_info(),
        "settings": {"clean_samples": n_clean, "corrupt_samples": n_corr, "ood_samples": opts["n_ood"], "bootstrap_reps": opts["reps"],
                     "backend": backend, "splits": opts["splits"], "drift_seeds": opts["drift_seeds"], "drift_frames": opts["drift_frames"]},
    }
    figures: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix=".suite-", dir=str(out.parent) if out.parent.exists() else None))
    try:
        if cifar100:
            ds = cifar_dataset(Path(cifar100), n_clean, n_corr, seed)
            bundle_path = cifar100_bundle
            results["sizes"] = None
            results["accuracy"] = None
        else:
            ds, _ = fashion_dataset(n_clean, n_corr, seed)
            bundle_path = bundle
            from edge_quq.bundle import load_bundle

            b = load_bundle(bundle_path)
            fm = Path(float_model) if float_model else None
            results["sizes"] = size_table(b, fm)
            say("float model accuracy (TensorFlow)")
            results["accuracy"] = {"float": float_accuracy(fm, ds.x, ds.y) if fm else {"error": "no float model"},
                                   "int8_tflite": int8_accuracy(b, "tflite", ds.x, ds.y, threads),
                                   "int8_onnx": int8_accuracy(b, "onnx", ds.x, ds.y, threads),
                                   "bundle_manifest": b.manifest.get("accuracy")}
        ds.corruption_names = [c for c in ds.corruption_names if c in wanted]
        results["dataset"] = ds.name
        evaluate_dataset(ds, bundle_path, opts, say, results, figures)
        if results.get("accuracy") is not None:
            results["accuracy"]["int8_plain_this_run"] = results["clean"]["int8_accuracy_plain"]
        results["e2e"] = json.loads(E2E_REPORT.read_text()) if E2E_REPORT.is_file() else None
        results["e2e_source"] = str(E2E_REPORT.relative_to(ROOT))
        try:
            results["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            pass
        results["wall_seconds"] = round(time.time() - t0, 1)
        (tmp / "report.json").write_text(json.dumps(results, indent=1, default=float))
        render(results, figures, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the report is for everyone
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except (EdgeQuqError, OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}/report.md, report.json and figures in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
