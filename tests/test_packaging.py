"""Every package folder of the source tree is in pyproject's explicit package list: a folder left out installs
from a checkout (editable) but is missing from a real `pip install .`, which is how `edge_quq.samplers` first
broke the README's install command on a fresh machine."""
from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = {name: ROOT / path for name, path in tool["package-dir"].items()}
    found = set()
    for top, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((top, *rel)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    data = {k for k in tool.get("package-data", {})}
    for name in data:
        assert name in listed, f"package-data names {name}, which is not a listed package"
