"""The benchmark suite (bench/): corruptions, batched head maths against the runtime, metrics the suite leans
on beyond tests/test_metrics.py, and a small real run of `python -m bench.run` writing every output."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score, average_precision_score

from bench.suite.corruptions import CORRUPTIONS, corrupt
from edge_quq import metrics as M
from heads import PARITY_IDS, parity_head, relu_rows

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def images():
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST IDX files missing (apt-get install dataset-fashion-mnist)")
    from edge_quq_export.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    return x[:64], y[:64]


# --- corruptions -----------------------------------------------------------------------------------------------

def test_nineteen_corruption_types():
    assert len(CORRUPTIONS) == 19


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_shape_dtype_determinism_and_severity(name, images):
    x, _ = images
    outs = {}
    for sev in (1, 5):
        a = corrupt(name, x, sev, seed=3)
        assert a.shape == x.shape and a.dtype == np.uint8
        b = corrupt(name, x, sev, seed=3)
        np.testing.assert_array_equal(a, b)  # same seed, same images
        outs[sev] = np.abs(a.astype(np.float64) - x).mean()
    if name == "saturate":
        # colour-only: identity on gray at severities 1-3 (documented control)
        np.testing.assert_array_equal(corrupt(name, x, 1), x)
    elif name != "elastic_transform":
        # elastic is not monotone in pixel change by design (CIFAR-C: the affine part shrinks as the warp grows)
        assert outs[5] > outs[1], (name, outs)
        assert outs[1] > 0.0


def test_corruption_seed_changes_random_types(images):
    x, _ = images
    assert not np.array_equal(corrupt("gaussian_noise", x, 3, seed=0), corrupt("gaussian_noise", x, 3, seed=1))


def test_corruption_rejects_bad_input(images):
    x, _ = images
    with pytest.raises(ValueError, match="severity"):
        corrupt("fog", x, 6)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt("rain", x, 1)
    with pytest.raises(ValueError, match="uint8"):
        corrupt("fog", x.astype(np.float32), 1)


# --- batched head maths against the runtime's per-sample code ----------------------------------------------------

@pytest.mark.parametrize("shape", PARITY_IDS)
def test_batched_gradient_and_closed_form_match_runtime(shape):
    """bench's head run is the runtime's math: closed form, gradient and eval pass equal the runtime samplers'
    per-sample results, for sigmoid and softmax heads with one and two hidden layers."""
    from edge_quq.gradients import gradient_score
    from edge_quq.samplers import make_sampler
    from bench.suite.core import run_head

    head = parity_head(shape)
    x = relu_rows(40, head.feature_size, 0)
    run = run_head(head, x, 8, seed=1)
    np.testing.assert_allclose(run.gradient, [gradient_score(head, v) for v in x], rtol=1e-6)
    an = make_sampler("analytic", head)
    ref = [an.sample(v, 0) for v in x]
    # float32 products: a batched matmul may round differently from a one-row one
    np.testing.assert_allclose(run.an_mean, [r.mean for r in ref], atol=1e-6)
    np.testing.assert_allclose(run.an_std, [r.std for r in ref], atol=1e-6)
    np.testing.assert_allclose(run.det_probs, [r.deterministic for r in ref], atol=1e-6)


@pytest.mark.parametrize("shape", PARITY_IDS)
def test_batched_mc_matches_numpy_sampler_in_distribution(shape):
    """Same seed, same mask stream: bench's MC samples are exactly the numpy sampler's, sample by sample."""
    from edge_quq.samplers.reference import NumpySampler
    from edge_quq.scores import compute_scores
    from bench.suite.core import run_head, score_dict

    head = parity_head(shape)
    x = relu_rows(5, head.feature_size, 2)
    run = run_head(head, x, 64, seed=3)
    ref = NumpySampler(head, seed=3)
    mean, std, _ = run.moments(64)
    bench_scores = score_dict(run, 64, head.activation)
    for i in range(5):
        r = ref.sample(x[i], 64)
        np.testing.assert_allclose(mean[i], r.mean, atol=1e-6)
        np.testing.assert_allclose(std[i], r.std, atol=1e-6)
        rs = compute_scores(r.mean, r.std, r.logits, r.expected_entropy, head.activation)
        assert bench_scores["mutual_information"][i] == pytest.approx(float(rs["mutual_information"]), abs=1e-5)
        assert bench_scores["entropy_mc"][i] == pytest.approx(float(rs["predictive_entropy"]), abs=1e-5)
        assert bench_scores["energy"][i] == pytest.approx(float(rs["energy"]), rel=1e-5)


def test_apply_rule_matches_per_sample_decide():
    from edge_quq.decision import decide, decide_many

    g = np.random.default_rng(4)
    mean = g.uniform(0, 1, (300, 5))
    std = g.uniform(0, 0.3, (300, 5))
    rr = decide_many(mean, std, 0.8, 0.5, "ignore")
    for i in range(300):
        d = decide(mean[i], std[i], 0.8, 0.5, "ignore")
        assert rr.keep[i] == d.keep
        assert rr.labels[i] == (d.label if d.keep else -1)
        assert tuple(np.flatnonzero(rr.indicators[i])) == d.classes


def test_risk_at_k_by_hand():
    from bench.suite.evaluate import risk_at_k

    unc = np.array([0.1, 0.5, 0.2, 0.9])
    wrong = np.array([0, 1, 1, 1], float)
    assert risk_at_k(unc, wrong, 1) == 0.0
    assert risk_at_k(unc, wrong, 2) == 0.5  # samples 0 and 2
    assert risk_at_k(unc, wrong, 4) == 0.75


# --- metrics the suite reports, against scikit-learn / independent code ---------------------------------------------

def test_nll_matches_sklearn_log_loss():
    g = np.random.default_rng(5)
    p = g.dirichlet(np.ones(4), 200)
    y = g.integers(0, 4, 200)
    assert M.nll(p, y) == pytest.approx(log_loss(y, p, labels=range(4)), rel=1e-9)


def test_ece_matches_independent_binning():
    g = np.random.default_rng(6)
    conf = g.uniform(0, 1, 1000)
    conf[:5] = [0.0, 1.0, 1 / 15, 2 / 15, 0.5]  # bin edges: right-closed bins
    correct = g.random(1000) < conf
    edges = np.linspace(0, 1, 16)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf <= hi)
        if m.any():
            total += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    assert M.ece(conf, correct, 15) == pytest.approx(total, abs=1e-12)


def test_ood_metrics_match_sklearn_in_openood_convention():
    g = np.random.default_rng(7)
    s_id = g.normal(0, 1, 500)
    s_ood = g.normal(1, 1, 300)
    r = M.ood_metrics(s_id, s_ood)
    s = np.r_[s_id, s_ood]
    is_ood = np.r_[np.zeros(500), np.ones(300)]
    assert r["auroc"] == pytest.approx(roc_auc_score(is_ood, s))
    assert r["aupr_out"] == pytest.approx(average_precision_score(is_ood, s))
    assert r["aupr_in"] == pytest.approx(average_precision_score(1 - is_ood, -s))
    # FPR@95 by hand: the ID share at or above the threshold keeping 95% of OOD
    thr = np.sort(s_ood)[int(np.floor(0.05 * 300))]
    assert np.mean(s_ood >= thr) >= 0.95
    assert r["fpr95"] == pytest.approx(np.mean(s_id >= thr))


def test_micro_f1_multi_hot_matches_sklearn():
    from sklearn.metrics import f1_score

    g = np.random.default_rng(8)
    pred = g.random((100, 6)) < 0.2
    true = np.zeros((100, 6), bool)
    true[np.arange(100), g.integers(0, 6, 100)] = True
    assert M.micro_f1(pred, true) == pytest.approx(f1_score(true, pred, average="micro"))


# --- the command ------------------------------------------------------------------------------------------------

def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_small_run_writes_every_output(tmp_path, images):
    pytest.importorskip("matplotlib")
    from bench.suite.render import FIGURES

    out = tmp_path / "suite"
    r = _run("--out", str(out), "--quick", "--quiet", "--samples", "300", "--corrupt-samples", "40", "--ood-samples", "40",
             "--reps", "30", "--corruptions", "gaussian_noise,fog,contrast", "--severities", "1,5", "--splits", "5",
             "--drift-seeds", "2", "--drift-frames", "300", "--gate-detectors", "usable;mahalanobis,knn")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("report.json", "report.md") + FIGURES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["grid"]) == 9 and {g["T"] for g in rep["grid"]} == {20, 30, 50}
    assert set(rep["corruptions"]["cells"]) == {"gaussian_noise", "fog", "contrast"}
    assert set(rep["corruptions"]["cells"]["fog"]) == {"1", "5"}
    assert rep["bundle"]["manifest_sha256"] and rep["command"].startswith("python -m bench.run")
    scores = rep["selective"]["aurc"]
    for s in ("max_prob_plain", "max_prob_mc", "entropy_mc", "mc_std", "mutual_information", "energy", "analytic_max_prob", "gradient"):
        assert s in scores
        assert set(rep["ood"]["far"]["uniform noise"][s]) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    md = (out / "report.md").read_text()
    for heading in ("Table I:", "Table II:", "Tables III-V", "Tables VI-XIII", "Table XIV", "Selective prediction", "OOD detection",
                    "Calibration", "Verdict"):
        assert heading in md
    _check_policy_sections(rep, md, out)


def _check_policy_sections(rep: dict, md: str, out: Path) -> None:
    """Issue 14's sections of the tiny run: every policy on clean, far-OOD and corrupted sets, the split check,
    drift, cost and the verdict against the targets."""
    from bench.suite.render_policies import POLICY_FIGURES

    p = rep["policies"]
    pols = ({"paper", "maxprob@paper-coverage", "gated", "gated[mahalanobis+knn]", "risk@1%", "risk@2%", "risk@5%"}
            | {f"gate:{d}" for d in p["settings"]["usable_detectors"]})
    assert set(p["clean"]) == pols and "mahalanobis" in p["settings"]["usable_detectors"]
    for v in p["clean"].values():
        assert 0.0 <= v["coverage"] <= 1.0 and len(v["coverage_ci95"]) == 2
    assert {"photos (skimage.data)", "photo (matplotlib grace_hopper.jpg)", "photos (sklearn sample images)", "uniform noise",
            "real handwritten digits (full frame)", "real handwritten digits (centred)"} <= set(p["far"])
    assert set(p["far"]["uniform noise"]) == pols and set(p["shifted"]["fog"]["5"]) == pols
    assert p["splits"]["splits"] == 5 and set(p["splits"]["gate"]) == {k for k in pols if k.startswith("gate")}
    assert set(p["drift"]["frames_to_alarm"]) == {"gaussian_noise", "fog", "contrast"}
    assert p["drift"]["false_alarms"]["frames"] == 300 and p["drift"]["false_alarms"]["seeds"] == 2
    assert p["cost"]["whole_decision"]["p50_us"] > 0
    # the policies as the bundle ships them: its gate and risk table, on every clean image
    sh = p["shipped"]
    assert set(sh["clean"]) == {"paper", "gated", "risk@1%", "risk@2%", "risk@5%"} and sh["clean"]["gated"]["n"] == 300
    assert set(sh["far"]) == set(p["far"]) and set(sh["shifted"]["fog"]["5"]) == set(sh["clean"])
    assert "As the bundle ships them" in md
    pop = p["population"]
    assert pop["resamples"] == 25 and set(pop["risk"]) == {"risk@1%", "risk@2%", "risk@5%"}
    assert all(0.0 <= v["violation_rate"] <= 1.0 for v in pop["risk"].values()) and "i.i.d. calibration draws" in md
    assert len(p["targets"]) == 11 and all(t["met"] in (True, False, None) for t in p["targets"])
    assert "## Decision policies (issue 14)" in md and "Against the issue's targets" in md
    for name in POLICY_FIGURES:
        assert (out / name).is_file(), name


def test_policy_math_on_synthetic_scores():
    """The split check on exchangeable synthetic data: single gates ignore about alpha of in-distribution
    samples, the combined gate less, and the risk policy's violation frequency stays near or below delta."""
    from bench.suite import decisions as dc

    g = np.random.default_rng(5)
    n = 4000
    conf = g.uniform(0.3, 1.0, n)
    y = np.zeros(n, int)
    pred = np.where(g.random(n) < 0.2 * (1 - conf), 1, 0)  # more confident, more often right
    det = {"a": g.normal(size=n), "b": g.normal(size=n), "const": np.ones(n), "nan": np.full(n, np.nan)}
    a = dc.SetArrays(det, conf, pred, np.ones(n, bool), pred, g.normal(size=(n, 4)), conf)
    usable = dc.usable_detectors(det)
    assert usable == ["a", "b"]
    res = dc.split_check(a, y, dc.gate_sets(usable, usable), 40, seed=1, targets=(0.05,))
    for k in ("gate:a", "gate:b"):
        assert abs(res["gate"][k]["mean_rate"] - dc.ALPHA) < 0.006
    assert res["gate"]["gated"]["mean_rate"] <= dc.ALPHA
    assert res["risk"]["risk@5%"]["violation_rate"] <= 0.15 and res["risk"]["risk@5%"]["unreachable_splits"] == 0
    assert abs(dc.binomial_limit(1000, 0.05) - 0.062) < 0.003
    assert dc.exceeds_binomial(30, 1000, 0.02) and not dc.exceeds_binomial(25, 1000, 0.02) and not dc.exceeds_binomial(0, 0, 0.02)


