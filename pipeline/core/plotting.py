"""Matplotlib for report plots: files only (no display), one resolution, figures always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker

__all__ = ["plt", "save", "ticker"]


def save(fig: Any, path: Path) -> None:
    """Every report plot: laid out, written at one resolution, and closed (no figure leaks)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
