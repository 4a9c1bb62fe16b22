"""Per-frame cost of the OOD gate's Mahalanobis pair (mahalanobis + rel_mahalanobis, one projection), float32
whiteners against int8 ones (edge_quq.detectors.INT8_WHITENER_MIN_FEATURES), at the feature sizes of the bench
backbones, timed interleaved in one run. Writes bench/results/whitener.md and .json; no assertions.

    python -m bench.bench_whitener [--sizes 576,960,1280,2048] [--repeats 300] [--out bench/results]

The pair is fitted on synthetic rows (C = 100 classes, a random feature covariance; cost depends on shapes, not
on the fit) by the detectors' own fit functions; the int8 arrays are what fit_detectors stores at these sizes.
Timed by thread CPU time (and wall clock, in the .json). Two kinds of frame features: "dense" (no zeros, the int8 product's worst case) and "relu" (half zero, as
ReLU6/ReLU backbones give; the int8 product skips zero features, the float blocks do not).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List

from bench.blas_threads import BLAS_THREADS  # noqa: F401  (before numpy)

import click  # noqa: E402
import numpy as np  # noqa: E402

from edge_quq import detectors as det  # noqa: E402
from edge_quq import framekernels  # noqa: E402

CLASSES = 100


def _pair(f: int, seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    """rel_mahalanobis arrays (its class part is mahalanobis) fitted on synthetic rows, float and int8."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(f, f)) / np.sqrt(f)
    rows = np.maximum(rng.normal(size=(3 * f, f)) @ mix + 0.3, 0.0)
    labels = rng.integers(0, CLASSES, len(rows))

    class _Head:  # the fit needs the class count only
        num_classes = CLASSES

    arrs = det._fit_rel_mahalanobis(rows, labels, _Head(), rng)
    return {"float32": det._roundtrip(arrs, "float32"),
            "int8": det._roundtrip(det._int8_mahalanobis(arrs, rows, labels, CLASSES), "int8")}


def measure(sizes: List[int], repeats: int) -> List[dict]:
    out = []
    for f in sizes:
        pair = _pair(f)
        prepared = {k: det._prepare_mahalanobis(v) for k, v in pair.items()}
        rng = np.random.default_rng(1)
        frames = {"dense": np.abs(rng.normal(size=(repeats, 1, f))).astype(np.float32) + 0.1}
        frames["relu"] = np.where(rng.random((repeats, 1, f)) < 0.5, 0.0, frames["dense"]).astype(np.float32)
        times: Dict[str, List[float]] = {f"{k}/{dt}{c}": [] for k in frames for dt in prepared for c in ("", "_wall")}
        for i in range(repeats):  # interleaved: every variant sees the same machine state
            for kind, xs in frames.items():
                for dt, p in prepared.items():
                    t0, c0 = time.perf_counter(), time.thread_time()
                    det._mahalanobis_family(p, xs[i])
                    c1, t1 = time.thread_time(), time.perf_counter()
                    times[f"{kind}/{dt}"].append((c1 - c0) * 1e6)
                    times[f"{kind}/{dt}_wall"].append((t1 - t0) * 1e6)
        row = {"F": f, "float32_bytes": int(8 * f * f), "int8_bytes": int(pair["int8"]["whitener"].size * 2),
               "streamed_int8_bytes": int(prepared["int8"]["q8"].q.size) if "q8" in prepared["int8"] else None,
               "streamed_float32_bytes": int(sum(b[3].nbytes for b in prepared["float32"]["blocks"])) or int(8 * f * f)}
        for k, v in times.items():
            row[f"{k}_us"] = round(float(np.median(v)), 1)
        for kind in frames:
            row[f"{kind}_speedup"] = round(row[f"{kind}/float32_us"] / row[f"{kind}/int8_us"], 2)
        out.append(row)
    return out


def _markdown(rows: List[dict], repeats: int, load: tuple) -> str:
    lines = ["# The gate's Mahalanobis pair per frame: float32 against int8 whiteners", "",
             "Command: `python -m bench.bench_whitener`. One frame (N = 1), C = 100 classes, mahalanobis and "
             "rel_mahalanobis from one projection (what the default gate computes), `_mahalanobis_family` on "
             f"prepared arrays; medians of {repeats} interleaved reps per variant, by this thread's CPU time (what "
             "other jobs take is left out; wall-clock medians in the .json); int8 product variant "
             f"`{framekernels.q8_isas()[0] if framekernels.q8_available() else 'none (numpy)'}`; numpy BLAS threads 1; "
             f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end (2 cores shared with other jobs).", "",
             "| F | float32 MiB (streamed) | int8 MiB (streamed) | dense: float32 µs | int8 µs | speed-up | "
             "relu (half zero): float32 µs | int8 µs | speed-up |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 1 / 1048576
    for r in rows:
        lines.append(f"| {r['F']} | {r['float32_bytes'] * mib:.1f} ({r['streamed_float32_bytes'] * mib:.1f}) | "
                     f"{r['int8_bytes'] * mib:.1f} ({(r['streamed_int8_bytes'] or 0) * mib:.1f}) | "
                     f"{r['dense/float32_us']} | {r['dense/int8_us']} | {r['dense_speedup']}x | "
                     f"{r['relu/float32_us']} | {r['relu/int8_us']} | {r['relu_speedup']}x |")
    lines += ["", "float32: the whiteners' nonzero row blocks through numpy's BLAS (the float path, unchanged); int8: "
              "per-row scaled int8 off-diagonal part and float32 diagonal, multiplied by edge_quq/csrc/whitener.c "
              "(its rows' nonzero prefixes, zero features skipped). Both then run the same distance kernel."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--sizes", default="576,960,1280,2048", show_default=True, help="Feature sizes F, comma-separated.")
@click.option("--repeats", default=300, show_default=True, type=click.IntRange(10))
@click.option("--out", "out_dir", default="bench/results", show_default=True, type=click.Path(file_okay=False))
def main(sizes: str, repeats: int, out_dir: str) -> None:
    rows = measure([int(s) for s in sizes.split(",") if s.strip()], repeats)
    load = os.getloadavg()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "whitener.json").write_text(json.dumps({"rows": rows, "repeats": repeats, "loadavg": load}, indent=1) + "\n")
    (out / "whitener.md").write_text(_markdown(rows, repeats, load))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
