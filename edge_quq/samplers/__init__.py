"""Head samplers by name: a lazy table of module path and class name, imported only when asked for.

    from edge_quq.samplers import make_sampler
    s = make_sampler("native", head, seed=0)
    m = s.sample(features, 100)          # features [F] -> moments [C]; rows [N, F] -> [N, C]

Nothing registers itself on import: this table is the one list of samplers (the CLI's --sampler choices
come from it), and importing this package loads none of them, so an optional runtime that is missing
(the C extension, onnxruntime, ai-edge-litert) only matters to the sampler that needs it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from edge_quq.errors import OptionError

if TYPE_CHECKING:
    from edge_quq.bundle import Bundle
    from edge_quq.head import HeadWeights
    from edge_quq.samplers.base import Sampler

# name -> (module, class). "needs a bundle" is the class's own business: it takes one in its constructor.
SAMPLER_TABLE: Dict[str, Tuple[str, str]] = {
    "numpy": ("edge_quq.samplers.reference", "NumpySampler"),
    "native": ("edge_quq.samplers.native", "NativeSampler"),
    "analytic": ("edge_quq.samplers.analytic", "AnalyticSampler"),
    "tflite": ("edge_quq.samplers.exported", "TFLiteHeadSampler"),
    "onnx": ("edge_quq.samplers.exported", "OnnxHeadSampler"),
}
SAMPLER_NAMES: Tuple[str, ...] = tuple(SAMPLER_TABLE)
# What --sampler accepts: "auto" picks native when it can run the head, numpy otherwise.
SAMPLER_CHOICES: Tuple[str, ...] = ("auto",) + SAMPLER_NAMES
# Samplers that run an exported head model from the bundle (and take bundle= and threads=).
BUNDLE_SAMPLERS: Tuple[str, ...] = ("tflite", "onnx")


def sampler_class(name: str) -> type:
    """The class registered under `name`, imported now."""
    if name not in SAMPLER_TABLE:
        raise OptionError(f"sampler {name!r} is not available here (available: {', '.join(SAMPLER_CHOICES)})")
    module, cls = SAMPLER_TABLE[name]
    return getattr(importlib.import_module(module), cls)


def resolve_auto(head: "HeadWeights") -> str:
    """"native" when the C extension is built and the head is the canonical 2-block shape it handles, else
    "numpy"; both give the same moments."""
    from edge_quq.samplers import native

    return "native" if native.available() and native.supports(head) else "numpy"


def make_sampler(name: str, head: "HeadWeights", seed: Optional[int] = None, bundle: "Optional[Bundle]" = None,
                 threads: Optional[int] = None) -> "Sampler":
    """Build a sampler by name (or "auto"); bundle and threads go only to the samplers that run the
    bundle's exported head model."""
    if name == "auto":
        name = resolve_auto(head)
    cls = sampler_class(name)
    if name in BUNDLE_SAMPLERS:
        return cls(head, seed, bundle=bundle, threads=threads)
    return cls(head, seed)
