"""`edge-quq health` against real stats files and real bundles (the embedded one and a tampered copy)."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_quq.bundle import DEFAULT_BUNDLE_DIR
from edge_quq.cli import main
from edge_quq.health import check_stats


@pytest.fixture(autouse=True)
def no_installed_service(monkeypatch, tmp_path):
    """Hermetic: an installed service on this machine (/etc/edge-quq/config, /opt/edge-quq/bundle) must not
    leak into the defaults under test."""
    import edge_quq.config
    import edge_quq.health

    monkeypatch.setattr(edge_quq.config, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config")
    monkeypatch.setattr(edge_quq.health, "DEFAULT_SERVICE_BUNDLE", tmp_path / "no-such-bundle")


def stats(path: Path, age_s: float = 1.0, state: str = "running", **extra) -> Path:
    path.write_text(json.dumps({"updated": time.time() - age_s, "state": state, "frames": 120, **extra}))
    return path


def health(*args: str):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click 8.2 keeps stderr apart by itself
    r = runner.invoke(main, ["health", *args])
    return r.exit_code, r.stdout.strip(), r.stderr.strip()


def test_healthy_with_fresh_running_stats_and_a_loadable_bundle(tmp_path):
    s = stats(tmp_path / "stats.json")
    code, out, err = health("--stats-file", str(s), "--bundle", str(DEFAULT_BUNDLE_DIR))
    # "1.0 s old" on an idle machine; a loaded one takes longer between writing and checking.
    assert code == 0 and err == "" and re.match(r"healthy: stats \d+(\.\d)? s old, state running; bundle .* loads \(", out), out
    code, out, _ = health("--stats-file", str(s), "--backend", "onnx", "--json")
    d = json.loads(out)
    assert code == 0 and d["healthy"] and d["state"] == "running" and d["backend"].startswith("onnx (")


@pytest.mark.parametrize("age, state, reason", [
    (120.0, "running", "stats are 120 s old (max 60 s): the camera loop stopped writing"),
    (2.0, "stalled", "camera loop state is 'stalled', not 'running'"),
    (2.0, "stopped", "camera loop state is 'stopped', not 'running'"),
    (-3600.0, "running", "in the future: system clock changed"),
])
def test_stale_stalled_stopped_are_one_reason_line(tmp_path, age, state, reason):
    s = stats(tmp_path / "stats.json", age, state)
    code, out, err = health("--stats-file", str(s), "--no-model")
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith("unhealthy: ") and reason in err


def test_max_age_is_the_freshness_limit(tmp_path):
    s = stats(tmp_path / "stats.json", 20.0)
    assert health("--stats-file", str(s), "--no-model", "--max-age", "30")[0] == 0
    assert health("--stats-file", str(s), "--no-model", "--max-age", "10")[0] == 1


def test_missing_or_garbled_stats(tmp_path):
    code, _, err = health("--stats-file", str(tmp_path / "none.json"), "--no-model")
    assert code == 1 and f"no stats file at {tmp_path / 'none.json'}" in err
    (tmp_path / "half.json").write_text('{"updated": 17')
    assert "is not JSON" in health("--stats-file", str(tmp_path / "half.json"), "--no-model")[2]
    (tmp_path / "nots.json").write_text('{"state": "running"}')
    assert "no numeric 'updated' time" in health("--stats-file", str(tmp_path / "nots.json"), "--no-model")[2]
    h = check_stats(stats(tmp_path / "s.json", 0.0), 60.0, now=time.time() + 59.0)
    assert h.healthy


def test_a_tampered_bundle_is_unhealthy_naming_the_file(tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, b)
    victim = sorted(p for p in b.iterdir() if p.suffix == ".tflite")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, _, err = health("--stats-file", str(stats(tmp_path / "s.json")), "--bundle", str(b))
    assert code == 1 and err.startswith("unhealthy: model does not load: ") and victim.name in err


def test_settings_come_from_the_service_config(tmp_path):
    (tmp_path / "state").mkdir()
    s = stats(tmp_path / "state" / "stats.json")
    cfg = tmp_path / "config"
    src = f'source = "{tmp_path}"\n'  # the camera refuses a config without a source, so health does too
    cfg.write_text(f'{src}bundle = "{DEFAULT_BUNDLE_DIR}"\nbackend = "onnx"\nstats-file = "state/stats.json"\n')
    code, out, _ = health("--config", str(cfg), "--json")
    d = json.loads(out)
    assert code == 0 and d["stats_file"] == str(s.resolve()) and d["backend"].startswith("onnx")
    # A flag beats the file.
    assert health("--config", str(cfg), "--stats-file", str(tmp_path / "other.json"), "--no-model")[0] == 1
    # Without --config the installed one is read (when this user may read it).
    import edge_quq.config

    edge_quq.config.DEFAULT_CONFIG_PATH = cfg  # restored by the autouse fixture
    code, out, _ = health("--json", "--no-model")
    assert code == 0 and json.loads(out)["stats_file"] == str(s.resolve())
    # A config the service would refuse is itself the health problem.
    cfg.write_text('bundle = "/nonexistent/bundle"\n')
    code, _, err = health("--config", str(cfg))
    assert code == 1 and "service config is invalid" in err and "/nonexistent/bundle does not exist" in err
    # The stats file may be set as an output URI (relative to the config's folder, like stats-file).
    cfg.write_text(f'{src}bundle = "{DEFAULT_BUNDLE_DIR}"\noutput = ["jsonl:-", "stats:state/stats.json"]\n')
    code, out, _ = health("--config", str(cfg), "--json", "--no-model")
    assert code == 0 and json.loads(out)["stats_file"] == str(s.resolve())
    code, _, err = health("--config", str(tmp_path / "missing"))
    assert code == 2 and err == f"error: {tmp_path / 'missing'}: config file does not exist"