def test_gate_detector_choice_errors_name_the_choices():
    from bench.suite.policies import choose_gate

    assert choose_gate("usable", ["a", "b", "c"], ["a", "b"]) == [["a", "b"]]
    assert choose_gate("b;usable; a, b", ["a", "b"], ["a", "b"]) == [["b"], ["a", "b"], ["a", "b"]]
    with pytest.raises(ValueError, match="c not among the bundle's usable detectors"):
        choose_gate("a,c", ["a", "b", "c"], ["a", "b"])


def test_bad_options_fail_cleanly(tmp_path):
    out = tmp_path / "x"
    r = _run("--out", str(out), "--corruptions", "rain", timeout=120)
    assert r.returncode != 0 and "unknown corruption rain" in r.stderr
    r = _run("--out", str(out), "--severities", "0,9", timeout=120)
    assert r.returncode != 0 and "--severities" in r.stderr
    r = _run("--out", str(out), "--cifar100", str(tmp_path), timeout=120)
    assert r.returncode != 0 and "--cifar100-bundle" in r.stderr
    assert not out.exists()


def test_cifar_loader_path_reads_the_standard_files(tmp_path):
    """The CIFAR-100 code path on small files in the standard formats (no CIFAR data ships here)."""
    from bench.run import cifar_dataset

    g = np.random.default_rng(9)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    n = 50
    with open(base / "test", "wb") as f:
        pickle.dump({b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(g.integers(0, 100, n))}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    cdir = tmp_path / "CIFAR-100-C"
    cdir.mkdir()
    np.save(cdir / "fog.npy", g.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(cdir / "labels.npy", np.tile(g.integers(0, 100, n), 5))
    ds = cifar_dataset(tmp_path, 30, 20, seed=0)
    assert ds.x.shape == (30, 32, 32, 3) and ds.corruption_names == ["fog"]
    xc, yc = ds.corrupted("fog", 5)
    assert xc.shape == (20, 32, 32, 3) and yc.shape == (20,)


def test_digits_report_runs_the_runtime_and_matches_its_own_rows(tmp_path):
    """bench.bench_digits on a few images: the default row is the gate row it reports (the MC rule only adds
    ignores), and every detector and pair of the bundle has a row."""
    out = tmp_path / "digits"
    r = subprocess.run([sys.executable, "-m", "bench.bench_digits", "--n", "40", "--n-clean", "200", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    assert sum(d["n"] for d in res["per_digit"]) == 40 and res["n_clean"] == 200
    gates = {d["gate"]: d for d in res["detectors"]}
    shipped = " + ".join(res["policy"]["gate_detectors"])
    assert len(gates) == 8 + 28 + 1 + (shipped.count(" + ") > 1) and "mahalanobis + rel_mahalanobis" in gates
    assert res["default"]["digits_ignored"] >= gates[shipped]["digits_caught"]
    assert all(d["whole_photos"] >= 15 for d in gates.values())
    assert out.with_suffix(".md").read_text().startswith("# Drawn digits against the default gate")


def test_e2e_warm_figure_times_the_default_paths_calls_and_reaches_the_bound_text():
    """bench_e2e's warm figure (the moment scores, the gate, the rule and the Prediction back to back) runs the
    default Predictor's own calls, and the bound text states it beside the in-frame figure. In a subprocess:
    importing the bench pins BLAS threads in os.environ for every later child."""
    code = (
        "import json, numpy as np\n"
        "from bench.bench_e2e import warm_after_ms, _floor_text\n"
        "from edge_quq.predictor import Predictor\n"
        "p = Predictor.from_bundle(seed=0)\n"
        "f = p.features(p.load_input(np.full((64, 64, 3), 128, np.uint8))[None])[0]\n"
        "w = warm_after_ms(p, f, reps=30)\n"
        "r = {'head_gmacs_executed': {'native': {'50': 10.0}}, 'head_ms': {'native': {'50': 0.3}}, 'nonzero_features': 96,\n"
        "     'H': 300, 'C': 10, 'default_path': {'plain_ms': 5.0, 'warm_after_ms': w,\n"
        "     'stages_ms': {'decision': 0.04, 'result_and_rest': 0.08}}}\n"
        "peak = {'theoretical_gmacs_1core': 40.0, 'measured_sgemm_gmacs_1thread': 45.0}\n"
        "print(json.dumps({'warm': w, 'text': _floor_text(r, 1.03, peak)}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 < got["warm"] < 50.0  # ms: tens of µs of calls, with room for a loaded machine
    assert f"take {got['warm']:.2f} ms" in got["text"] and "took 0.12 ms in the frames" in got["text"]
