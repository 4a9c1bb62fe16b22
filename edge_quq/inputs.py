"""Command-line inputs -> image paths: files, folders (their images, sorted, not recursive) and globs."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable, List, Union

from edge_quq.preprocess import IMAGE_SUFFIXES
from edge_quq.result import Failure

IMAGE_GLOB_CHARS = set("*?[")


def expand_inputs(items: Iterable[str]) -> List[Union[Path, Failure]]:
    """Files, folders and globs -> paths, in the order given; problems become Failures (reported, not fatal)."""
    out: List[Union[Path, Failure]] = []
    for item in items:
        p = Path(item)
        if any(c in item for c in IMAGE_GLOB_CHARS) and not p.exists():
            matches = sorted(glob.glob(item))
            if not matches:
                out.append(Failure(item, f"{item}: pattern matches no files"))
            out.extend(Path(m) for m in matches if not Path(m).is_dir())
        elif p.is_dir():
            imgs = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                out.append(Failure(item, f"{item}: folder contains no images ({', '.join(IMAGE_SUFFIXES)})"))
            out.extend(imgs)
        else:
            out.append(p)
    return out
