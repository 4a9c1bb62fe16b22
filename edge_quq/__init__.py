"""edge-quq: quantized image classifiers on ARM boards that say when a prediction should not be trusted."""
from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path as _Path  # noqa: E402

from edge_quq.errors import BackendError, BundleError, EdgeQuqError, InputError, OptionError  # noqa: E402

__all__ = [
    "__version__",
    "EdgeQuqError",
    "BundleError",
    "InputError",
    "BackendError",
    "OptionError",
    "Predictor",
    "PredictorOptions",
    "Prediction",
    "DriftMonitor",
    "load_bundle",
    "open_source",
    "open_output",
    "SAMPLES_DIR",
]

# Ten Fashion-MNIST test images, one per class, shipped for demos and the examples.
SAMPLES_DIR = _Path(__file__).resolve().parent / "data" / "samples"


def __getattr__(name: str):
    # Lazy so that `import edge_quq` stays cheap (the CLI imports runtimes only when it needs them).
    if name == "Predictor":
        from edge_quq.predictor import Predictor

        return Predictor
    if name == "PredictorOptions":
        from edge_quq.options import PredictorOptions

        return PredictorOptions
    if name == "Prediction":
        from edge_quq.result import Prediction

        return Prediction
    if name == "DriftMonitor":  # drift alarm of a stream: DriftMonitor.for_predictor(p), then observe(prediction)
        from edge_quq.drift import DriftMonitor

        return DriftMonitor
    if name == "open_source":  # a frame source by URI (edge_quq.sources): a context manager, iterates over frames
        from edge_quq.sources import open_source

        return open_source
    if name == "open_output":  # an output by URI (edge_quq.sinks): a context manager with render(image, prediction)
        from edge_quq.sinks import open_output

        return open_output
    if name == "load_bundle":
        from edge_quq.bundle import load_bundle

        return load_bundle
    raise AttributeError(name)
