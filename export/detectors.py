"""Fit OOD detectors on in-distribution data and add them to a bundle (`edge-quq fit-detectors`, or
`python -m edge_quq_export.detectors BUNDLE --data ...`; `edge-quq export --detectors ... --fit-data ...`
calls the same code right after writing the bundle).

Features come from the bundle's own int8 TFLite backbone (ONNX when TFLite is missing), run by the runtime's
backend code: the detectors then see exactly the features the board computes, quantization error included,
and their thresholds hold for them. Needs no TensorFlow.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import click
import numpy as np

FIT_DATA_HELP = ("In-distribution fit data: 'fashion-mnist' (the Debian package's 60k training images and labels), "
                 "a folder of images (one sub-folder per class name gives labels), or .npy/.npz (.npz 'x' and 'y'). "
                 "Without labels, the head's own eval-mode predictions stand in for them.")


def load_fit_data(data: str, bundle, limit: Optional[int], seed: int,
                  fashion_root: Optional[Path] = None) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """(model-ready float32 input, labels or None, a description for the record)."""
    from edge_quq_export.datasets import FASHION_MNIST_DIR, load_fashion_mnist, load_inputs, preprocess_array

    shape = bundle.input.shape
    spec = bundle.input.preprocess
    if data in ("fashion-mnist", "fashion-mnist:train"):
        x, y = load_fashion_mnist("train", fashion_root or FASHION_MNIST_DIR)
        desc = "Fashion-MNIST train (Debian dataset-fashion-mnist)"
        if limit is not None and len(x) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
            x, y = x[keep], y[keep]
        return preprocess_array(x, shape, spec, desc), y, f"{desc}, {len(x)} images"
    x, y = load_inputs(data, shape, spec, what="detector fit data", limit=limit, seed=seed, classes=bundle.classes)
    return x, y, f"{data}, {len(x)} images"


def backbone_features(bundle, x: np.ndarray, batch: int = 256, threads: Optional[int] = None) -> Tuple[np.ndarray, str]:
    from edge_quq.backends import make_backbone

    bb = make_backbone(bundle, "auto", threads)
    feats = np.concatenate([bb(x[i : i + batch]) for i in range(0, len(x), batch)]).astype(np.float32)
    return feats, bb.describe()


def fit_bundle(bundle_path: Path, data: str, names: Sequence[str], *, seed: int = 0, tpr: Optional[float] = 0.95,
               limit: Optional[int] = None, holdout: float = 0.1, config: Optional[Dict[str, Dict[str, Any]]] = None,
               threads: Optional[int] = None, log=None, fashion_root: Optional[Path] = None) -> Dict[str, Any]:
    """Fit `names` on `data` through the bundle's backbone and attach them; returns a summary."""
    from edge_quq.bundle import load_bundle
    from edge_quq.detector_store import attach_detectors, load_detectors
    from edge_quq.detectors import fit_detectors
    from edge_quq.head import load_head_weights

    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    head = load_head_weights(bundle)
    x, y, desc = load_fit_data(data, bundle, limit, seed, fashion_root)
    feats, backend = backbone_features(bundle, x, threads=threads)
    label_source = "labels"
    if y is None:
        y = np.argmax(head.logits(feats), axis=1)
        label_source = "head predictions (no labels given)"
    dset = fit_detectors(feats, y, head, names, seed=seed, tpr=tpr, holdout=holdout, config=config)
    info = {"data": desc, "labels": label_source, "features": f"int8 backbone output, dequantized ({backend})", "seed": seed}
    out = attach_detectors(bundle.path, dset, info)
    loaded = load_detectors(out)
    summary = {
        "bundle": str(out.path), "data": desc, "labels": label_source, "backend": backend,
        "seconds": round(time.perf_counter() - t0, 1),
        "file_bytes": out.files["detectors.npz"]["bytes"],
        "detectors": {n: {"threshold": d.threshold, "dtype": d.dtype, "bytes": d.nbytes(), "config": d.config}
                      for n, d in loaded.detectors.items()},
    }
    if log:
        log(f"fitted {', '.join(loaded.names)} on {desc} ({label_source}) in {summary['seconds']} s; "
            f"{out.path / 'detectors.npz'}: {summary['file_bytes'] / 1024:.1f} KiB")
    return summary


def parse_config(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """--param knn.k=20 --param react.percentile=95 -> {'knn': {'k': 20}, ...}."""
    from edge_quq.detectors import DEFAULTS
    from edge_quq.errors import OptionError

    out: Dict[str, Dict[str, Any]] = {}
    for it in items:
        key, sep, val = it.partition("=")
        det, dot, param = key.partition(".")
        if not sep or not dot or det not in DEFAULTS or param not in DEFAULTS[det]:
            known = ", ".join(f"{d}.{p}" for d, ps in DEFAULTS.items() for p in ps)
            raise OptionError(f"--param {it!r}: expected DETECTOR.NAME=VALUE with one of {known}")
        try:
            v: Any = int(val)
        except ValueError:
            try:
                v = float(val)
            except ValueError:
                v = val
        out.setdefault(det, {})[param] = v
    return out


@click.command("fit-detectors", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, help=FIT_DATA_HELP)
@click.option("--detectors", "names", default="all", show_default=True,
              help="Comma-separated: maxlogit, energy, react, mahalanobis, rel_mahalanobis, knn, vim, gradient (or 'all').")
@click.option("--tpr", type=float, default=0.95, show_default=True, help="Share of held-out ID samples each fitted threshold keeps.")
@click.option("--limit", type=click.IntRange(min=10), default=None, help="Use a seeded random subset of this many fit images.")
@click.option("--holdout", type=float, default=0.1, show_default=True, help="Share of the fit data kept out of the fit, for the thresholds.")
@click.option("--param", "params", multiple=True, help="Detector setting, e.g. knn.k=10, knn.bank_size=1024, react.percentile=90, vim.dim=32.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
def fit_detectors_cmd(bundle: Path, data: str, names: str, tpr: float, limit: Optional[int], holdout: float,
                      params: Sequence[str], seed: int, threads: Optional[int]) -> None:
    """Fit OOD detectors on in-distribution data and add them (detectors.npz) to BUNDLE in place."""
    from edge_quq.detectors import parse_names
    from edge_quq.errors import EdgeQuqError

    try:
        summary = fit_bundle(bundle, data, parse_names(names), seed=seed, tpr=tpr, limit=limit, holdout=holdout,
                             config=parse_config(params), threads=threads, log=lambda m: click.echo(m, err=True))
    except EdgeQuqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    for n, d in summary["detectors"].items():
        thr = "-" if d["threshold"] is None else f"{d['threshold']:.6g}"
        click.echo(f"{n:<16} threshold {thr:<12} stored {d['dtype']:<8} {d['bytes'] / 1024:7.1f} KiB")


if __name__ == "__main__":
    fit_detectors_cmd()
