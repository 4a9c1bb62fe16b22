"""`edge-quq export`: a trained Keras classifier -> an edge-quq bundle folder; and what every host-side
command shares (click context settings, old option names, `error: ...` lines, `main(argv) -> exit code`).

Only click and the standard library at import time (edge_quq.defaults is standard library only): the device CLI imports this module to register the
command, and TensorFlow (seconds to import, absent on boards) loads only when the command runs.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import click

from edge_quq.defaults import DECISION_DEFAULTS, MIXED_POLICIES

from edge_quq_export import DEFAULT_QUANT_SAMPLES

# Packages of the [export] extra (and matplotlib for the report's figures): missing one is a setup problem
# worth one line, anything else is a bug.
HOST_MODULES = ("tensorflow", "keras", "tf2onnx", "onnx", "ai_edge_litert", "torch", "onnxscript")
FIGURE_MODULES = ("matplotlib",)
CONTEXT = {"help_option_names": ["-h", "--help"]}


class OldNames(click.Option):
    """An option whose names after the first are old spellings: still accepted, not shown in --help."""

    def get_help_record(self, ctx: click.Context):
        opts = self.opts
        self.opts = opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

    def get_error_hint(self, ctx: click.Context) -> str:
        return f"'{self.opts[0]}'"


def host_error(e: BaseException) -> Optional[str]:
    """The one-line message for an error a host command reports instead of a traceback (None: a bug)."""
    from edge_quq.errors import EdgeQuqError

    if isinstance(e, EdgeQuqError):
        return str(e)
    if isinstance(e, ModuleNotFoundError):
        top = (e.name or "").split(".")[0]
        if top in HOST_MODULES:
            extra = "export-torch" if top in ("torch", "onnxscript") else "export"
            return f"the exporter needs the [{extra}] extra (pip install 'edge-quq[{extra}]'): {e}"
        if top in FIGURE_MODULES:
            return "the report's figures need matplotlib (pip install 'edge-quq[bench]')"
    return None


def run_command(cmd: click.BaseCommand, argv: Sequence[str], prog: str) -> int:
    """Run a click command as `python -m ...` does and return its exit code (tests call this directly)."""
    try:
        cmd.main(args=list(argv), prog_name=prog, standalone_mode=False, obj={"argv": list(argv)})
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        return 1
    except Exception as e:  # noqa: BLE001  (host_error decides; a bug is re-raised)
        msg = host_error(e)
        if msg is None:
            raise
        click.echo(f"error: {msg}", err=True)
        return getattr(e, "exit_code", 2)
    return 0

def check_out_writable(out: Path, force: bool) -> None:
    """Refuse an --out that cannot become a bundle before TensorFlow loads: an existing file or non-empty
    folder that is not a bundle (writer.check_out), or a place where no folder can be made (/proc/x, a
    read-only mount). The exporter stages next to OUT, so a folder is made and removed in OUT's nearest
    existing ancestor: a real write, which os.access cannot promise for root or on /proc."""
    from edge_quq.errors import ExportError
    from edge_quq_export.writer import check_out

    check_out(out, force)
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edge-quq-probe-", dir=parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create a bundle folder there ({parent}: {e.strerror or e})") from None


def _floats(value: Optional[str], what: str) -> Optional[List[float]]:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {value!r}") from None


def _class_names(classes: Optional[str], labels_file: Optional[Path]) -> Optional[Sequence[str]]:
    from edge_quq.errors import ExportError

    if classes and labels_file:
        raise ExportError("give class names with --classes or --labels-file, not both")
    if classes:
        return [c.strip() for c in classes.split(",")]
    if labels_file:
        try:
            lines = Path(labels_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"{labels_file}: cannot read class names ({e})") from None
        return [ln.strip() for ln in lines if ln.strip()]
    return None


@click.command("export", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--quant-data", "--calibration", "quant_data", cls=OldNames, required=True, type=click.Path(path_type=Path),
              help="Quantization data, the representative input the int8 ranges are set on: a folder of images, or "
                   ".npy/.npz [N,H,W(,C)] (uint8 pixels, or float32 model-ready input).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it is an existing bundle.")
@click.option("--test-data", type=click.Path(path_type=Path), default=None,
              help="Held-out data for the parity report: image folder (one sub-folder per class name gives labels) or .npy/.npz (.npz 'x' and 'y').")
@click.option("--test-labels", type=click.Path(path_type=Path), default=None, help="Integer labels for --test-data (.npy or text, one per line).")
@click.option("--classes", default=None, help="Class names, comma-separated, in output order.")
@click.option("--labels-file", type=click.Path(path_type=Path), default=None, help="Class names, one per line, in output order.")
@click.option("--split-layer", default=None, help="Name of the first head layer (default: the first Dropout of the trailing Dropout/Dense head).")
@click.option("--split-node", default=None, help="ONNX models: name of the first head node (default: the head's first Dropout, "
              "or the last 1-2 dense layers when it has none).")
@click.option("--onnx2tf", "onnx2tf", default=None, metavar="PATH",
              help="ONNX and .pt2 models: the onnx2tf executable (in its own venv) that makes the int8 TFLite backbone "
                   "(default: $EDGE_QUQ_ONNX2TF; neither: an ONNX-only bundle). See docs/export.md.")
@click.option("--dropout", default=None, help="Dropout rate per head dense layer, e.g. 0.2,0.4. Required when the head has no Dropout; overrides the model's rates.")
@click.option("--color", type=click.Choice(["gray", "rgb", "bgr"]), default=None, help="Channel order the model was trained on (default: gray for 1 channel, rgb for 3).")
@click.option("--pixel-scale", type=float, default=1.0 / 255.0, show_default=True, help="Input = (pixel * pixel_scale - mean) / std, pixel on 0..255.")
@click.option("--mean", default=None, help="Per-channel mean, comma-separated (default 0).")
@click.option("--std", default=None, help="Per-channel std, comma-separated (default 1).")
@click.option("--interpolation", type=click.Choice(["area", "linear", "nearest", "cubic"]), default="area", show_default=True)
@click.option("--crop-fraction", type=float, default=1.0, show_default=True, help="Center crop of this fraction of the shorter side before resizing.")
@click.option("--quant-samples", "--calib-samples", "quant_samples", cls=OldNames, type=click.IntRange(min=1),
              default=DEFAULT_QUANT_SAMPLES, show_default=True, help="Quantization samples used (random subset if more are given).")
@click.option("--test-samples", type=click.IntRange(min=1), default=None, help="Use at most this many held-out samples (default: all).")
@click.option("--name", default=None, help="Bundle name (default: the model file name).")
@click.option("--threshold", type=float, default=DECISION_DEFAULTS["threshold"], show_default=True, help="Default decision threshold.")
@click.option("--num-iter", type=click.IntRange(min=1), default=DECISION_DEFAULTS["num_iter"], show_default=True, help="Default MC samples T.")
@click.option("--z", "z", type=click.FloatRange(min=0.0, max=100.0), default=None,
              help=f"Default interval factor z (mean ± z·std). Default: with --fit-data, chosen on the calibration data "
                   f"(the smallest z that certifies 5% error among kept, docs/decisions.md); without, {DECISION_DEFAULTS['z']}.")
@click.option("--mixed", type=click.Choice(MIXED_POLICIES), default=DECISION_DEFAULTS["mixed"], show_default=True,
              help="Default rule for vectors with both present and uncertain classes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for quantization/test subsets and the head check masks.")
@click.option("--temperature-data", type=click.Path(path_type=Path), default=None,
              help="Labelled held-out data (same forms as --test-data) to fit a post-hoc temperature on; stored as calibration.temperature. Not the test data, if the parity report's accuracy should stay unbiased.")
@click.option("--temperature-labels", type=click.Path(path_type=Path), default=None, help="Integer labels for --temperature-data (.npy or text).")
@click.option("--detectors", "detectors", default=None,
              help="OOD detectors to fit on --fit-data after writing the bundle: comma-separated maxlogit, energy, react, mahalanobis, "
                   "rel_mahalanobis, knn, vim, gradient, or 'all' (default with --fit-data: all). See docs/detectors.md.")
@click.option("--fit-data", default=None,
              help="In-distribution data for the detectors: 'fashion-mnist', an image folder (class sub-folders give labels) or .npy/.npz ('x', 'y').")
@click.option("--calibration-data", default=None,
              help="Held-out labelled ID data for the OOD gate and risk control (gate.npz; same forms as --temperature-data, or "
                   "'fashion-mnist-val'); it must not have trained the model. Default: a seeded 20% of --fit-data, never used to fit the detectors.")
def export_cmd(model: Path, quant_data: Path, out: Path, force: bool, test_data: Optional[Path], test_labels: Optional[Path],
               classes: Optional[str], labels_file: Optional[Path], split_layer: Optional[str], split_node: Optional[str], dropout: Optional[str],
               color: Optional[str], pixel_scale: float, mean: Optional[str], std: Optional[str], interpolation: str,
               crop_fraction: float, quant_samples: int, test_samples: Optional[int], name: Optional[str], threshold: float,
               num_iter: int, z: Optional[float], mixed: str, seed: int, temperature_data: Optional[Path] = None,
               temperature_labels: Optional[Path] = None, detectors: Optional[str] = None, fit_data: Optional[str] = None,
               calibration_data: Optional[str] = None, onnx2tf: Optional[str] = None) -> None:
    """Split MODEL (.keras/.h5, a float .onnx classifier or a torch.export .pt2 archive) into an int8 backbone and a droppable head, and write a bundle to OUT."""
    from edge_quq.errors import EdgeQuqError

    try:
        det_names = None
        if detectors is not None or fit_data is not None:
            from edge_quq.detectors import parse_names
            from edge_quq.errors import OptionError

            if fit_data is None:
                raise OptionError("--detectors needs --fit-data (the in-distribution data they are fitted on)")
            if fit_data not in ("fashion-mnist", "fashion-mnist:train") and not Path(fit_data).exists():
                raise OptionError(f"--fit-data {fit_data}: not found")
            det_names = parse_names(detectors or "all")
        check_out_writable(out, force)
        from edge_quq_export.pipeline import ExportOptions

        t0 = time.perf_counter()
        opts = ExportOptions(
            quant_data=quant_data, out=out, force=force, test_data=test_data, test_labels=test_labels,
            split_layer=split_layer, dropout=_floats(dropout, "--dropout"), classes=_class_names(classes, labels_file),
            color=color, pixel_scale=pixel_scale, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
            interpolation=interpolation, crop_fraction=crop_fraction, name=name, quant_samples=quant_samples,
            test_samples=test_samples, threshold=threshold, num_iter=num_iter, mixed=mixed, seed=seed,
            z=DECISION_DEFAULTS["z"] if z is None else z,  # type: ignore[arg-type]
            temperature_data=temperature_data, temperature_labels=temperature_labels,
        )
        bundle = export_any(model, opts, split_node, onnx2tf)
        if det_names is not None:
            from edge_quq_export.detectors import fit_bundle

            # The bundle is complete and verified at this point: a failing fit leaves it valid, without detectors.
            fit_bundle(bundle.path, fit_data, det_names, seed=seed, calib_data=calibration_data, z=z)
            from edge_quq.bundle import load_bundle

            bundle = load_bundle(bundle.path)
    except (EdgeQuqError, ModuleNotFoundError) as e:
        msg = host_error(e)
        if msg is None:
            raise
        click.echo(f"error: {msg}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:  # the disk, not the model: full, read-only, or a path that cannot hold files
        click.echo(f"error: {e.filename or out}: {e.strerror or e}", err=True)
        sys.exit(2)
    acc = bundle.manifest.get("accuracy")
    click.echo(f"wrote {bundle.path} ({bundle.total_bytes() / 1024:.1f} KiB, {len(bundle.files)} files) in {time.perf_counter() - t0:.1f} s")
    click.echo(f"split at {bundle.split_layer!r}: features {bundle.head.feature_size}, head " +
               " -> ".join(f"dropout {l.dropout:g} / dense {l.units} {l.activation}" for l in bundle.head.layers))
    if acc:
        click.echo(f"top-1 on {acc['samples']} held-out samples: float {100 * acc['float']:.2f}%, " +
                   ", ".join(f"int8 {k} {100 * acc[f'int8_{k}']:.2f}%" for k in ("tflite", "onnx") if f"int8_{k}" in acc))
    if bundle.manifest.get("backbone_note"):
        click.echo(f"note: {bundle.manifest['backbone_note']}")
    cal = bundle.manifest.get("calibration")
    if cal:
        h = cal.get("heldout", {})
        click.echo(f"temperature {bundle.temperature:.4g} fitted on {cal.get('samples')} held-out samples: "
                   f"ECE {h.get('ece_before', float('nan')):.4f} -> {h.get('ece_after', float('nan')):.4f}")
    det = bundle.manifest.get("detectors")
    if det:
        click.echo(f"OOD detectors {', '.join(det['names'])} fitted (thresholds at ID TPR {det.get('tpr')}): {bundle.path / det['file']}")
    if bundle.gate is not None:
        g = bundle.gate
        click.echo(f"default policy {g.policy}: gate {', '.join(g.detectors)} at alpha {g.alpha:g} on "
                   f"{g.calibration.get('samples')} calibration samples ({bundle.path / g.file})")
    click.echo(f"parity report: {bundle.path / 'parity.md'}")
    _warn_on_poor_parity(bundle.path / "parity.json")


def export_any(model: Path, opts, split_node: Optional[str] = None, onnx2tf: Optional[str] = None):
    """Dispatch on the model file's suffix: .onnx to the ONNX path, .pt2 (torch.export) through ONNX, anything
    else to the Keras pipeline."""
    from edge_quq.errors import ExportError

    if model.suffix.lower() == ".onnx":
        from edge_quq_export.onnx_import import export_onnx

        return export_onnx(model, opts, split_node, onnx2tf)
    if model.suffix.lower() == ".pt2":
        from edge_quq_export.torch_export import export_pt2

        return export_pt2(model, opts, split_node, onnx2tf)
    if split_node is not None:
        raise ExportError("--split-node is for ONNX models; name a Keras model's first head layer with --split-layer")
    if onnx2tf is not None:
        raise ExportError("--onnx2tf is for ONNX and .pt2 models; Keras models are converted to TFLite by TensorFlow itself")
    from edge_quq_export.pipeline import export_model

    return export_model(model, opts)


# Below these, int8 changes what the model says often enough that the user should look before deploying.
WARN_COSINE_MEAN = 0.98
WARN_AGREEMENT = 0.95


def _warn_on_poor_parity(report_path: Path) -> None:
    import json

    report = json.loads(report_path.read_text(encoding="utf-8"))
    for name, row in report.get("int8", {}).items():
        if row["feature_cosine_mean"] < WARN_COSINE_MEAN or row["top1_agreement"] < WARN_AGREEMENT:
            click.echo(f"warning: int8 {name} backbone departs from float (feature cosine mean {row['feature_cosine_mean']:.3f}, "
                       f"top-1 agreement {100 * row['top1_agreement']:.1f}%); check the quantization data and {report_path.name}", err=True)
