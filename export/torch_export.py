"""PyTorch classifiers -> edge-quq bundles, through torch.onnx.export and the ONNX path (onnx_import.py).

torch is imported only here and only when called (the [export-torch] extra); the board never needs it.
`from_torch` takes an nn.Module; `export_pt2` takes a torch.export archive (.pt2, what `edge-quq export
model.pt2` calls). Exporters: `exporter="torchscript"` (torch.onnx.export(..., dynamo=False), the default
here: one self-contained file, opset 17) and `exporter="dynamo"` (needs onnxscript); both are tested.

An eval-mode ONNX export drops Dropout, so the rates are read from the module itself: the trailing Linear
layers that each follow a Dropout (registration order, at most two) form the head, unless `dropout=` says.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from edge_quq.bundle import Bundle
from edge_quq.errors import ExportError

from edge_quq_export.pipeline import ExportOptions

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17


def head_rates(module) -> List[float]:
    """Dropout rates of the module's head: for the last Linear layers (at most 2), in registration order, each
    preceded directly by a Dropout, that Dropout's p. [] when the last Linear has no Dropout before it."""
    import torch.nn as nn

    seq = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Dropout))]
    rates: List[float] = []
    i = len(seq) - 1
    while i >= 1 and len(rates) < 2 and isinstance(seq[i], nn.Linear) and isinstance(seq[i - 1], nn.Dropout):
        rates.insert(0, float(seq[i - 1].p))
        i -= 2
    return rates


def _batch_of_two(example):
    """The dynamo exporter specialises a batch of 1 to a constant; a batch of 2 keeps the dimension symbolic."""
    import torch

    x = example[0] if isinstance(example, (tuple, list)) else example
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ExportError(f"example_input must be one image batch tensor [N, C, H, W], got {type(x).__name__}")
    return torch.cat([x[:1], x[:1]]) if x.shape[0] < 2 else x


def to_onnx(model: Any, example_input: Any, path: Path, exporter: str = "torchscript") -> Path:
    """torch.onnx.export with a dynamic batch; `model` is an nn.Module or a torch.export ExportedProgram."""
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    is_program = isinstance(model, torch.export.ExportedProgram)
    x = example_input if is_program else _batch_of_two(example_input)
    try:
        if exporter == "dynamo" or is_program:
            dyn = None if is_program else ({0: torch.export.Dim("N")},)
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["image"], dynamic_shapes=dyn,
                              external_data=False, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["output"],
                              dynamic_axes={"image": {0: "N"}, "output": {0: "N"}}, opset_version=TORCHSCRIPT_OPSET)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001  (torch raises many types; the first line says what failed)
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from None
    return path


def from_torch(module: Any, example_input: Any, out: Union[str, Path], quant_data: Any, *,
               dropout: Optional[Sequence[float]] = None, exporter: str = "torchscript",
               split_node: Optional[str] = None, onnx2tf: Optional[Union[str, Path]] = None, **options: Any) -> Bundle:
    """A PyTorch classifier (nn.Module, float, NCHW input) -> verified bundle at `out`: ONNX int8 backbone, plus
    the int8 TFLite one when onnx2tf (`onnx2tf`, default $EDGE_QUQ_ONNX2TF) converts it with parity.

    `quant_data` and `options` are those of ExportOptions (test_data, classes, mean, std, name, ...); `dropout`
    defaults to the module's own head rates (head_rates); `exporter` picks torch.onnx.export's exporter.
    """
    from edge_quq_export.onnx_import import export_onnx

    module = module.eval()
    rates = list(dropout) if dropout is not None else (head_rates(module) or None)
    options.setdefault("name", type(module).__name__)
    opts = ExportOptions(out=Path(out), quant_data=quant_data, dropout=rates, **options)
    with tempfile.TemporaryDirectory(prefix="edge_quq_torch_") as tmp:
        path = to_onnx(module, example_input, Path(tmp) / "model.onnx", exporter)
        return export_onnx(path, opts, split_node, onnx2tf)


def export_pt2(path: Path, opts: ExportOptions, split_node: Optional[str] = None,
               onnx2tf: Optional[Union[str, Path]] = None) -> Bundle:
    """A torch.export archive (.pt2) -> bundle: exported to ONNX by the dynamo exporter with the archive's own
    example inputs. The archive keeps no module structure, so the head rates come from --dropout."""
    import torch

    from edge_quq_export.onnx_import import export_onnx

    if not Path(path).is_file():
        raise ExportError(f"{path}: model file not found")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: cannot be loaded as a torch.export archive ({type(e).__name__}: {str(e).strip()[:200]})") from None
    example: Tuple = ep.example_inputs[0] if getattr(ep, "example_inputs", None) else ()
    if not example:
        raise ExportError(f"{path}: the archive holds no example inputs; save it from torch.export.export(model, (x,))")
    if opts.name is None:
        opts.name = Path(path).stem
    with tempfile.TemporaryDirectory(prefix="edge_quq_pt2_") as tmp:
        onnx_path = to_onnx(ep, example[0], Path(tmp) / f"{Path(path).stem}.onnx", "dynamo")
        return export_onnx(onnx_path, opts, split_node, onnx2tf)
