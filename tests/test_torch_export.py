"""PyTorch -> bundle (edge_quq_export.from_torch, `edge-quq export model.pt2`) on real, small models.

A MobileNet-shaped (depthwise-separable blocks, Hardswish, a Linear-Hardswish-Dropout-Linear head) and a
ResNet-shaped (residual blocks with BatchNorm, a Dropout-Linear-ReLU-Dropout-Linear head) network in plain
torch (PyPI torchvision does not import against the local CPU torch), trained for a few steps on Fashion-MNIST
resized to 64x64 RGB with ImageNet normalisation. tests/conftest.py leaves this file out where torch is not
installed (collect_ignore); tests/run.sh installs torch, so CI runs it.

Stated tolerance: int8 top-1 agreement with the float model >= 90% on 200 held-out images, for the ONNX int8
backbone and for the TFLite one.

The TFLite backbone comes from onnx2tf in its own venv, named by EDGE_QUQ_ONNX2TF (tests/run.sh sets that venv
up and exports the variable). The two trained models are exported with it; every other export here runs
without it (the variable is removed for each test), so only they pay for the conversion. Without the variable
the converter tests fail rather than skip: run them through tests/run.sh, or set EDGE_QUQ_ONNX2TF yourself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from edge_quq.bundle import load_bundle  # noqa: E402
from edge_quq.errors import OptionError  # noqa: E402
from edge_quq.head import load_head_weights  # noqa: E402

SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AGREEMENT = 0.90
ONNX2TF = os.environ.get("EDGE_QUQ_ONNX2TF")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(autouse=True)
def _no_converter_by_default(monkeypatch):
    monkeypatch.delenv("EDGE_QUQ_ONNX2TF", raising=False)


def _act(kind: str):
    return {"relu": nn.ReLU(), "hardswish": nn.Hardswish(), "silu": nn.SiLU(), "gelu": nn.GELU()}[kind]


class Classifier(nn.Module):
    """features -> head -> output activation; `features` and `head` are what the bundle splits into."""

    def __init__(self, features: nn.Module, head: nn.Module, output: str) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.output = {"softmax": nn.Softmax(dim=-1), "sigmoid": nn.Sigmoid()}[output]

    def logits(self, x):
        return self.head(self.features(x))

    def forward(self, x):
        return self.output(self.logits(x))


def mobilenet_like(hidden: str = "hardswish", output: str = "softmax") -> Classifier:
    def dw(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Hardswish(),
                             nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish())

    features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
                             dw(8, 16, 2), dw(16, 24, 2), dw(24, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 48), _act(hidden), nn.Dropout(0.3), nn.Linear(48, 10))
    return Classifier(features, head, output)


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet_like(hidden: str = "relu", output: str = "sigmoid") -> Classifier:
    features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             Residual(8, 16, 2), Residual(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Sequential(nn.Dropout(0.25), nn.Linear(32, 32), _act(hidden), nn.Dropout(0.5), nn.Linear(32, 10))
    return Classifier(features, head, output)


def _rgb64(x: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([np.repeat(cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_AREA)[:, :, None], 3, axis=2) for im in x])


def _tensor(x_uint8: np.ndarray):
    x = (x_uint8.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="session")
def fashion64():
    from edge_quq_export.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    return _rgb64(x[:1536]), y[:1536].astype(np.int64), _rgb64(xt[:200]), yt[:200].astype(np.int64)


def _train(model: Classifier, data, steps: int = 40, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x, y = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        i = rng.choice(len(x), 64, replace=False)
        loss = nn.functional.cross_entropy(model.logits(_tensor(x[i])), torch.from_numpy(y[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _export(model, data, out: Path, exporter: str):
    from edge_quq_export import from_torch

    torch.manual_seed(0)
    return from_torch(model, _tensor(data[2][:2]), out, data[0][:128], exporter=exporter, test_data=data[2],
                      test_labels=data[3], mean=MEAN, std=STD, classes=[f"c{i}" for i in range(10)], onnx2tf=ONNX2TF)


@pytest.fixture(scope="session")
def mobilenet(fashion64, tmp_path_factory):
    torch.manual_seed(1)
    model = _train(mobilenet_like("hardswish", "softmax"), fashion64)
    return model, _export(model, fashion64, tmp_path_factory.mktemp("torch") / "mobilenet", "torchscript")


@pytest.fixture(scope="session")
def resnet(fashion64, tmp_path_factory):
    torch.manual_seed(2)
    model = _train(resnet_like("relu", "sigmoid"), fashion64)
    return model, _export(model, fashion64, tmp_path_factory.mktemp("torch") / "resnet", "dynamo")


@pytest.fixture(params=["mobilenet", "resnet"])
def trained(request):
    return request.getfixturevalue(request.param)


def test_bundle_records_nchw_imagenet_rgb(trained):
    _, bundle = trained
    b = load_bundle(bundle.path)
    assert b.input.layout == "NCHW" and b.input.shape == (SIZE, SIZE, 3)
    assert b.input.preprocess.color == "rgb" and b.input.preprocess.mean == MEAN and b.input.preprocess.std == STD
    assert (b.backbone_tflite is None) == ("backbone_note" in b.manifest)


def test_onnx2tf_makes_the_tflite_backbone_of_the_mobilenet(mobilenet, fashion64, tmp_path):
    """onnx2tf converts the MobileNet-shaped backbone to full int8 (int8 input and output) with parity, the
    runtime loads it, and `predict` gives the same class through both backbones."""
    assert ONNX2TF, "EDGE_QUQ_ONNX2TF is not set: run tests/run.sh, which sets up onnx2tf's venv"
    _, bundle = mobilenet
    b = load_bundle(bundle.path)
    assert b.backbone_tflite is not None, b.manifest.get("backbone_note")
    assert b.backbone_tflite.input.dtype == "int8" and b.backbone_tflite.output.dtype == "int8"
    report = json.loads((bundle.path / "parity.json").read_text())
    row = report["int8"]["tflite"]
    assert report["tflite_converter"] == "onnx2tf" and row["top1_agreement"] >= AGREEMENT, row
    assert row["feature_cosine_mean"] >= 0.98, row
    assert "int8 tflite" in (bundle.path / "parity.md").read_text()
    import cv2

    from edge_quq.predictor import Predictor

    img = tmp_path / "x.png"
    cv2.imwrite(str(img), fashion64[2][0][:, :, ::-1])
    preds = {k: Predictor.from_bundle(bundle.path, seed=0, sampler="numpy", backend=k).predict(str(img)) for k in ("tflite", "onnx")}
    np.testing.assert_allclose(preds["tflite"].deterministic, preds["onnx"].deterministic, atol=0.1)


def test_onnx2tf_converts_the_dynamo_exported_resnet(resnet):
    assert ONNX2TF, "EDGE_QUQ_ONNX2TF is not set: run tests/run.sh, which sets up onnx2tf's venv"
    _, bundle = resnet
    assert load_bundle(bundle.path).backbone_tflite is not None
    row = json.loads((bundle.path / "parity.json").read_text())["int8"]["tflite"]
    assert row["top1_agreement"] >= AGREEMENT and row["feature_cosine_mean"] >= 0.98, row


def test_onnx2tf_failure_leaves_an_onnx_only_bundle_that_says_why(fashion64, tmp_path):
    """onnx2tf 1.29 cannot convert the TorchScript export of the ResNet-shaped backbone (it mislays the channel
    axis before the final Flatten; the dynamo export of the same network converts): the bundle is ONNX-only,
    and info and the parity report name the converter's error."""
    assert ONNX2TF, "EDGE_QUQ_ONNX2TF is not set: run tests/run.sh, which sets up onnx2tf's venv"
    from click.testing import CliRunner

    from edge_quq.cli import main
    from edge_quq_export import from_torch

    torch.manual_seed(5)
    data = fashion64
    bundle = from_torch(resnet_like("relu", "softmax").eval(), _tensor(data[2][:2]), tmp_path / "b", data[0][:32],
                        test_data=data[2][:50], mean=MEAN, std=STD, onnx2tf=ONNX2TF)
    b = load_bundle(bundle.path)
    note = b.manifest["backbone_note"]
    assert b.backbone_tflite is None and note.startswith("ONNX only: onnx2tf could not convert"), note
    assert json.loads((bundle.path / "parity.json").read_text())["backbone_note"] == note
    assert note in (bundle.path / "parity.md").read_text()
    assert "none: ONNX only: onnx2tf" in CliRunner().invoke(main, ["info", str(bundle.path)]).output


