"""The kNN and ViM kernels' NEON variant on aarch64 (int8 and float32 banks and null spaces): edge_quq/csrc/rowdot.c
(with whitener.c, whose variant choice it shares) and a small C driver (tests/csrc/rowdot_driver.c), cross-compiled
static and run under qemu-aarch64-static (`-cpu cortex-a72`, the Pi 4's ARMv8.0 core, and `-cpu max`), against numpy's
references (detectors._knn_kth_numpy, _vim_resid_numpy) within tests/test_knn_vim_kernels.py's tolerances
(framekernels.DOT_RTOL); the same driver natively runs the x86 variants without Python.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_quq import framekernels
from edge_quq.detectors import _dequantized_bank, _knn_kth_numpy, _vim_null_space, _vim_resid_numpy
from test_knn_vim_kernels import KNN_CASES, VIM_CASES, kth_tolerance, knn_case, resid_tolerance, vim_arrays, vim_case
from test_native_aarch64 import build

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "edge_quq" / "csrc"
SOURCES = [CSRC / "rowdot.c", CSRC / "whitener.c", ROOT / "tests" / "csrc" / "rowdot_driver.c"]
CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64-static")
NUM_CASES = 2 * len(KNN_CASES) + 2 * len(VIM_CASES)


def _write_knn(out, i: int, n: int, f: int, b: int, k: int, int8: bool) -> None:
    x, bank, scale = knn_case(i, n, f, b, int8)
    ref = _dequantized_bank({"bank": bank, "bank.scale": np.array([scale])})
    out.write(struct.pack("<6if", 0, n, f, b, k, int(int8), scale))
    for a, dt in ((bank, "i1" if int8 else "<f4"), (x, "<f4"), (_knn_kth_numpy(x, ref, k), "<f4"),
                  (kth_tolerance(x, ref), "<f4")):
        out.write(np.ascontiguousarray(a, dt).tobytes())


def _write_vim(out, i: int, n: int, f: int, d: int, int8: bool) -> None:
    x, origin, ns, scale = vim_case(i, n, f, d, int8)
    a = vim_arrays(origin, ns, scale)
    out.write(struct.pack("<5i", 1, n, f, d, int(int8)))
    arrs = [(x, "<f4"), (origin, "<f4"), (ns.T, "i1" if int8 else "<f4")] + ([(scale, "<f4")] if int8 else [])
    for v, dt in arrs + [(_vim_resid_numpy(a, x), "<f8"), (resid_tolerance(x, origin, _vim_null_space(a)), "<f8")]:
        out.write(np.ascontiguousarray(v, dt).tobytes())


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rowdot") / "cases.bin"
    with open(path, "wb") as out:
        out.write(struct.pack("<i", NUM_CASES))
        for i, case in enumerate(KNN_CASES):
            for int8 in (True, False):
                _write_knn(out, i, *case, int8)
        for i, case in enumerate(VIM_CASES):
            for int8 in (True, False):
                _write_vim(out, i, *case, int8)
    return path


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
