"""tests/fresh-machine.sh reads the README's two commands at their markers; the commands it would run are the
ones a reader sees. (The script itself builds a Debian root and runs the whole suite in it, ~30 minutes:
.ci/run runs it, pytest does not.)"""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fresh-machine.sh"


def readme_command(marker: str) -> str:
    # The same awk program as the script, run on the real README.
    src = SCRIPT.read_text()
    prog = src[src.index("awk -v m=") :].split("\n", 1)[0]
    prog = prog.replace('"$SRC/README.md"', str(ROOT / "README.md")).replace("$1", marker)
    return subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True).stdout.strip()


def test_both_readme_commands_are_found_as_written():
    readme = (ROOT / "README.md").read_text()
    install = readme_command("install-and-run")
    test = readme_command("test")
    assert install and f"    {install}\n" in readme
    assert "pip install" in install and "edge-quq predict" in install
    assert test == "bash tests/run.sh"
    # CI runs the test command inside the fresh root, not a second time on its own machine.
    code = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert any("tests/fresh-machine.sh" in line for line in code)
    assert not any("tests/run.sh" in line for line in code)


def test_bad_option_is_one_error_line():
    r = subprocess.run(["bash", str(SCRIPT), "--only", "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --only takes install or test, got 'nonsense'"