def test_exported_head_matches_the_torch_head(trained):
    model, bundle = trained
    head = load_head_weights(bundle)
    x = _tensor(np.random.default_rng(0).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8))
    with torch.no_grad():
        feats = model.features(x)
        ref = model.output(model.head(feats)).numpy()
    np.testing.assert_allclose(head.probs(feats.numpy()), ref, atol=1e-5)
    assert head.rates == tuple(m.p for m in model.head if isinstance(m, nn.Dropout))


def test_int8_top1_agrees_with_float(trained):
    _, bundle = trained
    report = json.loads((bundle.path / "parity.json").read_text())
    row = report["int8"]["onnx"]
    assert report["samples"] == 200 and row["top1_agreement"] >= AGREEMENT, row
    assert report["float"]["top1_accuracy"] > 0.2  # trained to twice chance (10%) at least: the agreement means something


def test_mc_samplers_match_the_numpy_reference(trained):
    from edge_quq.samplers import make_sampler
    from edge_quq.samplers.base import draw_keep_masks

    _, bundle = trained
    head = load_head_weights(bundle)
    feats = np.abs(np.random.default_rng(3).normal(size=head.feature_size)).astype(np.float32)
    ref = make_sampler("numpy", head, seed=5)
    if head.relu_only:
        masks = draw_keep_masks(np.random.default_rng(7), head, 64)
        a = ref.sample_with_masks(feats, masks)
        b = make_sampler("native", head, seed=5).sample_with_masks(feats, masks)
        np.testing.assert_allclose(b.mean, a.mean, atol=1e-5)
        np.testing.assert_allclose(b.std, a.std, atol=1e-5)
    else:
        for name in ("native", "analytic"):
            with pytest.raises(OptionError):
                make_sampler(name, head, seed=5)
    m_ref = ref.sample(feats, 64)
    for name in ("onnx", "tflite"):
        m = make_sampler(name, head, seed=5, bundle=load_bundle(bundle.path)).sample(feats, 64)
        np.testing.assert_allclose(m.mean, m_ref.mean, atol=1e-5)
        np.testing.assert_allclose(m.std, m_ref.std, atol=1e-5)


