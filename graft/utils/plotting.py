"""Plots are optional: matplotlib is the ``graft[plots]`` extra, imported only when a figure is drawn.

Without it, every command that draws still writes its tables, JSON and HTML; each skipped PNG is one plain line.
"""

from __future__ import annotations

import sys

from graft.errors import GraftError
from graft.utils.files import atomic_write

__all__ = ["PLOTS_INSTALL", "can_plot", "plots_skipped", "pyplot", "save_figure"]

PLOTS_INSTALL = "pip install 'graft[plots]'"


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (no display, same output everywhere).

    Raises GraftError naming the extra when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GraftError(f"plots need matplotlib: {PLOTS_INSTALL}") from None
    return plt


def can_plot() -> bool:
    """Whether matplotlib is installed (the ``plots`` extra)."""
    try:
        pyplot()
    except GraftError:
        return False
    return True


def plots_skipped(what: str) -> str:
    """'' when matplotlib can draw; otherwise the note that ``what`` was skipped, also printed on stderr."""
    if not can_plot():
        note = f"note: {what} skipped: matplotlib is not installed ({PLOTS_INSTALL})"
        print(note, file=sys.stderr, flush=True)
        return note
    return ""


def save_figure(figure, path) -> None:
    """Writes ``figure`` as a PNG atomically (recorded in graft's manifest) and closes it."""
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    pyplot().close(figure)
