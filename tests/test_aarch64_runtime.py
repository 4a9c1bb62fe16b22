"""The device path on the device's architecture: the whole runtime under qemu-aarch64 (Cortex-A72, the
Raspberry Pi 4 core) with the real aarch64 wheels of numpy, onnxruntime, ai-edge-litert and OpenCV.

tests/aarch64/setup_rootfs.sh builds the userland and unpacks the wheels once (cached). Emulated times say
nothing about a board; this checks correctness only: the same decisions as on this machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "edge_quq" / "data" / "samples"
CACHE = Path(os.environ.get("EDGE_QUQ_AARCH64_CACHE", Path.home() / ".cache" / "edge-quq-aarch64"))

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-aarch64-static") and shutil.which("debootstrap") and shutil.which("unshare")),
    reason="needs qemu-user-static, debootstrap and unshare (tests/run.sh installs them)",
)


@pytest.fixture(scope="module")
def aarch64_env() -> Path:
    # PYTHON: the test environment's interpreter has pip; a fresh machine's system python3 does not.
    r = subprocess.run(["bash", str(ROOT / "tests" / "aarch64" / "setup_rootfs.sh"), str(CACHE)], capture_output=True,
                       text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, f"setup_rootfs.sh failed:\n{r.stderr[-3000:]}"
    return CACHE


def run_emulated(cache: Path, *args: str) -> subprocess.CompletedProcess:
    # onnxruntime and LiteRT read /proc/cpuinfo and crash on the host's x86 one: give them an ARM one in a
    # private mount namespace (user namespace too when not root).
    inner = (
        f"mount --bind {cache}/cpuinfo /proc/cpuinfo && "
        f"PYTHONPATH={cache}/site:{ROOT} exec qemu-aarch64-static -cpu cortex-a72 -L {cache}/rootfs "
        f"{cache}/rootfs/usr/bin/python3.11 {ROOT}/tests/aarch64/run_cli.py " + " ".join(args)
    )
    ns = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    return subprocess.run([*ns, "sh", "-c", inner], capture_output=True, text=True, timeout=900)


def run_native(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_quq", *args], capture_output=True, text=True, timeout=300)


# TFLite's int8 kernels give bit-identical features on both ISAs. ONNX Runtime's MLAS picks different int8
# GEMM kernels per ISA (x86 u8s8 with 16-bit intermediate sums, ARM s8s8 NEON), so requantized activations
# may differ by a quantization step; the decisions must still agree.
TOLERANCE = {"tflite": 1e-4, "onnx": 0.02}


def test_emulated_python_is_aarch64(aarch64_env):
    inner = (f"exec qemu-aarch64-static -L {aarch64_env}/rootfs {aarch64_env}/rootfs/usr/bin/python3.11 "
             "-c 'import platform; print(platform.machine())'")
    out = subprocess.run(["sh", "-c", inner], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "aarch64", out.stderr


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_predict_on_aarch64_matches_x86(aarch64_env, backend):
    args = ["predict", str(SAMPLES), "--json", "--seed", "0", "--threads", "1", "--backend", backend, "--sampler", "numpy"]
    arm = run_emulated(aarch64_env, *args)
    assert arm.returncode == 0, arm.stderr[-2000:]
    x86 = run_native(*args)
    assert x86.returncode == 0, x86.stderr[-2000:]
    a = [json.loads(l) for l in arm.stdout.splitlines()]
    b = [json.loads(l) for l in x86.stdout.splitlines()]
    assert len(a) == len(b) >= 10
    for ra, rb in zip(a, b):
        assert (ra["decision"], ra["label"], ra["top_label"]) == (rb["decision"], rb["label"], rb["top_label"]), ra["source"]
        assert max(abs(x - y) for x, y in zip(ra["mean"], rb["mean"])) < TOLERANCE[backend]
    summary = json.loads(arm.stderr.strip().splitlines()[-1])["summary"]
    assert backend in summary["backend"]
