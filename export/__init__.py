"""edge-quq host side: train, split, quantize (int8 TFLite + ONNX) and write an artifact bundle.

Needs the [export] extra (TensorFlow, tf2onnx, onnx); the device runtime never imports this package.
"""
__version__ = "0.1.0"

# Images the int8 converters set activation ranges on (a random subset when more are given).
DEFAULT_QUANT_SAMPLES = 300


def from_torch(module, example_input, out, quant_data, **kwargs):
    """A PyTorch classifier -> bundle (edge_quq_export.torch_export.from_torch; torch loads only when called)."""
    from edge_quq_export.torch_export import from_torch as _from_torch

    return _from_torch(module, example_input, out, quant_data, **kwargs)
