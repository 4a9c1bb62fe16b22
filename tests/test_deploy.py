"""deploy/: install.sh into a staging root (idempotent, uninstall leaves nothing), shellcheck, and
`systemd-analyze verify` on the unit as installed."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "deploy" / "install.sh"
UNIT = REPO / "deploy" / "systemd" / "edge-quq-camera.service"
BUNDLE = REPO / "edge_quq" / "data" / "default_bundle"


def install(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def tree_digest(root: Path) -> str:
    """Paths, types, modes, sizes, mtimes, contents and link targets: any rewrite shows, even of equal bytes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_mode:o}|{st.st_size}|{st.st_mtime_ns}|".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def files_under(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_install_into_a_root_twice_changes_nothing_then_uninstall_leaves_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    first = install("--root", str(root))
    assert "edge-quq: installed" in first.stdout
    # What --root skips is said, not silently dropped.
    for skipped in ("useradd --system", "-m venv /opt/edge-quq/venv", "-m pip install"):
        assert any(line.startswith("  skipped (--root): ") and skipped in line for line in first.stdout.splitlines()), skipped
    unit = root / "etc/systemd/system/edge-quq-camera.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/edge-quq-camera.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/edge-quq-camera.service"
    for f in BUNDLE.iterdir():
        assert (root / "opt/edge-quq/bundle" / f.name).read_bytes() == f.read_bytes()
    config = (root / "etc/edge-quq/config").read_text()
    assert 'bundle = "/opt/edge-quq/bundle"' in config and 'stats-file = "/var/lib/edge-quq/stats.json"' in config
    import re

    assert re.findall(r"@[A-Z_]+@", config) == []
    assert 'source = "v4l2:///dev/video0"' in config
    assert oct((root / "etc/edge-quq/config").stat().st_mode & 0o777) == "0o640"

    digest = tree_digest(root)
    second = install("--root", str(root))
    assert "nothing changed" in second.stdout
    assert tree_digest(root) == digest

    # A user's edit of the config survives a re-install; a new bundle replaces the old one.
    with open(root / "etc/edge-quq/config", "a") as f:
        f.write("\nthreads = 2\n")
    other = tmp_path / "other_bundle"
    shutil.copytree(BUNDLE, other)
    (other / "parity.md").unlink()
    import json

    m = json.loads((other / "manifest.json").read_text())
    del m["files"]["parity.md"]
    (other / "manifest.json").write_text(json.dumps(m))
    third = install("--root", str(root), "--bundle", str(other))
    assert "copy bundle" in third.stdout and "write /etc/edge-quq/config" not in third.stdout
    assert "threads = 2" in (root / "etc/edge-quq/config").read_text()
    assert not (root / "opt/edge-quq/bundle/parity.md").exists()
    assert not list((root / "opt/edge-quq").glob("bundle.*"))

    gone = install("--root", str(root), "--uninstall")
    assert "edge-quq: removed" in gone.stdout and "skipped (--root): userdel edge-quq" in gone.stdout
    assert files_under(root) == []
    assert "nothing to remove" in install("--root", str(root), "--uninstall").stdout


def test_dry_run_touches_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    r = install("--root", str(root), "--dry-run")
    assert "would be made" in r.stdout and "would run: install -D -m 0644" in r.stdout
    assert files_under(root) == []
    install("--root", str(root))
    digest = tree_digest(root)
    r = install("--root", str(root), "--uninstall", "--dry-run")
    assert "would run: rm -rf" in r.stdout and tree_digest(root) == digest


