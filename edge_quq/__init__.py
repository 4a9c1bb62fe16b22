"""edge-quq: quantized image classifiers on ARM boards that say when a prediction should not be trusted."""
from __future__ import annotations

__version__ = "0.1.0"

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
    "load_bundle",
]


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
    if name == "load_bundle":
        from edge_quq.bundle import load_bundle

        return load_bundle
    raise AttributeError(name)
