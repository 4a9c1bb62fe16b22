"""Post-hoc temperature scaling of a bundle; in edge-quq "calibration" means this and nothing else.

    python -m edge_quq_export.calibration set-temperature BUNDLE --fit-data fashion-mnist-val
    python -m edge_quq_export.calibration set-temperature BUNDLE --value 1.25     (or --clear)

The fit runs the bundle's own int8 backbone through the device runtime and the float head in eval mode, and
stores T with how it was obtained as the manifest's `calibration` object (docs/calibration.md). The
quantization report that used to be `calibration report` is edge_quq_export.quant_report; the old command
still runs it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import click
import numpy as np

from edge_quq.bundle import Bundle, load_bundle, set_calibration
from edge_quq.calibration import calibration_summary, fit_temperature, temperature_objective
from edge_quq.defaults import BACKENDS
from edge_quq.errors import ExportError, OptionError
from edge_quq.head import load_head_weights

from edge_quq_export.cli import CONTEXT, run_command
from edge_quq_export.datasets import FASHION_MNIST_DIR, FMNIST_VAL, fashion_mnist_val, load_inputs

FMNIST_VAL_NAME = "fashion-mnist-val"
PROG = "python -m edge_quq_export.calibration"


def temperature_record(logits: np.ndarray, labels: np.ndarray, activation: str, source: str, backbone: str) -> Dict[str, Any]:
    """The manifest's `calibration` object: T fitted on held-out head logits, and how it was fitted."""
    z = np.asarray(logits, dtype=np.float64)
    t = fit_temperature(z, labels, activation)
    before = calibration_summary(z, labels, activation, 1.0)
    after = calibration_summary(z, labels, activation, t)
    return {
        "temperature": round(t, 6),
        "method": "temperature scaling of the head logits (edge_quq.calibration)",
        "objective": temperature_objective(activation),
        "fitted_on": source,
        "samples": int(len(labels)),
        "backbone": backbone,
        "heldout": {"ece_before": round(before["ece"], 6), "ece_after": round(after["ece"], 6),
                    "nll_before": round(before["nll"], 6), "nll_after": round(after["nll"], 6)},
    }


def fit_bundle_temperature(bundle: Bundle, x: np.ndarray, y: np.ndarray, source: str, backend: str = "auto") -> Dict[str, Any]:
    """Fit T on the bundle's own int8 backbone + head logits (eval mode), through the device runtime."""
    from edge_quq.backends import make_backbone

    head = load_head_weights(bundle)
    temperature_objective(head.activation)  # refuses a linear head before the backbone runs
    bb = make_backbone(bundle, backend)
    feats = np.concatenate([bb(x[s : s + 256]) for s in range(0, len(x), 256)])
    return temperature_record(head.logits(feats), y, head.activation, source, bb.name)


def load_temperature_data(spec: str, bundle: Bundle, labels: Optional[Path], limit: Optional[int], seed: int,
                          root: Path = FASHION_MNIST_DIR) -> Tuple[np.ndarray, np.ndarray, str]:
    shape = bundle.input.shape
    if spec == FMNIST_VAL_NAME:
        x, y = fashion_mnist_val(root, bundle.input.preprocess, shape, limit, seed)
        return x, y, f"Fashion-MNIST validation split (last {FMNIST_VAL} training images, held out from training)"
    x, y = load_inputs(Path(spec), shape, bundle.input.preprocess, "temperature data", limit, seed, bundle.classes)
    if labels is not None:
        from edge_quq_export.datasets import load_labels

        y = load_labels(labels, len(x))
    if y is None:
        raise ExportError(f"{spec}: temperature data needs labels (.npz 'x' and 'y', class sub-folders, or --labels)")
    if y.min() < 0 or y.max() >= bundle.num_classes:
        raise ExportError(f"{spec}: labels must be class indices 0..{bundle.num_classes - 1}")
    return x, y, str(spec)


# --- command line -------------------------------------------------------------------------------------------

@click.group(context_settings=CONTEXT)
def cli() -> None:
    """Post-hoc temperature scaling of a bundle (docs/calibration.md)."""


@cli.command("set-temperature")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--value", type=float, default=None, help="The temperature T (> 0).")
@click.option("--fit-data", default=None, help=f"Fit T on labelled held-out data: .npz x/y, class sub-folders, or {FMNIST_VAL_NAME!r}.")
@click.option("--labels", type=click.Path(path_type=Path), default=None, help="Labels for --fit-data (.npy or text).")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Random subset of --fit-data.")
@click.option("--clear", is_flag=True, help="Remove the temperature (T = 1).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Backbone backend for the fit.")
@click.option("--fashion-mnist", type=click.Path(path_type=Path), default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder.")
@click.option("--seed", type=int, default=0, show_default=True)
def set_temperature_cmd(bundle: Path, value: Optional[float], fit_data: Optional[str], labels: Optional[Path],
                        samples: Optional[int], clear: bool, backend: str, fashion_mnist: Path, seed: int) -> None:
    """Store a temperature in an existing bundle's manifest: fitted (--fit-data), given (--value) or removed (--clear)."""
    if sum((value is not None, fit_data is not None, clear)) != 1:
        raise OptionError("give exactly one of --value T, --fit-data DATA or --clear")
    b = load_bundle(bundle)
    if clear:
        _note_stale_gate(set_calibration(b.path, None))
        click.echo(f"{b.path}: temperature removed (T = 1)")
        return
    if value is not None:
        cal = {"temperature": value, "method": f"set by hand ({PROG} set-temperature --value)"}
    else:
        x, y, source = load_temperature_data(fit_data, b, labels, samples, seed, fashion_mnist)
        cal = fit_bundle_temperature(b, x, y, source, backend)
    b = set_calibration(b.path, cal)
    _note_stale_gate(b)
    msg = f"{b.path}: temperature {b.temperature:.4g}"
    if "heldout" in cal:
        h = cal["heldout"]
        msg += (f" fitted on {cal['samples']} samples ({cal['backbone']} backbone): ECE {h['ece_before']:.4f} -> {h['ece_after']:.4f}, "
                f"NLL {h['nll_before']:.4f} -> {h['nll_after']:.4f}")
    click.echo(msg)


def _note_stale_gate(b) -> None:
    """The gate's p-values read the backbone's features, which T does not change; its risk table and the
    default z were made with the head's probabilities at the old T, so they are refreshed, not silently kept."""
    if b.gate is not None:
        click.echo(f"note: {b.path}: the risk table and default z in {b.gate.file} were computed at the previous "
                   "temperature; re-run fit-detectors on this bundle to refresh them (the gate's p-values are unaffected)",
                   err=True)


def _register_report_alias() -> None:
    # `calibration report` was the quantization report's old name; it keeps working, hidden from --help.
    from edge_quq_export.quant_report import report_cmd

    cli.add_command(click.Command("report", params=report_cmd.params, callback=report_cmd.callback,
                                  help=report_cmd.help, hidden=True, context_settings=CONTEXT))


_register_report_alias()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(cli, sys.argv[1:] if argv is None else argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
