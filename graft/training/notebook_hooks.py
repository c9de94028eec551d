"""Hooks beside the trackers: two sets joined into one, and the per-epoch table a notebook keeps."""

from __future__ import annotations

import html
from typing import Callable

from graft.training.state import Hooks

__all__ = ["EPOCH_COLUMNS", "NotebookTable", "join_hooks"]


def join_hooks(first: Hooks, second: Hooks) -> Hooks:
    """Both hooks' functions at each point, ``first``'s (the caller's) first."""
    def both(a: Callable | None, b: Callable | None) -> Callable | None:
        if a is None or b is None:
            return a or b
        return lambda *args: (a(*args), b(*args))[-1]

    names = Hooks.__dataclass_fields__
    return Hooks(**{name: both(getattr(first, name), getattr(second, name)) for name in names})


EPOCH_COLUMNS = ("epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class NotebookTable:
    """In Jupyter, a per-epoch table left in the cell's output (as fastai's and the Hugging Face Trainer's), updated
    in place after every epoch: the live bar disappears when the epoch ends, this stays in the saved notebook."""

    def __init__(self):
        self.rows: list[dict] = []
        self.handle = None

    def epoch_end(self, row: dict) -> None:
        from IPython.display import HTML, display  # only ever built inside a kernel (graft.utils.progress.in_notebook)

        self.rows.append(row)
        table = HTML(self.html())
        if self.handle is None:
            self.handle = display(table, display_id=True)
        else:
            self.handle.update(table)

    def html(self) -> str:
        def cell(value) -> str:
            return html.escape(f"{value:.4g}" if isinstance(value, float) else str(value))

        head = "".join(f"<th>{name.replace('_', ' ')}</th>" for name in EPOCH_COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{cell(row.get(name, ''))}</td>" for name in EPOCH_COLUMNS) + "</tr>"
                       for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def hooks(self) -> Hooks:
        return Hooks(on_epoch_end=self.epoch_end)
