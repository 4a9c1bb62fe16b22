"""`edge-quq export model.onnx`: head extraction, the ONNX-only bundle, samplers on non-ReLU heads, error paths.

The ONNX classifiers here are built with onnx.helper (no torch needed): a conv backbone, then a head spelled the
way exporters spell it (Gemm with transB/alpha/beta, MatMul+Add, BatchNormalization, HardSwish, Sigmoid*Mul,
the erf form of GELU). tests/test_torch_export.py covers real PyTorch-exported models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_quq.bundle import InputSpec, load_bundle  # noqa: E402
from edge_quq.errors import OptionError  # noqa: E402
from edge_quq.head import HeadWeights, hidden_activation  # noqa: E402
from edge_quq.preprocess import to_layout  # noqa: E402

HW, C, F, HIDDEN, CLASSES = 16, 3, 6, 12, 4


class _G:
    """A tiny ONNX graph builder: nodes, initializers, unique names."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: List = []
        self.inits: List = []
        self.i = 0

    def const(self, a: np.ndarray) -> str:
        self.i += 1
        name = f"c{self.i}"
        self.inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def op(self, op: str, inputs: List[str], name: Optional[str] = None, **attrs) -> str:
        self.i += 1
        out = f"t{self.i}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or f"{op}_{self.i}", **attrs))
        return out

    def randn(self, *shape, scale: float = 0.5) -> np.ndarray:
        return (self.rng.normal(size=shape) * scale).astype(np.float32)


def _activation(g: _G, x: str, kind: str) -> str:
    if kind == "relu":
        return g.op("Relu", [x])
    if kind == "hardswish":
        return g.op("HardSwish", [x])
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if kind == "gelu":  # TorchScript's spelling: x * 0.5 * (1 + erf(x / sqrt(2)))
        e = g.op("Erf", [g.op("Div", [x, g.const(np.sqrt(2.0))])])
        return g.op("Mul", [g.op("Mul", [x, g.op("Add", [e, g.const(1.0)])]), g.const(0.5)])
    if kind == "tanh":
        return g.op("Tanh", [x], name="head_tanh")
    raise ValueError(kind)


def classifier(hidden: str = "relu", output: str = "softmax", dropout: bool = True, bn: bool = True,
               gemm_style: str = "transB", dims: Optional[list] = None, dense: bool = True, seed: int = 0):
    """Conv backbone [N, 3, 16, 16] -> GAP -> Flatten -> head -> [N, CLASSES]."""
    g = _G(seed)
    x = g.op("Relu", [g.op("Conv", ["image", g.const(g.randn(F, C, 3, 3)), g.const(g.randn(F))], strides=[2, 2], pads=[1, 1, 1, 1])])
    h = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    if dense:
        if dropout:
            h = g.op("Dropout", [h, g.const(np.array(0.2))], name="head_dropout0")
        w0 = g.randn(F, HIDDEN)
        if gemm_style == "transB":
            h = g.op("Gemm", [h, g.const(w0.T), g.const(g.randn(HIDDEN))], transB=1)
        else:  # alpha, beta, untransposed B
            h = g.op("Gemm", [h, g.const(w0), g.const(g.randn(HIDDEN))], alpha=0.7, beta=1.3)
        if bn:
            h = g.op("BatchNormalization", [h, g.const(1 + g.randn(HIDDEN, scale=0.2)), g.const(g.randn(HIDDEN)),
                                            g.const(g.randn(HIDDEN)), g.const(1 + np.abs(g.randn(HIDDEN)))], epsilon=1e-5)
        h = _activation(g, h, hidden)
        if dropout:
            h = g.op("Dropout", [h, g.const(np.array(0.5))])
        h = g.op("Add", [g.op("MatMul", [h, g.const(g.randn(HIDDEN, CLASSES))]), g.const(g.randn(CLASSES))])
        if output == "softmax":
            h = g.op("Softmax", [h], axis=-1)
        elif output == "sigmoid":
            h = g.op("Sigmoid", [h])
    dims = dims or ["N", C, HW, HW]
    graph = helper.make_graph(g.nodes, "classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", None])], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, HW, HW, C), dtype=np.uint8)


def _nchw(n: int, seed: int) -> np.ndarray:
    return to_layout((_images(n, seed).astype(np.float32) / 255.0 - 0.45) / 0.25, "NCHW")


def _head(model, dropout=None):
    from edge_quq_export.onnx_graph import Graph, find_split, parse_head

    g = Graph(model)
    split, _ = find_split(g, None, dropout)
    return split, parse_head(g, split, dropout)[0]


