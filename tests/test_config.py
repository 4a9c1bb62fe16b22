"""The TOML service config: keys are a command's long options, checked at start-up, flags override it."""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edge_quq.bundle import DEFAULT_BUNDLE_DIR
from edge_quq.cli import model_options
from edge_quq.config import config_option, load_config, template


@click.command(name="camera")
@config_option
@model_options
@click.option("--source", default="v4l2:///dev/video0", help="Frame source URI.")
@click.option("--fps", type=click.FloatRange(min=0.1), default=None)
@click.option("--stats-file", type=click.Path(path_type=Path), default=None)
@click.option("--stats-interval", type=click.IntRange(min=1), default=10)
@click.option("--output", "outputs", multiple=True, help="Result outputs (URIs).")
@click.option("--mirror/--no-mirror", default=False)
def fake_camera(**kw):
    """Stands in for `edge-quq camera` until it lands: same option machinery (model_options + plain options)."""
    kw = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    click.echo(json.dumps(kw, sort_keys=True))


def run(cfg: Path, *args: str):
    r = CliRunner().invoke(fake_camera, ["--config", str(cfg), *args])
    return r.exit_code, r.output


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config"
    p.write_text(text)
    return p


def test_values_become_defaults_and_flags_override(tmp_path):
    cfg = write(tmp_path, f'''
bundle = "{DEFAULT_BUNDLE_DIR}"
backend = "onnx"
num-iter = 30
threshold = 0.6
z = 1            # an integer is a fine float
no_xnnpack = true
stats_file = "state/stats.json"
output = ["jsonl:/var/lib/x.jsonl", "http://0.0.0.0:8080"]
mirror = true
ignore-on = "any"
''')
    code, out = run(cfg)
    assert code == 0, out
    got = json.loads(out)
    assert got["backend"] == "onnx" and got["num_iter"] == 30 and got["threshold"] == 0.6 and got["z"] == 1.0
    assert got["no_xnnpack"] is True and got["mirror"] is True and got["bundle"] == str(DEFAULT_BUNDLE_DIR)
    assert got["outputs"] == ["jsonl:/var/lib/x.jsonl", "http://0.0.0.0:8080"] and got["ignore_on"] == "any"
    # Relative paths are relative to the config file's folder.
    assert got["stats_file"] == str(tmp_path.resolve() / "state" / "stats.json")
    assert got["source"] == "v4l2:///dev/video0" and got["stats_interval"] == 10  # untouched defaults

    code, out = run(cfg, "-T", "7", "--backend", "tflite", "--no-mirror", "--output", "jsonl:-")
    got = json.loads(out)
    assert code == 0 and got["num_iter"] == 7 and got["backend"] == "tflite" and got["mirror"] is False
    assert got["outputs"] == ["jsonl:-"] and got["threshold"] == 0.6


def test_no_config_means_the_command_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_QUQ_CONFIG", raising=False)
    r = CliRunner().invoke(fake_camera, [])
    assert r.exit_code == 0 and json.loads(r.output)["backend"] == "auto"
    monkeypatch.setenv("EDGE_QUQ_CONFIG", str(write(tmp_path, 'backend = "onnx"\n')))
    r = CliRunner().invoke(fake_camera, [])
    assert r.exit_code == 0 and json.loads(r.output)["backend"] == "onnx"


@pytest.mark.parametrize("text, message", [
    ("num-iters = 30\n", "unknown key 'num-iters' (did you mean num-iter?)"),
    ("colour = 'rgb'\n", "unknown key 'colour'"),
    ("[camera]\nfps = 5\n", "unknown table [camera]"),
    ("num-iter = '30'\n", "key 'num-iter' must be an integer, got '30'"),
    ("threshold = 'high'\n", "key 'threshold' must be a number, got 'high'"),
    ("no-xnnpack = 1\n", "key 'no-xnnpack' must be true or false, got 1"),
    ("backend = 'cuda'\n", "key 'backend': 'cuda' is not one of 'auto', 'tflite', 'onnx'"),
    ("threads = 0\n", "key 'threads': 0 is not in the range x>=1"),
    ("fps = [5]\n", "key 'fps' takes one value, got a list"),
    ("num-iter = 3\nnum_iter = 4\n", "keys 'num-iter' and 'num_iter' set the same option"),
    ("bundle = '/nonexistent/bundle'\n", "key 'bundle': /nonexistent/bundle does not exist"),
    ("backend = onnx\n", "not valid TOML"),
])
def test_bad_config_is_one_clear_error_naming_the_key(tmp_path, text, message):
    cfg = write(tmp_path, text)
    code, out = run(cfg)
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: ") and message in lines[0], out


def test_missing_config_file_names_the_path(tmp_path):
    code, out = run(tmp_path / "nope.toml")
    assert code == 2 and out.strip() == f"error: {tmp_path / 'nope.toml'}: config file does not exist"


