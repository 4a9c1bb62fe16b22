"""The native kernel must be built wherever a C compiler is present.

test_native.py skips itself when edge_quq._headkernel is missing (a board without a compiler still runs the
numpy sampler), which would hide a broken build on CI. `pip install -e .` builds the extension in place
(setup.py, optional=True), so on a machine with a compiler its absence is a failure, not a skip.
"""
from __future__ import annotations

import platform
import shutil

import pytest

from edge_quq.samplers import native as sampler_native


def test_extension_is_built_where_a_compiler_exists():
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler here: the extension is optional and the numpy sampler is used")
    assert sampler_native.available(), (
        "edge_quq._headkernel is not built although a C compiler exists: reinstall with `pip install -e .` "
        "(or `python setup.py build_ext --inplace`) and read the compiler errors")
    isas = sampler_native.kernel_isas()
    assert isas[-1] == "scalar"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        assert "sse2" in isas
    elif machine in ("aarch64", "arm64"):
        assert "neon" in isas
