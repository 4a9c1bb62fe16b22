"""The int8 whitener product's NEON variant on aarch64: edge_quq/csrc/whitener.c and a small C driver
(tests/csrc/whitener_driver.c), cross-compiled static and run under qemu-aarch64-static (`-cpu cortex-a72`, the
Pi 4's ARMv8.0 core, and `-cpu max`), against numpy's reference (detectors._project_q8_numpy) within
framekernels.Q8_RTOL of sum_i |x_i W_ik|; the same driver natively runs the x86 variants without Python.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_quq import framekernels
from edge_quq.detectors import _project_q8_numpy
from test_native_aarch64 import build
from test_whitener import q8_case

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "edge_quq" / "csrc" / "whitener.c", ROOT / "tests" / "csrc" / "whitener_driver.c"]
# (N, F, S, lower-triangular): SIMD tails (F not a multiple of 16), the 4-row groups' remainders, full matrices
CASES = [(1, 1, 1, True), (2, 3, 2, True), (3, 17, 1, True), (1, 33, 2, False), (4, 100, 2, True),
         (1, 576, 2, True), (2, 1280, 1, True)]
CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64-static")


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("whitener") / "cases.bin"
    with open(path, "wb") as out:
        out.write(struct.pack("<i", len(CASES)))
        for i, (n, f, s, tri) in enumerate(CASES):
            x, q, scale, diag = q8_case(f, s, i, tri, n=n)
            m = framekernels.pack_q8(q, scale, diag)
            want = _project_q8_numpy(x, q, scale, diag)
            w = np.abs(_project_q8_numpy(np.eye(f, dtype=np.float32), q, scale, diag)).astype(np.float64)
            tol = framekernels.Q8_RTOL * (np.abs(x).astype(np.float64) @ w) + 1e-30
            out.write(struct.pack("<3iq", n, f, s, m.q.size))
            for a, dt in ((m.q, "i1"), (m.off, "<i8"), (m.scale, "<f4"), (m.diag, "<f4"), (x, "<f4"), (want, "<f4"),
                          (tol, "<f4")):
                out.write(np.ascontiguousarray(a, dt).tobytes())
    return path


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_driver_natively(cases_file, tmp_path):
    exe = tmp_path / "driver"
    build("gcc", exe, sources=SOURCES)
    res = subprocess.run([str(exe), str(cases_file)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("variants=" + ",".join(framekernels.q8_isas()) + " ") and last.endswith(" failures=0"), last


@pytest.mark.skipif(not (CROSS and QEMU), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
@pytest.mark.parametrize("cpu", ["cortex-a72", "max"])
def test_neon_variant_under_qemu(cases_file, tmp_path, cpu):
    exe = tmp_path / "driver"
    build(CROSS, exe, "-static", sources=SOURCES)  # ARMv8.0 baseline: NEON is part of it, no run-time choice needed
    res = subprocess.run([QEMU, "-cpu", cpu, str(exe), str(cases_file)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("variants=neon,scalar cases=7 failures=0"), res.stdout
