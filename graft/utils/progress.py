"""Progress of anything that takes more than a few seconds: a live bar on a terminal or in Jupyter, elsewhere (a
cluster log, a pipe, a captured stderr) a plain line every ``progress_seconds()`` saying what, how far, how fast and
how long is left. Training epochs, feature extraction and the learning-rate sweep all report through ``Progress``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

from graft.errors import GraftError

__all__ = ["DEFAULT_PROGRESS_SECONDS", "PROGRESS_SECONDS", "Progress", "in_notebook", "notebook_bar",
           "progress_seconds"]

PROGRESS_SECONDS = "GRAFT_PROGRESS_SECONDS"  # env var: seconds between plain progress lines off a terminal
DEFAULT_PROGRESS_SECONDS = 30.0


def progress_seconds() -> float:
    """Seconds between plain progress lines when stderr is not a terminal (``GRAFT_PROGRESS_SECONDS``; 0: none)."""
    raw = os.environ.get(PROGRESS_SECONDS, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_PROGRESS_SECONDS
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise GraftError(f"{PROGRESS_SECONDS}={raw!r:.40}: expected seconds >= 0 between progress lines (0: none)")
    return value


def in_notebook() -> bool:
    """True inside a Jupyter kernel, where rich draws its bar as a live widget (stderr is no terminal there)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def notebook_bar() -> bool:
    """In Jupyter, rich's live bar is an ipywidgets Output; without ipywidgets it only warns and shows nothing, so
    the plain progress lines are printed instead."""
    if not in_notebook():
        return False
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """``with Progress("features", 4000) as progress: ... progress.update(done, "detail")``.

    Args:
        unit: what is counted, in the plain line (``images``, ``steps``); its rate is shown per second.
        log: where plain lines go (default: stderr).
        shown: False shows nothing (a library call asked for quiet, another torchrun rank).
        suffix: appended to the time left (``" in the epoch"``).
    """

    def __init__(self, description: str, total: int, unit: str = "images", log: Callable[[str], None] | None = None,
                 shown: bool = True, suffix: str = ""):
        self.bar = shown and (sys.stderr.isatty() or notebook_bar())
        self.interval = progress_seconds() if shown and not self.bar else 0.0
        self.description, self.total, self.unit, self.suffix = description, total, unit, suffix
        self.log = log or _stderr_line
        self.start = self.last = time.perf_counter()
        self.progress = None

    def __enter__(self) -> Progress:
        self.start = self.last = time.perf_counter()
        if self.bar:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.progress = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(),
                                         MofNCompleteColumn(), TextColumn("{task.fields[detail]}", markup=False),
                                         TimeRemainingColumn(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, detail="")
        return self

    def rate(self, done: int) -> float:
        """Units per second since the start."""
        return done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, done: int, detail: str = "") -> None:
        """``done`` of ``total`` finished; ``detail`` (loss, accuracy...) is shown beside the count."""
        speed = self.rate(done)
        short = "img" if self.unit == "images" else self.unit
        if self.progress is not None:
            shown = f"{detail} {speed:.0f} {short}/s".strip()
            self.progress.update(self.task, completed=done, detail=shown)
            return
        now = time.perf_counter()
        if not self.interval or now - self.last < self.interval:
            return
        self.last = now
        left = (self.total - done) / speed if speed > 0 else math.nan
        detail = f", {detail}" if detail else ""
        self.log(f"{self.description}: {done}/{self.total} {self.unit}{detail}, {speed:.1f} {short}/s, about "
                 f"{left:.0f}s left{self.suffix}")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
