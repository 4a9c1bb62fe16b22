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
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import click
import numpy as np

from edge_quq.defaults import GATE_DEFAULTS, RISK_SCORE_SIGN, Z_CHOICE

FIT_DATA_HELP = ("In-distribution fit data: 'fashion-mnist' (the Debian package's 60k training images and labels), "
                 "a folder of images (one sub-folder per class name gives labels), or .npy/.npz (.npz 'x' and 'y'). "
                 "Without labels, the head's own eval-mode predictions stand in for them.")


def load_fit_data(data: str, bundle, limit: Optional[int], seed: int, fashion_root: Optional[Path] = None,
                  exclude_val: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """(model-ready float32 input, labels or None, a description for the record). exclude_val: leave out
    the last 5k Fashion-MNIST training images (the validation split, used for calibration instead)."""
    from edge_quq_export.datasets import FASHION_MNIST_DIR, FMNIST_VAL, load_fashion_mnist, load_inputs, preprocess_array

    shape = bundle.input.shape
    spec = bundle.input.preprocess
    if data in ("fashion-mnist", "fashion-mnist:train"):
        x, y = load_fashion_mnist("train", fashion_root or FASHION_MNIST_DIR)
        desc = "Fashion-MNIST train (Debian dataset-fashion-mnist)"
        if exclude_val:
            x, y = x[:-FMNIST_VAL], y[:-FMNIST_VAL]
            desc += f", without the last {FMNIST_VAL} (the validation split)"
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


def split_calibration(data: str, x: np.ndarray, y: Optional[np.ndarray], calib_data: Optional[str], calib_share: float,
                      bundle, seed: int, fashion_root: Optional[Path]):
    """(fit x, fit y, cal x, cal y, cal description): a seeded share of the fit data, or `calib_data`.

    'fashion-mnist-val' (the reference recipe's validation split: held out from the model's training too)
    is taken out of Fashion-MNIST fit data, so that no calibration image ever fits a detector."""
    from edge_quq.errors import OptionError
    from edge_quq_export.calibration import load_temperature_data
    from edge_quq_export.datasets import FASHION_MNIST_DIR

    if calib_data is None:
        if not 0.0 < calib_share < 0.9:
            raise OptionError(f"calibration share must be in (0, 0.9), got {calib_share}")
        perm = np.random.default_rng([seed, 13]).permutation(len(x))
        n_cal = max(int(round(calib_share * len(x))), 10)
        cal, fit = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        return (x[fit], None if y is None else y[fit], x[cal], None if y is None else y[cal],
                f"seeded {calib_share:g} share of the fit data ({n_cal} samples, never used to fit the detectors)")
    xc, yc, desc = load_temperature_data(calib_data, bundle, None, None, seed, fashion_root or FASHION_MNIST_DIR)
    return x, y, xc, yc, desc


def fit_bundle(bundle_path: Path, data: str, names: Sequence[str], *, seed: int = 0, tpr: Optional[float] = 0.95,
               limit: Optional[int] = None, holdout: float = 0.1, config: Optional[Dict[str, Dict[str, Any]]] = None,
               threads: Optional[int] = None, log=None, fashion_root: Optional[Path] = None,
               calib_data: Optional[str] = None, calib_share: float = 0.2, gate: bool = True,
               z: Optional[float] = None) -> Dict[str, Any]:
    """Fit `names` on `data` through the bundle's backbone and attach them; then, unless gate=False, store
    the gate's calibration data from a held-out split and choose the default z on it unless `z` is given
    (split_calibration, build_gate). Returns a summary."""
    from edge_quq.bundle import load_bundle
    from edge_quq.detector_store import attach_detectors, load_detectors
    from edge_quq.detectors import fit_detectors
    from edge_quq.head import load_head_weights

    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    head = load_head_weights(bundle)
    x, y, desc = load_fit_data(data, bundle, limit, seed, fashion_root, exclude_val=calib_data == "fashion-mnist-val")
    x, y, x_cal, y_cal, cal_desc = split_calibration(data, x, y, calib_data, calib_share, bundle, seed, fashion_root) if gate \
        else (x, y, None, None, "")
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
    if gate:
        if y_cal is None:
            y_cal = np.argmax(head.logits(backbone_features(bundle, x_cal, threads=threads)[0]), axis=1)
        summary["gate"] = build_gate(out.path, x_cal, y_cal, cal_desc, seed=seed, z=z, threads=threads, log=log)
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
@click.option("--calibration-data", default=None,
              help="Held-out ID data for the gate's calibration scores and the risk table (labelled: .npz x/y, class "
                   "sub-folders, or 'fashion-mnist-val'); it must not have trained the model. Default: a seeded share of --data.")
@click.option("--calibration-share", type=float, default=0.2, show_default=True,
              help="Without --calibration-data: the share of --data held out of the fit for calibration.")
@click.option("--no-gate", is_flag=True, help="Fit the detectors only; store no calibration data (the bundle then runs the paper policy).")
@click.option("--z", "z", type=click.FloatRange(min=0.0, max=100.0), default=None,
              help="Default interval factor z to store with the gate. Default: chosen on the calibration data, the smallest z "
                   "that certifies 5% error among kept (docs/decisions.md).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
def fit_detectors_cmd(bundle: Path, data: str, names: str, tpr: float, limit: Optional[int], holdout: float,
                      params: Sequence[str], calibration_data: Optional[str], calibration_share: float, no_gate: bool,
                      z: Optional[float], seed: int, threads: Optional[int]) -> None:
    """Fit OOD detectors on in-distribution data and add them (detectors.npz) to BUNDLE in place."""
    from edge_quq.detectors import parse_names
    from edge_quq.errors import EdgeQuqError

    try:
        summary = fit_bundle(bundle, data, parse_names(names), seed=seed, tpr=tpr, limit=limit, holdout=holdout,
                             config=parse_config(params), threads=threads, log=lambda m: click.echo(m, err=True),
                             calib_data=calibration_data, calib_share=calibration_share, gate=not no_gate, z=z)
    except EdgeQuqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    for n, d in summary["detectors"].items():
        thr = "-" if d["threshold"] is None else f"{d['threshold']:.6g}"
        click.echo(f"{n:<16} threshold {thr:<12} stored {d['dtype']:<8} {d['bytes'] / 1024:7.1f} KiB")



# --- calibration data of the OOD gate and risk control (gate.npz; docs/decisions.md) ----------------------

def validation_glyphs(count: int, seed: int) -> np.ndarray:
    """The gate validation's `glyphs`, uint8 [count, 28, 28]: the outlier-exposure generator from a seed its
    fine-tune never draws (OE_SEED + 1 + seed)."""
    from edge_quq_export.outlier_exposure import OE_SEED, outlier_pool

    return outlier_pool(count, seed=OE_SEED + 1 + seed)


def ood_validation_sets(bundle, seed: int, count: int = 400) -> Dict[str, np.ndarray]:
    """Far-OOD sets the exporter makes offline, model-ready: synthetic images, patches of real photographs
    that scikit-image, matplotlib and scikit-learn ship, and `glyphs`: the outlier-exposure generator's images
    (TrueType glyphs, strokes, gradients; outlier_pool) from a seed the fine-tune never draws. Why glyphs: the
    other sets are all far from clothing and every candidate gate catches them, so they could not tell a gate
    that misses glyph-like inputs from one that does not; two outlier-exposure runs chose Mahalanobis alone,
    which let 40% of real handwritten digits through its gate (docs/export.md, "Run-to-run spread")."""
    from edge_quq.preprocess import preprocess_image
    from edge_quq_export.datasets import package_photos, photo_patches, synthetic_ood

    rng = np.random.default_rng([seed, 14])
    raw = synthetic_ood(count // 2, rng)
    for name, photos in package_photos().items():
        raw[name] = photo_patches(photos, count, rng)
    raw["glyphs"] = list(validation_glyphs(count, seed))
    spec = bundle.input.preprocess
    return {k: np.stack([preprocess_image(im, spec, "rgb") for im in v]) for k, v in raw.items()}


def calibration_records(bundle, dset, head, x: np.ndarray, y: np.ndarray, seed: int, num_iter: Optional[int] = None,
                        threads: Optional[int] = None) -> Dict[str, Any]:
    """Per calibration sample: every detector's score, the confidence scores, the MC moments, and the rule's
    keep and correctness at the bundle's z (rule_records), computed as the predictor computes them (same
    backbone, sampler, rule)."""
    from edge_quq.samplers import make_sampler
    from edge_quq.scores import compute_scores

    feats, _ = backbone_features(bundle, x, threads=threads)
    d = bundle.decision
    m = make_sampler("auto", head, seed=seed, bundle=bundle).sample(feats, int(num_iter or d.num_iter))
    scores = compute_scores(m.mean, m.std, m.logits, m.expected_entropy, head.activation)
    rec = {"detectors": {n: np.asarray(v, np.float64) for n, v in dset.score_all(feats, head).items()},
           "confidence": {k: RISK_SCORE_SIGN[k] * np.asarray(scores[k], np.float64) for k in RISK_SCORE_SIGN},
           "mean": m.mean, "std": m.std}
    rec.update(rule_records(m.mean, m.std, y, d.z, d.threshold, d.mixed))
    return rec


def rule_records(mean: np.ndarray, std: np.ndarray, y: np.ndarray, z: float, threshold: float, mixed: str) -> Dict[str, np.ndarray]:
    """The paper rule's keep per sample at z, and whether the kept (or, when ignored, the top) class is right."""
    from edge_quq.decision import decide_many, predicted_labels

    dec = decide_many(mean, std, z, threshold, mixed)
    label = np.where(dec.keep, predicted_labels(mean, dec.states, dec.keep), np.argmax(mean, axis=1))
    return {"rule_keep": np.asarray(dec.keep, bool), "correct": label == np.asarray(y)}


def choose_default_z(mean: np.ndarray, std: np.ndarray, y: np.ndarray, gate_ignored: np.ndarray, threshold: float,
                     mixed: str, delta: float, target: Optional[float] = None, budget: Optional[float] = None,
                     grid: Optional[Sequence[float]] = None) -> Tuple[float, Dict[str, Any]]:
    """The bundle's default z (defaults.Z_CHOICE says why): fixed-sequence Learn-then-Test from the widest
    interval down over the z whose rule-plus-gate ignore rate on these samples is within `budget`; each z is
    tested for H: error among kept > target (binomial p-value <= delta rejects), and the last z before the
    first failure is certified. With none certified, the widest z within the budget (the lowest error the
    budget allows); with none within it, the narrowest z of the grid."""
    from edge_quq.risk import binomial_pvalue, binomial_upper_bound

    target = float(target if target is not None else Z_CHOICE["error_target"])  # type: ignore[arg-type]
    budget = float(budget if budget is not None else Z_CHOICE["ignore_budget"])  # type: ignore[arg-type]
    grid = sorted(float(v) for v in (grid if grid is not None else Z_CHOICE["grid"]))  # type: ignore[union-attr]
    rows = []
    for z in grid:
        r = rule_records(mean, std, y, z, threshold, mixed)
        kept = r["rule_keep"] & ~np.asarray(gate_ignored, bool)
        n, e = int(kept.sum()), int(np.count_nonzero(~r["correct"][kept]))
        rows.append({"z": z, "kept": n, "errors": e, "ignored": round(1.0 - n / len(kept), 4),
                     "error_kept": round(e / n, 4) if n else 0.0,
                     "upper_bound": round(binomial_upper_bound(e, n, delta), 4),
                     "p_value": float(binomial_pvalue(np.array([e]), np.array([n]), target)[0])})
    within = [r for r in rows if r["ignored"] <= budget]
    certified = None
    for r in reversed(within):  # widest first; stop at the first z that fails
        if r["p_value"] > delta:
            break
        certified = r
    pick = certified or (within[-1] if within else rows[0])
    how = ("certified" if certified else "not certified: widest z within the ignore budget" if within
           else "not certified: nothing within the ignore budget, narrowest z")
    return pick["z"], {"z": pick["z"], "certified": certified is not None, "choice": how, "error_target": target,
                       "ignore_budget": budget, "delta": delta, "samples": int(len(y)),
                       "method": "fixed-sequence LTT over z, widest first; rule plus the gate cross-fitted on two "
                                 "halves of the calibration split", "table": rows}


def crossfit_gate_ignores(scores: Mapping[str, np.ndarray], names: Sequence[str], alpha: float, rule: str,
                          seed: int) -> np.ndarray:
    """The gate's ignores on its own calibration samples without scoring a sample against itself: each
    seeded half is gated against the other half's scores."""
    n = len(next(iter(scores.values())))
    perm = np.random.default_rng([seed, 18]).permutation(n)
    out = np.zeros(n, bool)
    for ref, test in ((perm[: n // 2], perm[n // 2 :]), (perm[n // 2 :], perm[: n // 2])):
        out[test] = _gate_ignores({k: v[ref] for k, v in scores.items()}, names, {"t": {k: v[test] for k, v in scores.items()}},
                                  alpha, rule)["t"]
    return out


def _gate_ignores(cal, ref_names: Sequence[str], score_sets: Mapping[str, Mapping[str, np.ndarray]], alpha: float,
                  rule: str) -> Dict[str, np.ndarray]:
    from edge_quq.conformal import gate_pvalues, sort_calibration

    ref = sort_calibration([cal[n] for n in ref_names])
    return {k: gate_pvalues(np.stack([s[n] for n in ref_names], 1), ref, rule) < alpha
            for k, s in score_sets.items()}


# A far-OOD set counts as caught as well as the best subset's when within this share of it.
FAR_TOLERANCE = 0.0


def select_gate(cal_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, Mapping[str, np.ndarray]],
                alpha: float, rule: str, seed: int, rule_keep: np.ndarray, correct: np.ndarray,
                max_size: int = 3) -> Tuple[List[str], Dict[str, Any]]:
    """Which detectors the default gate combines. Half the calibration samples serve as calibration, the
    other half as held-out ID data. Candidates: the subsets of at most `max_size` detectors whose held-out
    false-ignore is within alpha plus two binomial standard errors and whose worst far-OOD set is caught
    within FAR_TOLERANCE of the best subset's. Among them, the one making the fewest wrong decisions on the
    held-out half wins (kept and wrong, or ignored and right, under the paper rule plus that gate); ties go
    to fewer detectors. Catching only far-OOD would pick Mahalanobis alone, whose in-distribution ignores
    are mostly right predictions; this rule keeps its far-OOD catch and spends alpha where the model errs."""
    from itertools import combinations

    names = list(cal_scores)
    n = len(next(iter(cal_scores.values())))
    perm = np.random.default_rng([seed, 15]).permutation(n)
    half_a, half_b = perm[: n // 2], perm[n // 2 :]
    ref = {k: v[half_a] for k, v in cal_scores.items()}
    sets = {"id_heldout": {k: v[half_b] for k, v in cal_scores.items()}, **ood_scores}
    far = [k for k in ood_scores if not k.startswith("shift_")]
    limit = alpha + 2.0 * np.sqrt(alpha * (1 - alpha) / len(half_b))
    keep_b, right_b = np.asarray(rule_keep, bool)[half_b], np.asarray(correct, bool)[half_b]
    table: Dict[str, Dict[str, float]] = {}
    for size in range(1, max_size + 1):
        for combo in combinations(names, size):
            ign = _gate_ignores(ref, combo, sets, alpha, rule)
            rates = {k: float(np.mean(v)) for k, v in ign.items()}
            kept = keep_b & ~ign["id_heldout"]
            rates["id_ignored_with_rule"] = float(1.0 - kept.mean())
            rates["id_error_kept"] = float(np.mean(~right_b[kept])) if kept.any() else 0.0
            rates["id_wrong_decisions"] = float(np.mean(kept != right_b))
            table[",".join(combo)] = rates
    valid = {k: r for k, r in table.items() if r["id_heldout"] <= limit} or table
    worst = {k: min(r[s] for s in far) for k, r in valid.items()}
    floor = max(worst.values()) - FAR_TOLERANCE
    best = min((k for k in valid if worst[k] >= floor), key=lambda k: (valid[k]["id_wrong_decisions"], k.count(",")))
    rnd = lambda r: {s: round(v, 4) for s, v in r.items()}
    singles = {k: rnd(r) for k, r in table.items() if "," not in k}
    return best.split(","), {"method": f"half of the calibration data as reference, half as held-out ID; alpha {alpha:g}, "
                                       f"{rule}; fewest wrong decisions among subsets within {FAR_TOLERANCE:g} of the "
                                       "best worst-case far-OOD catch",
                             "id_limit": round(float(limit), 4), "far_floor": round(float(floor), 4),
                             "chosen": rnd(table[best]), "single_detectors": singles}


def choose_risk_score(conf: Mapping[str, np.ndarray], correct: np.ndarray, rule_keep: np.ndarray, delta: float,
                      seed: int, target: float = 0.02) -> Tuple[str, Dict[str, float]]:
    """The confidence score with the largest certified coverage at `target` (LTT on a seeded half of the
    calibration data, among samples the rule keeps); max_prob wins ties."""
    from edge_quq.errors import OptionError
    from edge_quq.risk import CalibrationTable, ltt_threshold

    half = np.random.default_rng([seed, 16]).permutation(len(correct))[: len(correct) // 2]
    half = half[rule_keep[half]]
    cover = {}
    for name, c in conf.items():
        try:
            cover[name] = round(ltt_threshold(CalibrationTable.build(c[half], correct[half]), target, delta).coverage, 4)
        except OptionError:
            cover[name] = 0.0
    best = max(cover, key=lambda k: (cover[k], k == "max_prob"))
    return best, cover


def build_gate(bundle_path: Path, x_cal: np.ndarray, y_cal: np.ndarray, cal_desc: str, *, seed: int = 0,
               alpha: Optional[float] = None, delta: Optional[float] = None, rule: Optional[str] = None,
               z: Optional[float] = None, threads: Optional[int] = None, log=None) -> Dict[str, Any]:
    """Calibrate the bundle's fitted detectors on held-out ID data (x_cal, y_cal, never used to fit them),
    choose the default gate's detectors, the default z (unless `z` fixes it) and the risk score by validation,
    and attach gate.npz with the chosen z in the manifest's decision defaults."""
    from edge_quq.bundle import GateSpec, load_bundle
    from edge_quq.detector_store import load_detectors
    from edge_quq.errors import OptionError
    from edge_quq.gate_store import GATE_FILE, GateData, attach_gate
    from edge_quq.head import load_head_weights
    from edge_quq_export.datasets import CORRUPTIONS, corrupt

    alpha = float(alpha if alpha is not None else GATE_DEFAULTS["alpha"])
    delta = float(delta if delta is not None else GATE_DEFAULTS["delta"])
    rule = str(rule or GATE_DEFAULTS["combine"])
    bundle = load_bundle(bundle_path)
    dset, head = load_detectors(bundle), load_head_weights(bundle)
    if dset is None:
        raise OptionError("calibration data needs fitted detectors first (edge-quq fit-detectors)")
    rec = calibration_records(bundle, dset, head, x_cal, y_cal, seed, threads=threads)
    rng = np.random.default_rng([seed, 17])
    ood = ood_validation_sets(bundle, seed)
    few = x_cal[rng.permutation(len(x_cal))[:400]]
    ood.update({f"shift_{k}": corrupt(few, k, rng) for k in CORRUPTIONS})
    ood_scores = {k: dset.score_all(backbone_features(bundle, v, threads=threads)[0], head) for k, v in ood.items()}
    names, validation = select_gate(rec["detectors"], ood_scores, alpha, rule, seed, rec["rule_keep"], rec["correct"])
    d = bundle.decision
    validation["rule_z"] = d.z  # the z of the id_* figures above; the default z may be chosen next
    if z is None:
        ignored = crossfit_gate_ignores(rec["detectors"], names, alpha, rule, seed)
        z, validation["default_z"] = choose_default_z(rec["mean"], rec["std"], y_cal, ignored, d.threshold, d.mixed, delta)
    rec.update(rule_records(rec["mean"], rec["std"], y_cal, float(z), d.threshold, d.mixed))
    risk_score, coverage = choose_risk_score(rec["confidence"], rec["correct"], rec["rule_keep"], delta, seed)
    validation["risk_coverage_at_2pct"] = coverage
    validation["sets"] = {k: len(v) for k, v in ood.items()}
    data = GateData(rec["detectors"], rec["confidence"][risk_score], rec["correct"], rec["rule_keep"],
                    {"data": cal_desc, "samples": int(len(x_cal)), "seed": int(seed), "risk_score": risk_score})
    spec = GateSpec(file=GATE_FILE, version=1, policy=str(GATE_DEFAULTS["policy"]), alpha=alpha, delta=delta,
                    combine=rule, detectors=tuple(names), risk_score=risk_score,
                    calibration={"data": cal_desc, "samples": int(len(x_cal)), "seed": int(seed)}, validation=validation)
    out = attach_gate(bundle.path, data, spec, decision=replace(d, z=float(z)))
    if log:
        chosen = validation["chosen"]
        log(f"gate: {', '.join(names)} ({rule}, alpha {alpha:g}) on {len(x_cal)} calibration samples; ignored: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in chosen.items()) + f"; risk score {risk_score}")
        if "default_z" in validation:
            zc = validation["default_z"]
            row = next(r for r in zc["table"] if r["z"] == zc["z"])
            log(f"default z {zc['z']:g} ({zc['choice']}): error among kept {100 * row['error_kept']:.2f}% (upper bound "
                f"{100 * row['upper_bound']:.2f}% at delta {zc['delta']:g}), {100 * row['ignored']:.2f}% ignored on the calibration split")
    return {"bundle": str(out.path), "detectors": names, "risk_score": risk_score, "validation": validation, "z": float(z)}


if __name__ == "__main__":
    fit_detectors_cmd()
