"""The kNN and ViM kernels' NEON variant on aarch64 (int8, float16 and float32 banks and null spaces; float16 also
bit-identical to its float32 widening): edge_quq/csrc/rowdot.c
(with whitener.c, whose variant choice it shares) and a small C driver (tests/csrc/rowdot_driver.c), cross-compiled
static and run under qemu-aarch64-static (`-cpu cortex-a72`, the Pi 4's ARMv8.0 core, and `-cpu max`), against numpy's
references (detectors._knn_kth_numpy, _vim_resid_numpy) within tests/test_knn_vim_kernels.py's tolerances
(framekernels.DOT_RTOL); the same driver natively runs the x86 variants without Python.
"""
from __future__ import annotations

import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_quq import framekernels
from edge_quq.detectors import _dequantized_bank, _knn_kth_numpy, _vim_null_space, _vim_resid_numpy
from test_knn_vim_kernels import (KNN_CASES, VIM_CASES, _f16_rows, kth_tolerance, knn_case, resid_tolerance, vim_arrays,
                                  vim_case)
from test_native_aarch64 import build

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "edge_quq" / "csrc"
SOURCES = [CSRC / "rowdot.c", CSRC / "whitener.c", ROOT / "tests" / "csrc" / "rowdot_driver.c"]
CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64-static")
QEMU_X86 = shutil.which("qemu-x86_64-static")
# the driver's W types (rowdot.h): float32, int8, float16
TYPES = (0, 1, 2)
NUM_CASES = len(TYPES) * (len(KNN_CASES) + len(VIM_CASES))
_DT = {0: "<f4", 1: "i1", 2: "<f2"}


def _write_knn(out, i: int, n: int, f: int, b: int, k: int, ty: int) -> None:
    x, bank, scale = knn_case(i, n, f, b, ty == 1)
    if ty == 2:
        bank = _f16_rows(bank)
    ref = _dequantized_bank({"bank": bank, "bank.scale": np.array([scale])})
    out.write(struct.pack("<6if", 0, n, f, b, k, ty, scale))
    wide = [(ref, "<f4")] if ty == 2 else []
    for a, dt in [(bank, _DT[ty])] + wide + [(x, "<f4"), (_knn_kth_numpy(x, ref, k), "<f4"), (kth_tolerance(x, ref), "<f4")]:
        out.write(np.ascontiguousarray(a, dt).tobytes())


def _write_vim(out, i: int, n: int, f: int, d: int, ty: int) -> None:
    x, origin, ns, scale = vim_case(i, n, f, d, ty == 1)
    if ty == 2:
        ns = _f16_rows(ns).astype(np.float32)  # the widening: the reference's values and the driver's float32 twin
    a = vim_arrays(origin, ns, scale)
    out.write(struct.pack("<5i", 1, n, f, d, ty))
    arrs = [(x, "<f4"), (origin, "<f4"), (ns.T, _DT[ty])] + ([(ns.T, "<f4")] if ty == 2 else [])
    arrs += [(scale, "<f4")] if ty == 1 else []
    for v, dt in arrs + [(_vim_resid_numpy(a, x), "<f8"), (resid_tolerance(x, origin, _vim_null_space(a)), "<f8")]:
        out.write(np.ascontiguousarray(v, dt).tobytes())


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rowdot") / "cases.bin"
    with open(path, "wb") as out:
        out.write(struct.pack("<i", NUM_CASES))
        for i, case in enumerate(KNN_CASES):
            for ty in TYPES:
                _write_knn(out, i, *case, ty)
        for i, case in enumerate(VIM_CASES):
            for ty in TYPES:
                _write_vim(out, i, *case, ty)
    return path


def test_an_x86_cpu_without_f16c_refuses_float16_in_avx2_fma(cases_file, tmp_path):
    """The x86 build under qemu-x86_64-static with F16C off: avx2_fma still runs float32 and int8, refuses float16
    (the driver counts a float16 case it accepts as a failure), and scalar reads it."""
    if not (QEMU_X86 and shutil.which("gcc")) or platform.machine() != "x86_64":
        pytest.skip("needs an x86_64 host with gcc and qemu-x86_64-static")
    exe = tmp_path / "driver"
    build("gcc", exe, "-static", sources=SOURCES)
    res = subprocess.run([QEMU_X86, "-cpu", "max,-f16c", str(exe), str(cases_file)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"variants=avx2_fma,scalar cases={NUM_CASES} failures=0", res.stdout


@pytest.mark.parametrize("cpu", [None, "cortex-a72", "max"])
def test_every_variant_matches_numpy(cases_file, tmp_path, cpu):
    """cpu None: this machine's variants, natively; else the aarch64 build under qemu with that -cpu."""
    if cpu is None and not shutil.which("gcc"):
        pytest.skip("needs gcc")
    if cpu is not None and not (CROSS and QEMU):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    exe = tmp_path / "driver"
    # aarch64: ARMv8.0 baseline, NEON is part of it (no run-time choice needed)
    build("gcc", exe, sources=SOURCES) if cpu is None else build(CROSS, exe, "-static", sources=SOURCES)
    cmd = [str(exe), str(cases_file)] if cpu is None else [QEMU, "-cpu", cpu, str(exe), str(cases_file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    isas = "neon,scalar" if cpu else ",".join(framekernels.dots_isas()) if framekernels.dots_available() else None
    last = res.stdout.strip().splitlines()[-1]
    assert isas is None or last == f"variants={isas} cases={NUM_CASES} failures=0", res.stdout
    assert last.endswith(" failures=0"), last
