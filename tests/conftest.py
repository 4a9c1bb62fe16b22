"""Session fixtures shared by the export and runtime tests.

`tiny_bundle` trains a tiny model of the reference shape (two convs + the paper head) for a few seconds on
real Fashion-MNIST images and exports it with the real converters, once per test session.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# tests/run.sh installs everything the suite uses, so under it a skip can only mean a missing install step
# (the NEON tests once skipped on fresh machines while CI, on a machine set up by hand, passed). It sets
# EDGE_QUQ_NO_SKIPS=1, and every skip then fails the run, naming what was missing.
NO_SKIPS = os.environ.get("EDGE_QUQ_NO_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under tests/run.sh, which should have installed what it needs: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module that skips itself at import (pytest.importorskip at top level) is a collection skip.
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped at collection under tests/run.sh: {report.longrepr}"


# tests/test_torch_export.py needs torch and onnxscript (the [export-torch] extra). tests/run.sh installs a
# CPU build of torch where pip can get one (PyTorch's CPU index, or a local CPU wheel pip is configured
# with); PyPI's Linux torch is a CUDA build of several GB, which it does not install. Without torch the
# file is left out at collection - explicitly, here, and named in
# the report header - rather than skipped (run.sh turns every skip into a failure).
import importlib.util  # noqa: E402

TORCH_TESTS = ["test_torch_export.py"]
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "onnxscript"))
collect_ignore = [] if HAVE_TORCH else list(TORCH_TESTS)


def pytest_report_header(config):
    if not HAVE_TORCH:
        return f"torch/onnxscript not installed: {', '.join(TORCH_TESTS)} left out (tests/run.sh installs a CPU torch where pip can get one)"
    return None


FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY_SEED = 0
TINY_TRAIN = 2048  # images; with 4 epochs ~10 s on 2 cores, ~75% test accuracy


def _need_host_stack() -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("ai_edge_litert")
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def fashion_mnist():
    """(x_train uint8 [60000,28,28], y_train, x_test, y_test): the real data set, read once per session."""
    from edge_quq_export.datasets import load_fashion_mnist

    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")
    return (*load_fashion_mnist("train"), *load_fashion_mnist("test"))


@pytest.fixture(scope="session")
def fashion_small(fashion_mnist):
    """(x_train uint8 [N,28,28], y_train, x_test, y_test): small real slices for calibration and parity."""
    x, y, xt, yt = fashion_mnist
    return x[:TINY_TRAIN], y[:TINY_TRAIN], xt[:1000], yt[:1000]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, fashion_small) -> Path:
    _need_host_stack()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from edge_quq_export.model import compile_for_paper, tiny_cnn

    x, y, _, _ = fashion_small
    keras.utils.set_random_seed(TINY_SEED)
    model = tiny_cnn()
    compile_for_paper(model, 1e-2)
    model.fit(x[..., None].astype(np.float32) / 255.0, np.eye(10, dtype=np.float32)[y], epochs=4, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("tiny_model") / "tiny.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_files(tmp_path_factory, fashion_small):
    """Calibration (.npy, uint8 train images not used in training) and test (.npz x/y) files."""
    from edge_quq_export.datasets import load_fashion_mnist

    d = tmp_path_factory.mktemp("tiny_data")
    x, _ = load_fashion_mnist("train")
    _, _, xt, yt = fashion_small
    np.save(d / "calib.npy", x[-200:])
    np.savez(d / "test.npz", x=xt, y=yt)
    return d / "calib.npy", d / "test.npz"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_path, tiny_data_files) -> Path:
    """A real exported bundle (int8 TFLite + ONNX backbones, TFLite + ONNX heads, parity report)."""
    from edge_quq_export.datasets import FASHION_MNIST_CLASSES
    from edge_quq_export.pipeline import ExportOptions, export_model

    calib, test = tiny_data_files
    out = tmp_path_factory.mktemp("tiny_bundle_parent") / "tiny_bundle"
    export_model(tiny_model_path, ExportOptions(calibration=calib, out=out, test_data=test, classes=FASHION_MNIST_CLASSES, name="tiny"))
    return out
