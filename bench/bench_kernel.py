"""The native head kernel against one core's float32 peak: executed GMAC/s per variant on the issue's head shapes.

    python bench/bench_kernel.py [--reps N] [--rounds R] [--out bench/results] [--baseline REV]

Peak: a C microbenchmark compiled here (gcc -O2, the variant's ISA flags) runs 12 independent FMA chains on
registers (no memory traffic) for ~50 ms; peak GMAC/s = lanes x FMAs / time, median of --rounds runs. That is
what one core can execute, measured in the same run as the kernel (the machine is shared, so clocks move).
Kernel: `_headkernel.moments` with its own PRNG at T = 50 on heads F in (2048, 1280, 64), H = 300,
C in (10, 100, 1000), p = (0.2, 0.4), with sparse features (ReLU: half are zero) and dense ones (swish-like:
none zero); the kernel reports the multiply-adds it executed (stats_out), so GMAC/s = executed MACs / median
call time. Rounds interleave peak and kernel measurements; the report gives medians over rounds of each round's
median. --baseline REV also builds the kernel as it was at git revision REV and times it in the same rounds.
Writes kernel.json and kernel.md into --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edge_quq import _headkernel  # noqa: E402

T = 50
SHAPES = [(2048, 300, 100), (2048, 300, 1000), (1280, 300, 10), (1280, 300, 100), (1280, 300, 1000),
          (64, 300, 10), (64, 300, 100)]

PEAK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <immintrin.h>
/* 12 independent FMA chains: more than latency (4-5 cycles) x pipes (2) so the FMA units never wait. */
int main(int argc, char **argv) {
    const long iters = atol(argv[1]);
    __m256 a[12], b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps((float)i);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long n = 0; n < iters; ++n)
        for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    float s = 0; for (int i = 0; i < 12; ++i) s += a[i][0];
    const double sec = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%.6f %.3f\n", iters * 12.0 * 8.0 / sec / 1e9, s);
    return 0;
}
"""


def build_peak(tmp: Path) -> Optional[Path]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # the microbenchmark is AVX2+FMA; on ARM state the peak from the core's datasheet instead
    src, exe = tmp / "peak.c", tmp / "peak"
    src.write_text(PEAK_C)
    subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", str(src), "-o", str(exe)], check=True)
    return exe


