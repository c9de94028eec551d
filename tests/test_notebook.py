"""The progress display in Jupyter: rich's live bar (an ipywidgets Output) in a kernel, plain lines elsewhere."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from graft.utils import progress as shown

REPO = Path(__file__).parents[1]


class ZMQInteractiveShell:  # the class name is what in_notebook looks at
    pass


@pytest.fixture
def fake_kernel(monkeypatch):
    """IPython as a Jupyter kernel has it, in this test only."""
    shell = ZMQInteractiveShell()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)


def test_no_notebook_off_a_terminal_gives_plain_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not shown.in_notebook()
    progress = shown.Progress("finetune 1/1", 10)
    assert progress.bar is False and progress.interval == shown.progress_seconds()


def test_kernel_with_widgets_gets_the_live_bar(fake_kernel, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ipywidgets" else real(name))
    assert shown.in_notebook()
    progress = shown.Progress("finetune 1/1", 10)
    assert progress.bar is True and progress.interval == 0.0


def test_kernel_without_widgets_falls_back_to_lines(fake_kernel, monkeypatch):
    """rich without ipywidgets only warns in Jupyter and draws nothing: the plain lines are printed instead."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name))
    progress = shown.Progress("finetune 1/1", 10)
    assert progress.bar is False and progress.interval > 0


def test_real_kernel_shows_the_live_widget(tmp_path):
    """A two-cell notebook in a real kernel: graft.fit's bar arrives as a widget display, not only stderr text."""
    for package in ("nbclient", "nbformat", "ipykernel", "ipywidgets"):
        pytest.importorskip(package)
    import nbformat
    from nbclient import NotebookClient

    setup = (f"import os, sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
             f"os.environ.update(GRAFT_OFFLINE='1', GRAFT_CACHE={str(tmp_path / 'cache')!r})\n"
             "from pathlib import Path\nfrom synthetic import make_shapes\n"
             f"data = make_shapes(Path({str(tmp_path / 'data')!r}), splits={{'train': 8, 'val': 4}}, seed=0)")
    train = ("import graft\n"
             "result = graft.fit(str(data), backbone='test_resnet', pretrained=False, image_size=32, workers=0,\n"
             "                   batch_size=4, epochs=1, head_fit='epochs', head_epochs=0, augment='none',\n"
             f"                   output={str(tmp_path / 'run')!r})\n"
             "print('epochs', result.metrics['epochs'])")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(train)])
    NotebookClient(notebook, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[1].outputs
    widgets = [o for o in outputs if o.output_type == "display_data"
               and "application/vnd.jupyter.widget-view+json" in o.data]
    assert widgets, [o.get("text", o.get("data")) for o in outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "epochs 1" in text and "install \"ipywidgets\"" not in text
    tables = [o.data["text/html"] for o in outputs if o.output_type == "display_data" and "<table>" in
              o.get("data", {}).get("text/html", "")]
    assert len(tables) == 1 and "train loss" in tables[0] and "<td>1</td>" in tables[0]  # stays in the saved cell
    stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "epoch" not in stderr and "epoch" in text  # the lines are output, not red error text
