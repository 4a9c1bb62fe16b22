"""The head kernel's NEON path on aarch64: the kernel C file and a small C driver (tests/csrc/headkernel_driver.c),
cross-compiled static and run under qemu-aarch64-static, against expected outputs generated here with numpy.

`-cpu cortex-a72` is the Raspberry Pi 4 core (ARMv8.0, no dot product); `-cpu cortex-a76` (Pi 5) and `-cpu max`
have dot product, which the kernel must detect at run time (HWCAP_ASIMDDP) and then lead with the int8 variant
'neon_sdot' (checked against numpy within the int8 tolerance, against its plain C reference 'scalar_i8' within
float32 rounding, and on the keep/ignore decision against the float NEON kernel). The dispatch is also run as a pure
function on the A72's and A76's /proc/cpuinfo texts (`--cpuinfo`). The same driver also runs natively (x86
variants, no Python).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_quq.samplers.analytic import logit_moments, output_moments
from edge_quq.head import HeadWeights
from edge_quq.samplers.reference import NumpySampler
from heads import int8_tolerance

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "edge_quq" / "csrc" / "headkernel.c", ROOT / "edge_quq" / "csrc" / "analytic.c",
           ROOT / "tests" / "csrc" / "headkernel_driver.c"]
ACT = {"linear": 0, "sigmoid": 1, "softmax": 2}
# (F, H, C, T, rates, activation): odd sizes hit every SIMD tail; T > 64 crosses a chunk.
SHAPES = [
    (1, 1, 1, 1, (0.0, 0.0), "sigmoid"),
    (3, 5, 2, 7, (0.2, 0.4), "softmax"),
    (7, 17, 10, 64, (0.5, 0.5), "sigmoid"),
    (16, 64, 3, 65, (0.7, 0.1), "linear"),
    (33, 9, 100, 20, (0.0, 0.6), "softmax"),
    (128, 300, 10, 130, (0.2, 0.4), "sigmoid"),
    (1280, 64, 100, 30, (0.3, 0.0), "softmax"),
    (2048, 300, 100, 50, (0.2, 0.4), "sigmoid"),
]
ATOL = 2e-5


# The keep/ignore decision of the int8 variants against the float reference: many small heads with real-looking
# outputs (He-scaled weights, half-zero features), decided as the default policy does (z = 0.8, threshold 0.5).
DECISION_SHAPES = [(256, 64, 10, 50, (0.2, 0.4), ("sigmoid", "softmax")[i % 2]) for i in range(64)]
DECISION_AGREEMENT = 0.95


def write_cases(path: Path, shapes=SHAPES) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(struct.pack("<i", len(shapes)))
        for f, h, c, t, rates, act in shapes:
            head = HeadWeights(
                kernels=((rng.normal(size=(f, h)) * np.sqrt(2 / f)).astype(np.float32),
                         (rng.normal(size=(h, c)) * np.sqrt(2 / h)).astype(np.float32)),
                biases=((rng.normal(size=h) * 0.1).astype(np.float32), (rng.normal(size=c) * 0.1).astype(np.float32)),
                rates=rates,
                activation=act,
            )
            x = (np.maximum(rng.normal(size=f), 0) * 2).astype(np.float32)
            masks = [(rng.random((t, n)) >= p).astype(np.float32) if p > 0 else np.ones((t, n), np.float32)
                     for n, p in ((f, rates[0]), (h, rates[1]))]
            probs = head.probs(np.broadcast_to(x, (t, f)), masks).astype(np.float32)
            mom = NumpySampler(head).sample_with_masks(x, masks)
            out.write(struct.pack("<5i5d", f, h, c, t, ACT[act], rates[0], rates[1], ATOL, *int8_tolerance(mom.mean, act)))
            for a in (x, head.kernels[0], head.biases[0], head.kernels[1], head.biases[1]):
                out.write(np.ascontiguousarray(a, "<f4").tobytes())
            for m in masks:
                out.write(m.astype(np.uint8).tobytes())
            out.write(np.ascontiguousarray(probs, "<f4").tobytes())
            out.write(np.ascontiguousarray(mom.mean, "<f8").tobytes())
            out.write(np.ascontiguousarray(mom.std, "<f8").tobytes())
            # The closed form's numpy reference (edge_quq.samplers.analytic), for the C port in analytic.c.
            mu, var = logit_moments(head, x)
            a_mean, a_std, a_ent = output_moments(mu, var, act)
            out.write(np.ascontiguousarray(a_mean, "<f8").tobytes() + np.ascontiguousarray(a_std, "<f8").tobytes())
            out.write(struct.pack("<d", a_ent))


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("headkernel") / "cases.bin"
    write_cases(path)
    return path


def build(cc: str, out: Path, *flags: str, sources=SOURCES) -> None:
    """Compile the kernel sources with a test driver (tests/csrc) into out."""
    cmd = [cc, "-O2", "-std=gnu11", *flags, f"-I{ROOT / 'edge_quq' / 'csrc'}", f"-I{ROOT / 'tests' / 'csrc'}",
           *map(str, sources), "-lm", "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_driver_natively(cases_file, tmp_path):
    exe = tmp_path / "driver"
    build("gcc", exe)
    res = subprocess.run([str(exe), str(cases_file)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "failures=0" in res.stdout and "scalar" in res.stdout


CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64-static")


@pytest.fixture(scope="module")
def arm_driver(tmp_path_factory) -> Path:
    if not (CROSS and QEMU):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static (apt-get install gcc-aarch64-linux-gnu qemu-user-static)")
    exe = tmp_path_factory.mktemp("arm") / "driver"
    # ARMv8.0 baseline (the Pi 4's Cortex-A72): no -march beyond the default, dot product detected at run time.
    build(CROSS, exe, "-static")
    return exe


@pytest.mark.parametrize("cpu,dotprod", [("cortex-a72", False), ("cortex-a76", True), ("max", True)])
def test_neon_kernel_under_qemu(arm_driver, cases_file, cpu, dotprod):
    # With the dot product the int8 variant leads and is checked with the others (int8 tolerance against numpy,
    # float32 rounding against scalar_i8); without it, it must not be offered.
    res = subprocess.run([QEMU, "-cpu", cpu, str(arm_driver), str(cases_file)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = res.stdout.strip().splitlines()[-1]
    variants = "neon_sdot,neon,scalar" if dotprod else "neon,scalar"
    assert f"variants={variants} " in summary and "failures=0" in summary, summary
    assert ("asimddp" in summary) == dotprod, summary


def decisions(path: Path, shapes) -> list:
    """Keep/ignore per case from a driver dump (mean[C], std[C] per case) with the default rule."""
    from edge_quq.decision import decide

    raw, pos, out = path.read_bytes(), 0, []
    for _, _, c, _, _, _ in shapes:
        mean = np.frombuffer(raw, "<f8", c, pos)
        std = np.frombuffer(raw, "<f8", c, pos + 8 * c)
        pos += 16 * c
        out.append(bool(decide(mean, std, 0.8, 0.5).keep))
    return out


def test_sdot_keeps_the_float_decisions_under_qemu(arm_driver, tmp_path):
    cases = tmp_path / "decision_cases.bin"
    write_cases(cases, DECISION_SHAPES)
    got = {}
    for variant in ("neon_sdot", "neon"):
        dump = tmp_path / f"{variant}.bin"
        res = subprocess.run([QEMU, "-cpu", "max", str(arm_driver), str(cases), "--dump", variant, str(dump)],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        got[variant] = decisions(dump, DECISION_SHAPES)
    agree = np.mean([a == b for a, b in zip(got["neon_sdot"], got["neon"])])
    assert agree >= DECISION_AGREEMENT, agree


def test_a_build_without_sdot_falls_back_to_neon(cases_file, tmp_path):
    # What an aarch64 compiler without the dot-product intrinsics builds (EQ_NO_SDOT takes the same branch): the
    # float variants only, even on a CPU that has the instructions.
    if not (CROSS and QEMU):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    exe = tmp_path / "driver_nosdot"
    build(CROSS, exe, "-static", "-DEQ_NO_SDOT")
    res = subprocess.run([QEMU, "-cpu", "max", str(exe), str(cases_file)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = res.stdout.strip().splitlines()[-1]
    assert "features=asimd,asimddp variants=neon,scalar " in summary and "failures=0" in summary, summary


# /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72, part 0xd08) and a Raspberry Pi 5 (Cortex-A76, part 0xd0b).
CPUINFO = {
    "a72": "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
           "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n",
    "a76": "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
           "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n",
}


@pytest.mark.parametrize("board,features", [("a72", "asimd"), ("a76", "asimd,asimddp")])
def test_dispatch_from_an_arm_cpuinfo(arm_driver, tmp_path, board, features):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO[board])
    res = subprocess.run([QEMU, "-cpu", "max", str(arm_driver), "--cpuinfo", str(info)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    # The Pi 4 gets the float NEON kernel, the Pi 5 the int8 dot-product one first.
    variants = "neon_sdot,neon,scalar" if "asimddp" in features else "neon,scalar"
    assert res.stdout.strip() == f"features={features} variants={variants}"


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_dispatch_from_this_machines_cpuinfo_matches_the_runtime(cases_file, tmp_path):
    from edge_quq.samplers import native as sampler_native

    exe = tmp_path / "driver"
    build("gcc", exe)
    res = subprocess.run([str(exe), "--cpuinfo", "/proc/cpuinfo"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    if sampler_native.available():
        assert res.stdout.split()[1] == "variants=" + ",".join(sampler_native.kernel_isas())