def test_template_lists_every_option_and_parses_back(tmp_path):
    text = template(fake_camera, {"bundle": str(DEFAULT_BUNDLE_DIR), "stats-file": "/var/lib/edge-quq/stats.json"})
    for p in fake_camera.params:
        if p.name != "config":
            key = [o for o in p.opts if o.startswith("--")][0][2:]
            assert any(line.lstrip("#").startswith(key + " = ") for line in text.splitlines()), p.name
    cfg = write(tmp_path, text)
    dm = load_config(fake_camera, cfg)
    assert dm == {"bundle": DEFAULT_BUNDLE_DIR, "stats_file": Path("/var/lib/edge-quq/stats.json")}
    # Uncommenting every example line still gives a valid file (the examples are real values).
    uncommented = "\n".join(line[1:] if line[:2] != "# " and line.startswith("#") else line for line in text.splitlines())
    assert load_config(fake_camera, write(tmp_path, uncommented))["num_iter"] == 30


# -- the real camera command ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def camera_command():
    from edge_quq.cli import main

    return main.commands["camera"]


def test_deploy_config_example_lists_every_camera_option():
    """Help wording may drift; the keys may not (a new camera option must be settable from the file)."""
    import re

    from edge_quq.config import config_keys

    text = (REPO / "deploy" / "config.example").read_text()
    listed = set(re.findall(r"^#?([a-z][a-z0-9-]*) = ", text, flags=re.M))
    expected = {k for k in config_keys(camera_command()) if "_" not in k}
    assert listed == expected, "regenerate: edge-quq config-template > deploy/config.example"


def test_installed_config_is_valid_for_the_camera_command(tmp_path):
    """What install.sh writes (placeholders filled) passes the checks the service runs at start-up."""
    cam = camera_command()
    text = (REPO / "deploy" / "config.example").read_text()
    text = text.replace("@SOURCE@", "v4l2:///dev/video0").replace("@BUNDLE_DIR@", str(DEFAULT_BUNDLE_DIR)).replace("@STATE_DIR@", str(tmp_path))
    dm = load_config(cam, write(tmp_path, text))
    assert dm == {"source": "v4l2:///dev/video0", "bundle": DEFAULT_BUNDLE_DIR, "stats_file": tmp_path / "stats.json", "quiet": True}


@pytest.mark.parametrize("text, message", [
    ('source = "{samples}"\nnum-iters = 30\n', "unknown key 'num-iters' (did you mean num-iter?)"),
    ('source = "{samples}"\nstall-timeout = "5s"\n', "key 'stall-timeout' must be a number, got '5s'"),
    ('source = "{samples}"\nevery = 0\n', "key 'every': 0 is not in the range x>=1"),
    ('source = "{samples}"\nbundle = "/nonexistent/bundle"\n', "key 'bundle': /nonexistent/bundle does not exist"),
    ('source = "{samples}"\nmqtt-ca-file = "/nonexistent/ca.pem"\n', "key 'mqtt-ca-file'"),
])
def test_camera_refuses_a_bad_config_at_start_up_naming_the_key(tmp_path, text, message):
    import subprocess
    import sys

    camera_command()
    cfg = write(tmp_path, text.format(samples=REPO / "edge_quq" / "data" / "samples"))
    r = subprocess.run([sys.executable, "-m", "edge_quq", "camera", "--config", str(cfg), "--frames", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: ") and message in lines[0], r.stderr


def test_camera_runs_from_a_config_and_flags_override_it(tmp_path):
    import subprocess
    import sys

    camera_command()
    stats = tmp_path / "stats.json"
    cfg = write(tmp_path, f'source = "{REPO / "edge_quq" / "data" / "samples"}"\nframes = 2\nquiet = true\nstats-file = "stats.json"\n'
                          f'backend = "onnx"\nnum-iter = 20\n')
    r = subprocess.run([sys.executable, "-m", "edge_quq", "camera", "--config", str(cfg), "--frames", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(stats.read_text())
    assert got["frames"]["processed"] == 3 and got["state"] == "stopped"  # the flag beat frames = 2
    assert "backend onnx" in r.stderr and "T=20" in r.stderr


def test_camera_outputs_as_a_list_in_the_config(tmp_path):
    """A repeatable option is a TOML list; relative paths inside output URIs are relative to the config's folder."""
    import subprocess
    import sys

    camera_command()
    (tmp_path / "cfg").mkdir()
    cfg = write(tmp_path / "cfg", f'source = "{REPO / "edge_quq" / "data" / "samples"}"\nframes = 4\nquiet = true\n'
                                  'output = ["jsonl:out.jsonl", "stats:stats.json", "jsonl:-"]\n')
    r = subprocess.run([sys.executable, "-m", "edge_quq", "camera", "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "cfg" / "out.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(r.stdout.splitlines()) == 4
    assert json.loads((tmp_path / "cfg" / "stats.json").read_text())["frames"]["processed"] == 4
    # A bad URI in the file: one error line naming it, before the model loads.
    cfg.write_text(f'source = "{REPO / "edge_quq" / "data" / "samples"}"\noutput = ["jsonl:-", "webhook://x"]\n')
    r = subprocess.run([sys.executable, "-m", "edge_quq", "camera", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --output webhook://x: unknown output webhook: (expected " + \
        "jsonl:PATH|-, video:PATH, snapshots:DIR, stats:PATH, http://HOST:PORT, mqtt://HOST, mqtts://HOST, display://0)"
    dm = load_config(camera_command(), cfg)
    assert dm["outputs"] == ("jsonl:-", "webhook://x")