def peak_gmacs(exe: Path) -> float:
    out = subprocess.run([str(exe), "20000000"], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def build_baseline(rev: str, tmp: Path):
    """The kernel module as it was at `rev`, imported under another package name for same-run ratios."""
    src = tmp / "baseline"
    src.mkdir()
    for name in ("headkernel.c", "headkernel.h", "headkernel_module.c"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:edge_quq/csrc/{name}"], capture_output=True,
                              text=True, check=True).stdout
        (src / name).write_text(text)
    so = src / ("_headkernel" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O3", "-std=gnu11", "-fno-math-errno", "-shared", "-fPIC",
                    f"-I{sysconfig.get_paths()['include']}", str(src / "headkernel.c"), str(src / "headkernel_module.c"),
                    "-o", str(so)], check=True)
    spec = importlib.util.spec_from_file_location("eq_baseline._headkernel", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def head_arrays(f: int, h: int, c: int, dense: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    w0 = (rng.normal(size=(f, h)) * np.sqrt(2 / f)).astype(np.float32)
    w1 = (rng.normal(size=(h, c)) * np.sqrt(2 / h)).astype(np.float32)
    b0 = (rng.normal(size=h) * 0.1).astype(np.float32)
    b1 = (rng.normal(size=c) * 0.1).astype(np.float32)
    z = rng.normal(size=f)
    x = (z / (1 + np.exp(-z)) if dense else np.maximum(z, 0)).astype(np.float32)
    return x, w0, b0, w1, b1


def time_median(fn: Callable[[], object], reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def kernel_call(mod, arrays, isa: Optional[str], stats: Optional[np.ndarray]) -> Callable[[], object]:
    c = arrays[4].shape[0]
    mean, std, logits = np.empty(c), np.empty(c), np.empty(c, np.float32)
    kw = {"seed": 1}
    if isa is not None:
        kw["isa"] = isa
    if stats is not None:
        kw["stats_out"] = stats
    return lambda: mod.moments(*arrays, 0.2, 0.4, 1, T, mean, std, logits, **kw)


def run(reps: int, rounds: int, baseline: Optional[str]) -> dict:
    isas = [i for i in _headkernel.isas()]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        peak_exe = build_peak(tmp)
        base = build_baseline(baseline, tmp) if baseline else None
        cases = []
        for f, h, c in SHAPES:
            for dense in (False, True):
                arrays = head_arrays(f, h, c, dense)
                stats = np.zeros(1, np.int64)
                kernel_call(_headkernel, arrays, None, stats)()
                cases.append({"F": f, "H": h, "C": c, "features": "dense" if dense else "relu", "arrays": arrays,
                              "macs": int(stats[0]), "dense_macs": T * (f * h + h * c)})
        peaks: List[float] = []
        times: Dict[str, Dict[int, List[float]]] = {}
        for _ in range(rounds):
            if peak_exe:
                peaks.append(peak_gmacs(peak_exe))
            for ci, case in enumerate(cases):
                for isa in isas:
                    times.setdefault(isa, {}).setdefault(ci, []).append(
                        time_median(kernel_call(_headkernel, case["arrays"], isa, None), reps))
                if base is not None:
                    times.setdefault("baseline", {}).setdefault(ci, []).append(
                        time_median(kernel_call(base, case["arrays"], None, None), reps))
        peak = statistics.median(peaks) if peaks else None
        rows = []
        for ci, case in enumerate(cases):
            row = {k: v for k, v in case.items() if k != "arrays"}
            for name, per in times.items():
                t = statistics.median(per[ci])
                row[name] = {"us": round(t * 1e6, 1), "gmacs_executed": round(case["macs"] / t / 1e9, 2),
                             "gmacs_dense_equiv": round(case["dense_macs"] / t / 1e9, 2)}
                if peak:
                    row[name]["peak_fraction"] = round(case["macs"] / t / 1e9 / peak, 3)
            rows.append(row)
    return {"machine": {"cpu": _cpu_model(), "features": _headkernel.cpu_features(), "isas": isas,
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
            "peak_gmacs_1core": round(peak, 1) if peak else None, "peak_rounds": [round(p, 1) for p in peaks],
            "T": T, "reps": reps, "rounds": rounds, "baseline": baseline, "rows": rows}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(res: dict) -> str:
    names = res["machine"]["isas"] + (["baseline"] if res["baseline"] else [])
    best = res["machine"]["isas"][0]
    lines = ["# Native head kernel: executed GMAC/s against one core's float32 peak", "",
             "Generated by `python bench/bench_kernel.py` (" + f"{res['reps']} calls x {res['rounds']} rounds, "
             f"T = {res['T']}, p = (0.2, 0.4), own PRNG); CPU {res['machine']['cpu']}, features "
             f"{res['machine']['features']}, load average at the end {res['machine']['load_average']}.", ""]
    if res["peak_gmacs_1core"]:
        lines += [f"**Peak: {res['peak_gmacs_1core']} GMAC/s** on one core: an AVX2 microbenchmark (12 independent "
                  "`vfmadd` chains on registers, 8 float32 lanes each), median of the rounds "
                  f"{res['peak_rounds']}, measured in the same run as the kernel.", ""]
    head = "| F | H | C | features | executed MMAC | " + " | ".join(f"{n} µs / GMAC/s" for n in names)
    head += f" | {best} % of peak |" + (f" {best} speed-up vs baseline |" if res["baseline"] else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        cells = [str(r["F"]), str(r["H"]), str(r["C"]), r["features"], f"{r['macs'] / 1e6:.2f}"]
        cells += [f"{r[n]['us']:.0f} / {r[n]['gmacs_executed']:.1f}" for n in names]
        cells.append(f"{100 * r[best].get('peak_fraction', float('nan')):.0f}%")
        if res["baseline"]:
            cells.append(f"{r['baseline']['us'] / r[best]['us']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Executed MACs are counted by the kernel itself: the rows it gathers (a sample's dropped or kept "
              "units with a nonzero coefficient, whichever set is smaller, plus the eval-mode pass) times the row "
              "length. A dense masked evaluation would do T x (F x H + H x C)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default=None, help="git revision whose kernel is timed alongside")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    res = run(args.reps, args.rounds, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "kernel.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
