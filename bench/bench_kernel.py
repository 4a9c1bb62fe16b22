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
Also times numpy's float32 sgemm (one BLAS thread) in every round: the share of a tuned matrix product's speed.
The int8 variants (neon_sdot, ARMv8.2) cannot be timed on x86; the table holds the variants this CPU runs.
Writes kernel.json and kernel.md into --out.
"""
from __future__ import annotations

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
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.blas_threads import BLAS_THREADS  # noqa: E402,F401  (one BLAS thread for the eval pass, before numpy)

import click  # noqa: E402
import numpy as np  # noqa: E402

from edge_quq import _headkernel  # noqa: E402
from edge_quq.head import HeadWeights  # noqa: E402

T = 50
SHAPES = [(2048, 300, 100), (2048, 300, 1000), (1280, 300, 10), (1280, 300, 100), (1280, 300, 1000),
          (64, 300, 10), (64, 300, 100)]

PEAK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <immintrin.h>
/* 12 independent FMA chains held in registers: more than latency (4-5 cycles) x pipes (2), so the FMA units
 * never wait, and no memory traffic. Prints GMAC/s by thread CPU time and by wall time. */
#define F12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECL(i) __m256 a##i = _mm256_set1_ps((float)i);
#define STEP(i) a##i = _mm256_fmadd_ps(a##i, b, c);
#define SUM(i) s += a##i[0];
static double secs(clockid_t id) { struct timespec t; clock_gettime(id, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char **argv) {
    const long iters = atol(argv[1]);
    const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    F12(DECL)
    const double c0 = secs(CLOCK_THREAD_CPUTIME_ID), w0 = secs(CLOCK_MONOTONIC);
    for (long n = 0; n < iters; ++n) { F12(STEP) __asm__ volatile("" ::: "memory"); }
    const double c1 = secs(CLOCK_THREAD_CPUTIME_ID), w1 = secs(CLOCK_MONOTONIC);
    float s = 0; F12(SUM)
    const double macs = iters * 12.0 * 8.0;
    printf("%.3f %.3f %g\n", macs / (c1 - c0) / 1e9, macs / (w1 - w0) / 1e9, s);
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


def peak_gmacs(exe: Path) -> Tuple[float, float]:
    """(by thread CPU time, by wall time) GMAC/s of ~50 ms of register-only FMAs."""
    out = subprocess.run([str(exe), "5000000"], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def build_baseline(rev: str, tmp: Path):
    """The kernel module as it was at `rev`, imported under another package name for same-run ratios."""
    src = tmp / "baseline"
    src.mkdir()
    sources = []
    # every C source and header of the revision: the module's file list grew over time (analytic.c, frame.c,
    # whitener.c, rowdot.c), and a fixed list broke the baseline build each time. gatekernel.c is its own module.
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:edge_quq/csrc"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if not name.endswith((".c", ".h")) or name == "gatekernel.c":
            continue
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:edge_quq/csrc/{name}"], capture_output=True,
                              text=True, check=True).stdout
        (src / name).write_text(text)
        if name.endswith(".c"):
            sources.append(str(src / name))
    so = src / ("_headkernel" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O3", "-std=gnu11", "-fno-math-errno", "-shared", "-fPIC",
                    f"-I{sysconfig.get_paths()['include']}", *sources, "-lm", "-o", str(so)], check=True)
    spec = importlib.util.spec_from_file_location("eq_baseline._headkernel", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def sgemm_gmacs(n: int = 512, reps: int = 20) -> float:
    """GMAC/s of numpy's float32 matrix product (OpenBLAS sgemm, one thread: bench.blas_threads) on n x n
    matrices, by thread CPU time, median of reps: what tuned code reaches on this core with real memory traffic."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
    cpu, _ = time_median(lambda: a @ b, reps)
    return n ** 3 / cpu / 1e9


