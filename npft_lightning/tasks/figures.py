"""Figures of the reports: written atomically like every other result."""

from __future__ import annotations

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
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