def test_a_tampered_bundle_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    bad = tmp_path / "bad_bundle"
    shutil.copytree(BUNDLE, bad)
    with open(bad / "head.npz", "ab") as f:
        f.write(b"x")
    r = install("--root", str(root), "--bundle", str(bad), check=False)
    assert r.returncode == 2 and files_under(root) == []
    assert r.stderr.startswith(f"error: bundle {bad} does not verify: ") and "head.npz" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "error: unknown option: --frobnicate"),
    (["--extra", "cuda"], "error: --extra must be auto, litert, tflite-runtime or none (got 'cuda')"),
    (["--root", "/nonexistent/stage"], "error: --root /nonexistent/stage: folder does not exist"),
    (["--root", "{tmp}", "--bundle", "/nonexistent/b"], "error: --bundle /nonexistent/b: folder does not exist"),
    (["--root", "{tmp}", "--mqtt-discovery"], "error: --mqtt-discovery needs --mqtt URL"),
    (["--root", "{tmp}", "--mqtt", "mqtt://b", "--mqtt-device", "porch cam", "--mqtt-discovery"],
     "error: --mqtt-device 'porch cam': Home Assistant discovery needs letters, digits, '_' and '-' only"),
])
def test_bad_options_are_one_error_line(tmp_path, args, message):
    r = install(*[a.replace("{tmp}", str(tmp_path)) for a in args], check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == message


def test_mqtt_and_home_assistant_discovery_options_go_into_the_config(tmp_path):
    from edge_quq.cli import main
    from edge_quq.config import load_config

    root = tmp_path / "root"
    root.mkdir()
    install("--root", str(root), "--mqtt", "mqtt://user:p\"w@broker.local", "--mqtt-device", "porch-cam", "--mqtt-discovery=ha")
    conf = root / "etc/edge-quq/config"
    text = conf.read_text()
    assert 'mqtt = "mqtt://user:p\\"w@broker.local"' in text and 'mqtt-device = "porch-cam"' in text and 'mqtt-discovery = "ha"' in text
    text = text.replace("/opt/edge-quq/bundle", str(BUNDLE)).replace("/var/lib/edge-quq", str(tmp_path))
    conf.write_text(text)
    dm = load_config(main.commands["camera"], conf)
    assert (dm["mqtt_url"], dm["mqtt_device"], dm["mqtt_discovery"]) == ("mqtt://user:p\"w@broker.local", "porch-cam", "ha")
    # An existing config is kept, and the script says the options were not applied to it.
    again = install("--root", str(root), "--mqtt", "mqtt://other", "--mqtt-discovery")
    assert "the --mqtt options are not applied to an existing config" in again.stdout and conf.read_text() == text


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (tests/run.sh installs it)")
    tests = Path(__file__).parent
    scripts = [INSTALL, INSTALL.parent / "nspawn-check.sh", tests / "run.sh", tests / "fresh-machine.sh", tests.parent / ".ci" / "run"]
    r = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _verify(root: Path, unit_name: str = "edge-quq-camera.service") -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", unit_name], capture_output=True, text=True, timeout=60)


@pytest.fixture()
def staged_root(tmp_path):
    """A staging root as install.sh leaves it, plus what `verify` resolves inside it: systemd's own units
    (sysinit.target & co., copied with their relative links) and an executable at the ExecStart path
    (the real `edge-quq` console script of this environment standing in for the venv's)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (tests/run.sh installs the systemd package)")
    system_units = Path("/usr/lib/systemd/system")
    if not (system_units / "sysinit.target").exists():
        pytest.skip("no systemd unit files under /usr/lib/systemd/system")
    root = tmp_path / "root"
    root.mkdir()
    install("--root", str(root))
    (root / "usr/lib/systemd").mkdir(parents=True)
    subprocess.run(["cp", "-a", str(system_units), str(root / "usr/lib/systemd/")], check=True)
    exe = root / "opt/edge-quq/venv/bin/edge-quq"
    exe.parent.mkdir(parents=True)
    # tests/run.sh runs pytest with .venv/bin/python without putting .venv/bin on PATH.
    beside = Path(sys.executable).parent / "edge-quq"
    real = str(beside) if beside.exists() else shutil.which("edge-quq")
    assert real, "no edge-quq console script beside this Python or on PATH (pip install -e .)"
    shutil.copy2(real, exe)
    return root


def test_systemd_analyze_verify_accepts_the_installed_unit(staged_root):
    r = _verify(staged_root)
    mentions = [line for line in (r.stdout + r.stderr).splitlines() if "edge-quq" in line]
    assert r.returncode == 0 and mentions == [], r.stdout + r.stderr


def test_systemd_analyze_verify_would_catch_a_broken_unit(staged_root):
    """The check above is only worth something if verify reports mistakes here: a misspelt directive,
    a bad value, a missing ExecStart binary."""
    unit = staged_root / "etc/systemd/system/edge-quq-camera.service"
    good = unit.read_text()
    unit.write_text(good.replace("WatchdogSec=30", "WatchdgSec=30").replace("ProtectSystem=strict", "ProtectSystem=stricter"))
    out = _verify(staged_root)
    text = out.stdout + out.stderr
    assert "Unknown key 'WatchdgSec'" in text and "stricter" in text
    unit.write_text(good)
    (staged_root / "opt/edge-quq/venv/bin/edge-quq").unlink()
    out = _verify(staged_root)
    assert out.returncode != 0 and "/opt/edge-quq/venv/bin/edge-quq is not executable" in out.stdout + out.stderr


def test_unit_has_the_service_contract():
    text = UNIT.read_text()
    directives = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            directives.setdefault(k, []).append(v)
    one = {k: v[0] for k, v in directives.items()}
    assert one["Type"] == "notify" and int(one["WatchdogSec"]) > 0 and one["Restart"] == "on-failure"
    assert "StartLimitIntervalSec" in one and "StartLimitBurst" in one
    assert one["User"] == "edge-quq" and one["SupplementaryGroups"] == "video"
    assert one["ExecStart"] == "/opt/edge-quq/venv/bin/edge-quq camera --config /etc/edge-quq/config"
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict" and one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes" and one["StateDirectory"] == "edge-quq" and one["DevicePolicy"] == "closed"
    assert "char-video4linux rw" in directives["DeviceAllow"]
    assert one["StandardOutput"] == "journal" and one["WantedBy"] == "multi-user.target"


def test_systemd_analyze_security_rates_the_unit_ok(staged_root):
    """Offline exposure score of the hardening (0 = locked down, 10 = unprotected); 1.7 today, keep it <= 2."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={staged_root}", "--threshold=20",
                        "edge-quq-camera.service"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "Overall exposure level for edge-quq-camera.service: 1." in r.stdout


def test_dry_run_on_this_system_picks_the_interpreter_and_changes_nothing(tmp_path):
    """Real-system mode with --dry-run: every step is printed (nothing run), and the TFLite extra follows
    what is available: litert by default, tflite-runtime when an offline wheelhouse holds only that."""
    watched = [Path("/opt/edge-quq"), Path("/etc/edge-quq"), Path("/etc/systemd/system/edge-quq-camera.service")]
    before = {p: (p.exists(), p.stat().st_mtime_ns if p.exists() else None) for p in watched}
    r = install("--dry-run")
    assert "TFLite: litert (ai-edge-litert; Python " in r.stdout and "would be made" in r.stdout
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "tflite_runtime-2.14.0-cp311-cp311-manylinux_2_34_aarch64.whl").write_bytes(b"")
    r = install("--dry-run", "--wheelhouse", str(wheelhouse))
    assert f"TFLite: tflite-runtime (the only interpreter in {wheelhouse})" in r.stdout
    pip_lines = [line for line in r.stdout.splitlines() if "-m pip install" in line]
    assert pip_lines and all(line.startswith("  would run: ") and f"--no-index --find-links {wheelhouse}" in line for line in pip_lines)
    assert pip_lines[0].endswith("[tflite-runtime]")
    assert {p: (p.exists(), p.stat().st_mtime_ns if p.exists() else None) for p in watched} == before