def head_arrays(f: int, h: int, c: int, dense: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    w0 = (rng.normal(size=(f, h)) * np.sqrt(2 / f)).astype(np.float32)
    w1 = (rng.normal(size=(h, c)) * np.sqrt(2 / h)).astype(np.float32)
    b0 = (rng.normal(size=h) * 0.1).astype(np.float32)
    b1 = (rng.normal(size=c) * 0.1).astype(np.float32)
    z = rng.normal(size=f)
    x = (z / (1 + np.exp(-z)) if dense else np.maximum(z, 0)).astype(np.float32)
    return x, w0, b0, w1, b1


def time_median(fn: Callable[[], object], reps: int) -> Tuple[float, float]:
    """Median (thread CPU time, wall time) of reps calls, after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def kernel_call(mod, arrays, isa: Optional[str], stats: Optional[np.ndarray]) -> Callable[[], object]:
    c = arrays[4].shape[0]
    mean, std, logits = np.empty(c), np.empty(c), np.empty(c, np.float32)
    kw = {"seed": 1}
    if isa is not None:
        kw["isa"] = isa
    if stats is not None:
        kw["stats_out"] = stats
    return lambda: mod.moments(*arrays, 0.2, 0.4, 1, T, mean, std, logits, **kw)


def analytic_call(arrays) -> Callable[[], object]:
    c = arrays[4].shape[0]
    mean, std, logits = np.empty(c), np.empty(c), np.empty(c, np.float32)
    return lambda: _headkernel.analytic_moments(*arrays, 0.2, 0.4, 1, 1.0, mean, std, logits)


def eval_call(arrays) -> Callable[[], object]:
    """One eval-mode head pass as the plain path runs it: edge_quq.head.HeadWeights.logits (numpy, 1 BLAS thread)."""
    x, w0, b0, w1, b1 = arrays
    head = HeadWeights(kernels=(w0, w1), biases=(b0, b1), rates=(0.2, 0.4), activation="sigmoid")
    return lambda: head.logits(x[None])


def make_cases(isas: List[str]) -> List[dict]:
    """Every case with the MACs each variant executes: an int8 variant (neon_sdot) runs layer 1 densely, so its
    count differs; "macs" is the float variants' (the first float one in the list)."""
    float_isa = next(i for i in isas if not _headkernel.is_int8(i))
    cases = []
    for f, h, c in SHAPES:
        for dense in (False, True):
            arrays = head_arrays(f, h, c, dense)
            macs = {}
            for isa in isas:
                stats = np.zeros(1, np.int64)
                kernel_call(_headkernel, arrays, isa, stats)()
                macs[isa] = int(stats[0])
            cases.append({"F": f, "H": h, "C": c, "features": "dense" if dense else "relu", "arrays": arrays,
                          "macs": macs[float_isa], "macs_by_isa": macs, "dense_macs": T * (f * h + h * c)})
    return cases


def run(reps: int, rounds: int, baseline: Optional[str]) -> dict:
    isas = list(_headkernel.isas())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        peak_exe = build_peak(tmp)
        base = build_baseline(baseline, tmp) if baseline else None
        cases = make_cases(isas)
        calls: Dict[str, Callable[[dict], Callable[[], object]]] = {
            isa: (lambda case, isa=isa: kernel_call(_headkernel, case["arrays"], isa, None)) for isa in isas}
        if base is not None:
            calls["baseline"] = lambda case: kernel_call(base, case["arrays"], None, None)
        calls["analytic"] = lambda case: analytic_call(case["arrays"])
        calls["eval"] = lambda case: eval_call(case["arrays"])
        peaks: List[Tuple[float, float]] = []
        sgemm: List[float] = []
        times: Dict[str, Dict[int, List[Tuple[float, float]]]] = {name: {} for name in calls}
        # Rounds interleave everything, so that a busy spell of the shared machine hits all columns alike.
        for _ in range(rounds):
            if peak_exe:
                peaks.append(peak_gmacs(peak_exe))
            sgemm.append(sgemm_gmacs())
            for ci, case in enumerate(cases):
                for name, make in calls.items():
                    times[name].setdefault(ci, []).append(time_median(make(case), reps))
    peak_cpu = statistics.median(p[0] for p in peaks) if peaks else None
    peak_wall = statistics.median(p[1] for p in peaks) if peaks else None
    rows = []
    for ci, case in enumerate(cases):
        row = {k: v for k, v in case.items() if k not in ("arrays", "macs_by_isa")}
        for name, per in times.items():
            cpu = statistics.median(t[0] for t in per[ci])
            wall = statistics.median(t[1] for t in per[ci])
            row[name] = {"cpu_us": round(cpu * 1e6, 1), "wall_us": round(wall * 1e6, 1)}
            if name not in ("analytic", "eval"):
                macs = case["macs_by_isa"].get(name, case["macs"])
                row[name]["gmacs_executed"] = round(macs / cpu / 1e9, 2)
                row[name]["gmacs_dense_equiv"] = round(case["dense_macs"] / cpu / 1e9, 2)
                if peak_cpu:
                    row[name]["peak_fraction"] = round(macs / cpu / 1e9 / peak_cpu, 3)
                row[name]["sgemm_fraction"] = round(macs / cpu / 1e9 / statistics.median(sgemm), 3)
        rows.append(row)
    return {"machine": {"cpu": _cpu_model(), "features": _headkernel.cpu_features(), "isas": isas,
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
            "peak_gmacs_1core_cpu_time": round(peak_cpu, 1) if peak_cpu else None,
            "peak_gmacs_1core_wall_time": round(peak_wall, 1) if peak_wall else None,
            "peak_rounds": [[round(a, 1), round(b, 1)] for a, b in peaks],
            "sgemm_gmacs_1core_cpu_time": round(statistics.median(sgemm), 1),
            "sgemm_rounds": [round(v, 1) for v in sgemm],
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
    isas = res["machine"]["isas"]
    best = isas[0]
    names = isas + (["baseline"] if res["baseline"] else [])
    lines = ["# Native head kernel: executed GMAC/s against one core's float32 peak", "",
             f"Generated by `python bench/bench_kernel.py --baseline {res['baseline']}` ({res['reps']} calls x "
             f"{res['rounds']} interleaved rounds, T = {res['T']}, p = (0.2, 0.4), the kernel's own PRNG); CPU "
             f"{res['machine']['cpu']}, features {res['machine']['features']}, load average at the end "
             f"{res['machine']['load_average']} (2 cores shared by several sessions).", ""]
    if res["peak_gmacs_1core_cpu_time"]:
        lines += [f"**Peak: {res['peak_gmacs_1core_cpu_time']} GMAC/s** on one core (by thread CPU time; "
                  f"{res['peak_gmacs_1core_wall_time']} by wall time): a C microbenchmark of 12 independent AVX2 "
                  "`vfmadd` chains on registers (8 float32 lanes each, 2 FMA pipes), ~50 ms per round, median of the "
                  f"rounds (CPU, wall) {res['peak_rounds']}. Every time below is a thread-CPU-time median as well, "
                  "so that the share of the core other sessions took does not count against either side.", ""]
    lines += [f"**sgemm: {res['sgemm_gmacs_1core_cpu_time']} GMAC/s**: numpy's float32 512 x 512 matrix product "
              "(OpenBLAS, one thread, thread CPU time, median of 20 calls per round, median of the rounds "
              f"{res['sgemm_rounds']}): what tuned code with real loads reaches on this core.", ""]
    head = "| F | C | features | executed MMAC | " + " | ".join(f"{n} µs / GMAC/s" for n in names)
    head += f" | {best} % of peak | {best} % of sgemm |" + (" speed-up vs baseline |" if res["baseline"] else "")
    head += " eval pass µs | analytic µs | analytic / (2 eval + 20 µs) |"
    lines += ["H = 300 everywhere.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        cells = [str(r["F"]), str(r["C"]), r["features"], f"{r['macs'] / 1e6:.2f}"]
        cells += [f"{r[n]['cpu_us']:.0f} / {r[n]['gmacs_executed']:.1f}" for n in names]
        cells.append(f"{100 * r[best].get('peak_fraction', float('nan')):.0f}%")
        cells.append(f"{100 * r[best]['sgemm_fraction']:.0f}%")
        if res["baseline"]:
            cells.append(f"{r['baseline']['cpu_us'] / r[best]['cpu_us']:.2f}x")
        ev, an = r["eval"]["cpu_us"], r["analytic"]["cpu_us"]
        cells += [f"{ev:.0f}", f"{an:.0f}", f"{an / (2 * ev + 20):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Executed MACs are counted by the kernel itself (`stats_out`): the rows it gathers (a sample's "
              "dropped or kept units with a nonzero coefficient, whichever set is smaller, plus the eval-mode pass) "
              "times the row length. A dense masked evaluation would do T x (F x H + H x C). The eval pass is "
              "`HeadWeights.logits` (numpy, one BLAS thread), what the plain path runs; the analytic column is "
              "`_headkernel.analytic_moments` (sigmoid head)."]
    int8 = [n for n in isas if _headkernel.is_int8(n)]
    if int8:
        lines += ["", f"{', '.join(int8)} run layer 1 in int8, densely over the nonzero rows: their GMAC/s count the "
                  "int8 multiply-adds they execute (more than the float variants' MMAC column)."]
    return "\n".join(lines) + "\n"


@click.command(help=__doc__.splitlines()[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--reps", type=int, default=30, show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--baseline", default=None, help="git revision whose kernel is timed alongside")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "bench" / "results", show_default=True)
def main(reps: int, rounds: int, baseline: Optional[str], out: Path) -> None:
    res = run(reps, rounds, baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "kernel.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
