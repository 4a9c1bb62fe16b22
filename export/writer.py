"""Write a bundle all at once or not at all.

Everything goes into a hidden temporary folder next to OUT (same file system, so the final rename is
atomic); only a complete, self-verified bundle is moved into place. A failure at any step removes the
temporary folder, and any parent folders this export created, and leaves an existing OUT untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import replace
from typing import List, Optional

from edge_quq.bundle import FORMAT_NAME, MANIFEST_NAME, Bundle, file_entries, write_manifest
from edge_quq.errors import ExportError


def is_bundle(folder: Path) -> bool:
    """A folder whose manifest.json declares the edge-quq bundle format (valid or not in other respects)."""
    m = folder / MANIFEST_NAME
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def check_out(out: Path, force: bool) -> None:
    """Refuse an unusable OUT before any work is done.

    An empty folder is accepted (nothing to lose); a bundle only with force; anything else never, because
    replacing it would delete files the exporter did not write.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: output path exists and is a file, not a bundle folder")
    if is_bundle(out):
        if not force:
            raise ExportError(f"{out}: a bundle already exists there; pass --force to replace it")
        return
    if any(out.iterdir()):
        raise ExportError(f"{out}: output folder exists and is not an edge-quq bundle; refusing to replace it (choose another --out)")


class Staging:
    """`with Staging(out, force) as st:` write files into st.path, then st.commit(bundle)."""

    def __init__(self, out: Path, force: bool = False) -> None:
        self.out = Path(out).absolute()
        self.force = force
        self.path: Optional[Path] = None
        self._made: List[Path] = []
        self.committed = False

    def __enter__(self) -> "Staging":
        check_out(self.out, self.force)
        missing = []
        p = self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made.append(d)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        # mkdtemp makes the folder 0700; a bundle is meant to be read by the service user too.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)
        return self

    def commit(self, bundle: Bundle) -> Bundle:
        """Checksum every file in the staging folder, write `bundle` as the manifest and verify it, move into place."""
        assert self.path is not None
        names = sorted(p.name for p in self.path.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
        write_manifest(self.path, replace(bundle, path=self.path, files=file_entries(self.path, names)))
        check_out(self.out, self.force)  # the world may have changed during a long export
        old = None
        if self.out.exists():
            if any(self.out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
                os.rmdir(old)
                os.replace(self.out, old)
            else:
                os.rmdir(self.out)
        os.replace(self.path, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        from edge_quq.bundle import load_bundle

        return load_bundle(self.out)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        for d in reversed(self._made):
            try:
                d.rmdir()
            except OSError:
                pass
