"""Figures of the reports: written atomically like every other result."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from npft_lightning.core.io import atomic_file


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` atomically (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        # "tight": a legend or title that tight_layout could not fit still lands in the file, not off its edge
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)
    return path


def panel_grid(count: int, width: float, height: float, columns: int = 3) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels of ``width`` × ``height`` inches, at most ``columns`` a row, the cells of the last
    row it does not fill hidden: the figure and its ``count`` axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:count]
