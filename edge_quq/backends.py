"""Backbone runtimes: TFLite (ai-edge-litert, tflite-runtime or tensorflow.lite) and ONNX Runtime.

A backbone takes a float32 batch [N, H, W, C] already preprocessed (and transposes it to NCHW itself when the
bundle's input.layout says so), quantizes it with the model's own input
parameters, runs once, and returns float32 features [N, F]. Each runtime is imported only when used, so a
board needs only the one it runs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from edge_quq.bundle import Bundle, ModelFile
from edge_quq.errors import BackendError
from edge_quq.preprocess import dequantize, quantize, to_layout

BACKENDS = ("auto", "tflite", "onnx")


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


def load_tflite_interpreter_class() -> Tuple[type, str, Optional[object]]:
    """(Interpreter class, module name, OpResolverType or None), preferring ai-edge-litert.

    tflite-runtime is the last release for Python <= 3.11 and only works with numpy < 2;
    tensorflow.lite is used only when TensorFlow happens to be installed (host machines).
    """
    errors: List[str] = []
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType  # type: ignore

        return Interpreter, "ai_edge_litert", OpResolverType
    except ImportError as e:
        errors.append(f"ai_edge_litert ({e})")
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore

        try:
            from tflite_runtime.interpreter import OpResolverType  # type: ignore
        except ImportError:
            OpResolverType = None  # noqa: N806
        return Interpreter, "tflite_runtime", OpResolverType
    except ImportError as e:
        errors.append(f"tflite_runtime ({e})")
    try:
        import tensorflow as tf  # type: ignore

        return tf.lite.Interpreter, "tensorflow.lite", getattr(tf.lite.experimental, "OpResolverType", None)
    except ImportError as e:
        errors.append(f"tensorflow ({e})")
    raise BackendError(
        "no TFLite interpreter is installed (tried " + "; ".join(errors) + "); "
        "install one with: pip install 'edge-quq[litert]'"
    )


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[List[str]]:
    """Hold back what C++ code writes to file descriptor 2 while the block runs.

    TFLite prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ on the first
    allocation; on a board's journal or a user's terminal that line reads like a message from us. The text is
    kept (the yielded list gets it) so a failure can still show what the runtime said.
    EDGE_QUQ_VERBOSE=1 lets it through.
    """
    lines: List[str] = []
    if os.environ.get("EDGE_QUQ_VERBOSE"):
        yield lines
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(l for l in sink.read().decode("utf-8", "replace").splitlines() if l.strip())


def make_tflite_interpreter(model_path: str, threads: int, xnnpack: bool = True):
    cls, module, resolver = load_tflite_interpreter_class()
    kwargs = {"model_path": model_path, "num_threads": threads}
    if resolver is not None and not xnnpack:
        # The default resolver applies XNNPACK; this one runs the plain builtin kernels.
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = cls(**kwargs)
    except SystemError as e:
        if module == "tflite_runtime" and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            raise BackendError(
                f"tflite_runtime cannot run with numpy {np.__version__} (it needs numpy<2): "
                "install ai-edge-litert instead, or pin numpy<2"
            ) from None
        raise BackendError(f"{model_path}: the TFLite interpreter failed to load it ({e})") from None
    except (ValueError, RuntimeError) as e:
        raise BackendError(f"{model_path}: the TFLite interpreter failed to load it ({e})") from None
    try:
        with native_stderr_captured() as said:
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        detail = "; ".join(l for l in said if not l.startswith("INFO:"))
        raise BackendError(
            f"{model_path}: the TFLite interpreter could not allocate it ({e}{'; ' + detail if detail else ''})"
        ) from None
    return interp, module


class Backbone:
    name = "base"
    runtime = ""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class TFLiteBackbone(Backbone):
    name = "tflite"

    def __init__(self, path: Path, spec: ModelFile, threads: int, xnnpack: bool = True, layout: str = "NHWC") -> None:
        """A model file and its quantization spec (the export's parity check builds one before the manifest exists)."""
        self.spec: ModelFile = spec
        self.layout = layout
        self.threads = threads
        self.xnnpack = xnnpack
        self.interp, self.runtime = make_tflite_interpreter(str(path), threads, xnnpack)
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()[0]
        self._out = self.interp.get_output_details()[0]
        self._batch = int(self._in["shape"][0])

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self.interp.resize_tensor_input(self._in["index"], [n] + list(self._in["shape"][1:]))
            self.interp.allocate_tensors()
            self._in = self.interp.get_input_details()[0]
            self._out = self.interp.get_output_details()[0]
            self._batch = n

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self._resize(batch.shape[0])
        self.interp.set_tensor(self._in["index"], quantize(to_layout(batch, self.layout), self.spec.input))
        self.interp.invoke()
        out = self.interp.get_tensor(self._out["index"])
        return dequantize(out, self.spec.output).reshape(batch.shape[0], -1)

    def describe(self) -> str:
        return f"tflite ({self.runtime}, {self.threads} threads, XNNPACK {'on' if self.xnnpack else 'off'})"


class OnnxBackbone(Backbone):
    name = "onnx"

    def __init__(self, path: Path, spec: ModelFile, threads: int, layout: str = "NHWC") -> None:
        self.layout = layout
        try:
            import onnxruntime as ort  # type: ignore
        except ImportError as e:
            raise BackendError(f"onnxruntime is not installed ({e}); pip install onnxruntime") from None
        self.spec = spec
        self.threads = threads
        self.runtime = f"onnxruntime {ort.__version__}"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise BackendError(f"{path}: ONNX Runtime failed to load it ({e})") from None
        self._in = spec.input_name or self.session.get_inputs()[0].name
        self._out = spec.output_name or self.session.get_outputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self._out], {self._in: quantize(to_layout(batch, self.layout), self.spec.input)})[0]
        return dequantize(out, self.spec.output).reshape(batch.shape[0], -1)

    def describe(self) -> str:
        return f"onnx ({self.runtime}, {self.threads} threads, MLAS CPU)"