@pytest.mark.parametrize("hidden", ["relu", "hardswish", "silu", "gelu"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_head_activations_through_both_exporters(hidden, exporter, tmp_path):
    """Untrained (random) models: the head the ONNX path reads equals the torch head on the same features."""
    from edge_quq_export.onnx_graph import Graph, find_split, parse_head
    from edge_quq_export.torch_export import head_rates, to_onnx

    import onnx

    torch.manual_seed(3)
    model = mobilenet_like(hidden, "sigmoid" if hidden in ("silu", "gelu") else "softmax").eval()
    x = _tensor(np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8))
    path = to_onnx(model, x, tmp_path / "m.onnx", exporter)
    g = Graph(onnx.load(str(path)))
    rates = head_rates(model)
    head, _ = parse_head(g, find_split(g, None, rates)[0], rates)
    with torch.no_grad():
        feats = model.features(x)
        ref = model.output(model.head(feats)).numpy()
    assert head.hidden_activations == (hidden,) and head.rates == (0.2, 0.3)
    np.testing.assert_allclose(head.probs(feats.numpy()), ref, atol=1e-5)


def test_pt2_archive_on_the_cli(fashion64, tmp_path):
    from click.testing import CliRunner

    from edge_quq_export.cli import export_cmd

    torch.manual_seed(4)
    model = resnet_like("gelu", "softmax").eval()
    ep = torch.export.export(model, (_tensor(fashion64[2][:2]),), dynamic_shapes=({0: torch.export.Dim("N")},))
    torch.export.save(ep, str(tmp_path / "resnet.pt2"))
    np.save(tmp_path / "quant.npy", fashion64[0][:64])
    args = [str(tmp_path / "resnet.pt2"), "--quant-data", str(tmp_path / "quant.npy"), "--out", str(tmp_path / "b"),
            "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    r = runner.invoke(export_cmd, args)  # no --dropout: the archive keeps no Dropout
    assert r.exit_code == 2 and "--dropout" in r.stderr and not (tmp_path / "b").exists()
    r = runner.invoke(export_cmd, args + ["--dropout", "0.25,0.5"])
    assert r.exit_code == 0, r.stderr
    head = load_head_weights(load_bundle(tmp_path / "b"))
    assert head.hidden_activations == ("gelu",) and head.rates == (0.25, 0.5)


def test_from_pytorch_example(tmp_path):
    """examples/from_pytorch.py as a user runs it: trains, exports with onnx2tf, and `edge-quq predict` keeps
    its prediction of the first test image through the TFLite backbone."""
    import subprocess
    import sys

    assert ONNX2TF, "EDGE_QUQ_ONNX2TF is not set: run tests/run.sh, which sets up onnx2tf's venv"
    example = Path(__file__).resolve().parents[1] / "examples" / "from_pytorch.py"
    r = subprocess.run([sys.executable, str(example), str(tmp_path / "b")], capture_output=True, text=True, cwd=tmp_path,
                       timeout=1200, env={**os.environ, "EDGE_QUQ_ONNX2TF": ONNX2TF})
    assert r.returncode == 0, r.stderr
    assert "TFLite backbone: onnx2tf" in r.stdout and "backend=tflite" in r.stdout, r.stdout
    acc = load_bundle(tmp_path / "b").manifest["accuracy"]
    assert acc["float"] > 0.4 and abs(acc["int8_tflite"] - acc["float"]) <= 0.05, acc


def test_a_tflite_backbone_that_loses_parity_is_left_out(fashion64, tmp_path, monkeypatch):
    """The parity gate, made unreachable (mean cosine above 1): onnx2tf's backbone is measured, removed, and its
    row kept in parity.json as `tflite_rejected`; the bundle is ONNX-only and says why."""
    assert ONNX2TF, "EDGE_QUQ_ONNX2TF is not set: run tests/run.sh, which sets up onnx2tf's venv"
    from edge_quq_export import from_torch, onnx_import

    monkeypatch.setattr(onnx_import, "TFLITE_MIN_COSINE", 1.01)
    torch.manual_seed(6)
    data = fashion64
    bundle = from_torch(mobilenet_like("relu", "softmax").eval(), _tensor(data[2][:2]), tmp_path / "b", data[0][:32],
                        test_data=data[2][:50], mean=MEAN, std=STD, onnx2tf=ONNX2TF)
    b = load_bundle(bundle.path)
    report = json.loads((bundle.path / "parity.json").read_text())
    assert b.backbone_tflite is None and not (bundle.path / "backbone_int8.tflite").exists()
    assert "lost parity" in b.manifest["backbone_note"] and report["tflite_rejected"]["feature_cosine_mean"] > 0.9
    assert report["tflite_converter"] == "onnx2tf" and set(report["int8"]) == {"onnx"}
