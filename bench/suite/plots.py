"""Figure helpers shared by the suite's renderers."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def heatmap(m: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, path: Path, vmin: float, vmax: float,
            figsize, fontsize: int = 7, rotation: int = 30) -> None:
    """An annotated heatmap of m [rows, cols] in percent (white text on the dark cells)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    dark = vmin + 0.6 * (vmax - vmin)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=fontsize, color="w" if m[i, j] < dark else "k")
    ax.set_xticks(range(len(cols))); ax.set_xticklabels(cols, rotation=rotation, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows))); ax.set_yticklabels(rows, fontsize=7)
    ax.set_title(title); fig.colorbar(im); fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)
