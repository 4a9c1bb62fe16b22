"""Command-line inputs -> image paths: files, folders (their images, sorted, not recursive) and globs."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Union

from edge_quq.preprocess import IMAGE_SUFFIXES
from edge_quq.result import Failure

IMAGE_GLOB_CHARS = set("*?[")


def iter_inputs(items: Iterable[str]) -> Iterator[Union[Path, Failure]]:
    """Files, folders and globs -> paths, in the order given, one at a time; problems become Failures
    (reported, not fatal).

    A folder is listed as sorted names (strings, ~60 bytes each), not Path objects, and each Path is made
    only when it is yielded: `edge-quq predict` starts on the first file of a 100 000-file folder at once.
    """
    for item in items:
        p = Path(item)
        if any(c in item for c in IMAGE_GLOB_CHARS) and not p.exists():
            matches = sorted(glob.glob(item))
            if not matches:
                yield Failure(item, f"{item}: pattern matches no files")
            yield from (Path(m) for m in matches if not Path(m).is_dir())
        elif p.is_dir():
            try:
                with os.scandir(p) as entries:
                    names = sorted(e.name for e in entries
                                   if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
            except OSError as e:
                yield Failure(item, f"{item}: cannot list the folder ({e.strerror})")
                continue
            if not names:
                yield Failure(item, f"{item}: folder contains no images ({', '.join(IMAGE_SUFFIXES)})")
            yield from (p / n for n in names)
        else:
            yield p


def expand_inputs(items: Iterable[str]) -> List[Union[Path, Failure]]:
    """iter_inputs as a list."""
    return list(iter_inputs(items))