def tflite_available() -> bool:
    try:
        load_tflite_interpreter_class()
        return True
    except BackendError:
        return False


def onnx_available() -> bool:
    try:
        import onnxruntime  # type: ignore  # noqa: F401

        return True
    except ImportError:
        return False


def bundle_backbone(bundle: Bundle, kind: str, threads: int, xnnpack: bool = True) -> Backbone:
    """The bundle's backbone for runtime `kind` ("tflite" or "onnx")."""
    mf = bundle.backbone_tflite if kind == "tflite" else bundle.backbone_onnx
    if mf is None:
        raise BackendError(f"{bundle.path}: the bundle has no {'TFLite' if kind == 'tflite' else 'ONNX'} backbone")
    layout = bundle.input.layout
    if kind == "tflite":
        return TFLiteBackbone(bundle.file(mf.file), mf, threads, xnnpack, layout)
    return OnnxBackbone(bundle.file(mf.file), mf, threads, layout)


def make_backbone(bundle: Bundle, backend: str = "auto", threads: Optional[int] = None, xnnpack: bool = True) -> Backbone:
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    n = threads or default_threads()
    if backend == "auto":
        if bundle.backbone_tflite is not None and tflite_available():
            return bundle_backbone(bundle, "tflite", n, xnnpack)
        if bundle.backbone_onnx is not None and onnx_available():
            return bundle_backbone(bundle, "onnx", n)
        raise BackendError("no runtime can load this bundle here: install ai-edge-litert (pip install 'edge-quq[litert]') or onnxruntime")
    return bundle_backbone(bundle, backend, n, xnnpack)


def loadable_backends(bundle: Bundle) -> List[Tuple[str, str]]:
    """(backend, status) rows for `edge-quq info`: which runtimes can load this bundle on this machine."""
    rows: List[Tuple[str, str]] = []
    checks: List[Tuple[str, Callable[[], Backbone]]] = []
    if bundle.backbone_tflite is not None:
        checks.append(("tflite", lambda: bundle_backbone(bundle, "tflite", 1)))
    if bundle.backbone_onnx is not None:
        checks.append(("onnx", lambda: bundle_backbone(bundle, "onnx", 1)))
    for name, build in checks:
        try:
            rows.append((name, "loads: " + build().describe()))
        except BackendError as e:
            rows.append((name, f"cannot load: {e}"))
    return rows
