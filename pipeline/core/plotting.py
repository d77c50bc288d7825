"""Matplotlib for report plots: files only (no display), one resolution, figures always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker

__all__ = ["BASELINE_COLOR", "mark_best", "plt", "save", "ticker"]

BASELINE_COLOR = "tab:red"  # the baseline's line in every plot


def save(fig: Any, path: Path) -> None:
    """Every report plot: laid out, written at one resolution, and closed (no figure leaks)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mark_best(ax: Any, x: float, y: float, label: str | None = None) -> None:
    """The best point of a plot, a gold star, the same in the search's and the retrain's reports."""
    ax.scatter([x], [y], marker="*", s=220, color="gold", edgecolor="black", zorder=3, label=label)
