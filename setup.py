"""Build of the optional native kernels (the head sampler's and the per-frame decision math's); all metadata lives in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and edge_quq falls back to the
numpy sampler (edge_quq.samplers.make_sampler). Plain CPython C API, no numpy headers needed.
"""
import sys

from setuptools import Extension, setup

extra = [] if sys.platform == "win32" else ["-O3", "-std=gnu11", "-fno-math-errno"]

setup(
    ext_modules=[
        Extension(
            "edge_quq._headkernel",
            sources=["edge_quq/csrc/headkernel.c", "edge_quq/csrc/analytic.c", "edge_quq/csrc/frame.c", "edge_quq/csrc/whitener.c",
                     "edge_quq/csrc/rowdot.c", "edge_quq/csrc/headkernel_module.c"],
            depends=["edge_quq/csrc/headkernel.h", "edge_quq/csrc/frame.h", "edge_quq/csrc/whitener.h", "edge_quq/csrc/rowdot.h", "edge_quq/csrc/simd_math.h", "edge_quq/csrc/pybuf.h"],
            extra_compile_args=extra,
            optional=True,
        ),
        Extension(
            "edge_quq._gatekernel",
            sources=["edge_quq/csrc/gatekernel.c"],
            depends=["edge_quq/csrc/pybuf.h"],
            extra_compile_args=extra,
            optional=True,
        ),
    ]
)