@pytest.mark.parametrize("hidden", ["relu", "hardswish", "silu", "gelu"])
@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_head_is_extracted_exactly(hidden, output):
    from edge_quq_export.onnx_import import float_backbone, run_model

    model = classifier(hidden, output)
    split, head = _head(model)
    assert head.hidden_activations == (hidden,) and head.activation == output and head.rates == (0.2, 0.5)
    x = _nchw(32, 1)
    feats = run_model(float_backbone(model, split), x)
    np.testing.assert_allclose(head.probs(feats), run_model(model, x), atol=2e-6)


def test_gemm_alpha_beta_and_no_dropout_needs_rates():
    from edge_quq.errors import ExportError
    from edge_quq_export.onnx_import import float_backbone, run_model

    model = classifier("relu", "linear", dropout=False, bn=False, gemm_style="alpha")
    with pytest.raises(ExportError, match="--dropout"):
        _head(model)
    split, head = _head(model, [0.1, 0.3])
    assert head.rates == (0.1, 0.3) and head.activation == "linear"
    x = _nchw(8, 2)
    np.testing.assert_allclose(head.logits(run_model(float_backbone(model, split), x)), run_model(model, x), rtol=1e-5, atol=1e-5)
    # One rate: the head is the last dense layer only, the first Gemm and its ReLU join the backbone.
    split1, head1 = _head(model, [0.3])
    assert len(head1.kernels) == 1 and head1.feature_size == HIDDEN


@pytest.mark.parametrize("kind", ["hardswish", "silu", "gelu"])
def test_numpy_activations_match_torch_definitions(kind):
    x = np.linspace(-5, 5, 101)
    ref = {"hardswish": x * np.clip(x + 3, 0, 6) / 6, "silu": x / (1 + np.exp(-x)),
           "gelu": np.array([0.5 * v * (1 + __import__("math").erf(v / np.sqrt(2))) for v in x])}[kind]
    np.testing.assert_allclose(hidden_activation(x, kind), ref, atol=1e-6)


def test_layout_field_round_trips_and_defaults_to_nhwc():
    d = {"shape": [16, 16, 3], "preprocess": {"color": "rgb", "resize": [16, 16], "mean": [0.485, 0.456, 0.406],
                                              "std": [0.229, 0.224, 0.225]}}
    old = InputSpec.from_json(d, "m")
    assert old.layout == "NHWC"
    new = InputSpec.from_json({**d, "layout": "NCHW"}, "m")
    assert InputSpec.from_json(new.to_json(), "m") == new and new.layout == "NCHW"
    x = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    assert to_layout(x, "NCHW").shape == (2, 3, 4, 5) and to_layout(x, "NHWC") is x


# --- the whole export through the CLI ------------------------------------------------------------------------

def _export(tmp: Path, model, *extra: str, out: str = "bundle", env=None):
    """(exit code, stderr, OUT) of `edge-quq export model.onnx ...` run in-process; without onnx2tf unless `env`
    names it (tests/run.sh sets EDGE_QUQ_ONNX2TF for tests/test_torch_export.py, which converts)."""
    from click.testing import CliRunner

    from edge_quq_export.cli import export_cmd

    path = tmp / "model.onnx"
    onnx.save(model, str(path))
    np.save(tmp / "quant.npy", _images(48, 3))
    argv = [str(path), "--quant-data", str(tmp / "quant.npy"), "--out", str(tmp / out), "--mean", "0.45", "--std", "0.25", *extra]
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart by default
    r = runner.invoke(export_cmd, argv, env=env or {"EDGE_QUQ_ONNX2TF": None})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stderr, tmp / out


@pytest.fixture(scope="module")
def gelu_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_gelu")
    code, err, out = _export(tmp, classifier("gelu", "softmax"))
    assert code == 0, err
    return load_bundle(out)


def test_onnx_only_bundle_with_nchw_input(gelu_bundle):
    b = gelu_bundle
    assert b.input.layout == "NCHW" and b.backbone_tflite is None and b.backbone_onnx is not None
    assert "ONNX only" in b.manifest["backbone_note"] and "--onnx2tf" in b.manifest["backbone_note"]
    report = json.loads((b.path / "parity.json").read_text())
    assert report["head_reproduction_max_abs"] < 1e-5
    assert max(report["exported_head_vs_numpy_max_abs"].values()) < 1e-5
    # Int8 top-1 agreement with float on the quantization images: random weights and images, so only the
    # features are a meaningful check (cosine); 90% agreement is the stated tolerance.
    assert report["int8"]["onnx"]["feature_cosine_mean"] > 0.99 and report["int8"]["onnx"]["top1_agreement"] >= 0.9
    assert "ONNX only" in (b.path / "parity.md").read_text()
    from edge_quq.bundle import bundle_summary

    rows = dict(bundle_summary(b))
    assert rows["backbone tflite"].startswith("none: ONNX only") and "NCHW" in rows["input"]


