"""The full-int8 TFLite backbone of an ONNX (or PyTorch) model, made by onnx2tf run from its own virtualenv.

onnx2tf is the ONNX -> TFLite converter that runs offline here, but it pins TensorFlow 2.19, ONNX 1.19, ONNX
Runtime 1.23 and numpy 1.26, which would downgrade what the [export] extra installs. So it is no dependency:
the exporter runs its executable as a subprocess, named by `--onnx2tf PATH` or the EDGE_QUQ_ONNX2TF
environment variable (docs/export.md, "TFLite backbone with onnx2tf", has the one-line setup of its venv).

The input keeps the ONNX model's layout (`-k image`: onnx2tf's NHWC rewrite stays inside the model), so the
manifest's one `input.layout` holds for both backbones. Quantization is onnx2tf's own full-integer mode
(per-channel int8 weights, int8 activations, int8 input and output) calibrated on the same preprocessed
quantization images as the ONNX backbone. When onnx2tf fails, `convert` raises ConversionFailed with its
last error line: the caller writes an ONNX-only bundle and says why.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from edge_quq.errors import OptionError

ENV_VAR = "EDGE_QUQ_ONNX2TF"
TIMEOUT_S = 1800
SETUP = 'python3 -m venv ~/.onnx2tf && ~/.onnx2tf/bin/pip install "onnx2tf==1.29.24"'


class ConversionFailed(Exception):
    """onnx2tf ran and failed (or wrote no full-integer model); the message is its last error line."""


def find_onnx2tf(explicit: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The onnx2tf executable to use: `explicit`, else $EDGE_QUQ_ONNX2TF, else None (ONNX-only bundles).
    A path that is given but not an executable file is a bad option (exit 2, nothing written)."""
    value = explicit if explicit not in (None, "") else os.environ.get(ENV_VAR) or None
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.is_file() or not os.access(p, os.X_OK):
        where = "--onnx2tf" if explicit not in (None, "") else ENV_VAR
        raise OptionError(f"{where}: {p} is not an executable onnx2tf (set up its venv with: {SETUP})")
    return p


def convert(exe: Path, backbone_onnx: Path, quant: np.ndarray, layout: str) -> bytes:
    """Full-int8 TFLite of the float ONNX backbone at `backbone_onnx` (input `image`), calibrated on `quant`
    ([N, H, W, C] preprocessed, transposed here to the model's layout), or ConversionFailed."""
    from edge_quq.preprocess import to_layout

    with tempfile.TemporaryDirectory(prefix="edge_quq_onnx2tf_") as tmp:
        work = Path(tmp)
        np.save(work / "quant.npy", np.ascontiguousarray(to_layout(quant, layout), np.float32))
        cmd = [str(exe), "-i", str(backbone_onnx), "-o", str(work / "out"), "-b", "1", "-oiqt", "-qt", "per-channel",
               "-iqd", "int8", "-oqd", "int8", "-cind", "image", str(work / "quant.npy"),
               "[[[[0.0]]]]", "[[[[1.0]]]]", "-n"]  # mean 0, std 1: the data is already normalised
        if layout == "NCHW":
            cmd[5:5] = ["-k", "image"]
        try:
            # cwd: onnx2tf looks for (and otherwise downloads) sample images in its working folder
            r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConversionFailed(f"onnx2tf did not finish in {TIMEOUT_S} s") from None
        except OSError as e:
            raise ConversionFailed(f"onnx2tf could not be started: {e}") from None
        found = sorted((work / "out").glob("*_full_integer_quant.tflite"))
        if r.returncode != 0 or not found:
            raise ConversionFailed(f"onnx2tf exit {r.returncode}: {_last_error(r.stdout + r.stderr)}")
        return found[0].read_bytes()


def _last_error(log: str) -> str:
    """The line that says what went wrong: the last exception line of the log, else its last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":", 1)[0] or ln.startswith("ERROR")]
    return ((errors or lines or ["no output"])[-1])[:300]
