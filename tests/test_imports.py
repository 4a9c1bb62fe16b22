"""No import circles in edge_quq: every module imports alone in a fresh interpreter.

A circle shows up as an ImportError (partially initialised module) when the module that closes it is the
first one imported; importing each module first, on its own, catches every such order.
"""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import edge_quq

MODULES = sorted(m.name for m in pkgutil.walk_packages(edge_quq.__path__, "edge_quq.")
                 if m.name not in ("edge_quq._headkernel", "edge_quq.__main__"))  # a C extension; the CLI entry point


def test_every_module_of_edge_quq_is_listed():
    assert {"edge_quq.cli", "edge_quq.predictor", "edge_quq.samplers", "edge_quq.samplers.native"} <= set(MODULES)


@pytest.mark.parametrize("chunk", [MODULES[i::4] for i in range(4)], ids=[f"part{i}" for i in range(4)])
def test_each_module_imports_alone_in_a_fresh_interpreter(chunk):
    # One interpreter per module (four pytest cases, to keep the report short): sys.modules starts empty.
    failed = {}
    for name in chunk:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        if r.returncode != 0:
            failed[name] = r.stderr.strip().splitlines()[-1:]
    assert not failed, failed


def test_bundle_module_needs_no_numpy():
    # deploy/install.sh checks a bundle with the system Python, which on a fresh machine has no numpy.
    import subprocess
    import sys

    code = "import sys; sys.modules['numpy'] = None; from edge_quq.bundle import load_bundle; load_bundle()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