def test_predict_feeds_nchw_rgb_from_files(gelu_bundle, tmp_path):
    """A file decoded as BGR reaches the NCHW model as RGB: the runtime's eval-mode probabilities match the
    float model run on the same pixels converted by hand, up to int8."""
    import cv2

    from edge_quq.predictor import Predictor
    from edge_quq_export.onnx_import import run_model

    rgb = _images(1, 9)[0]
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), rgb[:, :, ::-1])  # OpenCV writes BGR
    pred = Predictor.from_bundle(gelu_bundle.path, seed=0, sampler="numpy", backend="onnx").predict(str(img))
    x = to_layout(((rgb.astype(np.float32) / 255.0 - 0.45) / 0.25)[None], "NCHW")
    model = onnx.load(str(gelu_bundle.path.parent / "model.onnx"))
    np.testing.assert_allclose(pred.deterministic, run_model(model, x)[0], atol=0.05)
    wrong = run_model(model, to_layout(((rgb[:, :, ::-1].astype(np.float32) / 255.0 - 0.45) / 0.25)[None], "NCHW"))[0]
    assert np.abs(np.asarray(pred.deterministic) - run_model(model, x)[0]).max() < np.abs(np.asarray(pred.deterministic) - wrong).max()


def test_samplers_on_a_gelu_head(gelu_bundle):
    from edge_quq.head import load_head_weights
    from edge_quq.samplers import make_sampler, resolve_auto
    from edge_quq.samplers.base import full_keep_masks
    from edge_quq_export.parity import run_head_model

    head = load_head_weights(gelu_bundle)
    assert head.hidden_activations == ("gelu",)
    assert resolve_auto(head) == "numpy"
    for name in ("native", "analytic"):
        with pytest.raises(OptionError, match="ReLU|relu"):
            make_sampler(name, head, seed=0)
    feats = np.abs(np.random.default_rng(0).normal(size=(8, head.feature_size))).astype(np.float32)
    masks = full_keep_masks(np.random.default_rng(1), head, 8)
    ref = head.probs(feats, masks)
    for kind in ("onnx", "tflite"):
        got = run_head_model(kind, gelu_bundle.path / getattr(gelu_bundle.head, kind), feats, masks)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    ref_m = make_sampler("numpy", head, seed=3).sample(feats[0], 64)
    onnx_m = make_sampler("onnx", head, seed=3, bundle=gelu_bundle).sample(feats[0], 64)
    np.testing.assert_allclose(onnx_m.mean, ref_m.mean, atol=1e-5)
    np.testing.assert_allclose(onnx_m.std, ref_m.std, atol=1e-5)


@pytest.mark.parametrize("case, extra, message", [
    ("no_linear", ("--dropout", "0.5"), "no Linear head found"),
    ("unsupported", (), "'head_tanh' (Tanh)"),
    ("dynamic", (), "only the batch may be dynamic"),
    ("no_dropout", (), "--dropout"),
])
def test_error_paths_one_line_exit_2_nothing_written(case, extra, message, tmp_path):
    model = {"no_linear": lambda: classifier(dense=False), "unsupported": lambda: classifier("tanh"),
             "dynamic": lambda: classifier(dims=["N", C, "H", "W"]), "no_dropout": lambda: classifier(dropout=False)}[case]()
    code, err, out = _export(tmp_path, model, *extra)
    err = err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_converter_that_is_not_there_is_a_bad_option(how, tmp_path):
    """--onnx2tf PATH or EDGE_QUQ_ONNX2TF naming no executable: one error line, exit 2, nothing written."""
    missing = str(tmp_path / "no-venv" / "bin" / "onnx2tf")
    extra, env = (("--onnx2tf", missing), None) if how == "option" else ((), {"EDGE_QUQ_ONNX2TF": missing})
    code, err, out = _export(tmp_path, classifier("relu", "softmax"), *extra, env=env)
    assert code == 2 and not out.exists(), err
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1 and "onnx2tf" in err

