"""The base install without scikit-learn and matplotlib: the demo's digits ship with graft, plots are skipped with a
note and every table, JSON and HTML page is still written.

Each check runs in a subprocess that hides the packages (``sys.modules[name] = None`` makes ``import name`` raise
ImportError, as on a machine where they were never installed) before graft is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HIDE = "import sys\nfor name in ('sklearn', 'scipy', 'matplotlib'):\n    sys.modules[name] = None\n"


def _run_hidden(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", HIDE + code], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)


def test_the_shipped_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    from graft.analysis.demo import load_digit_arrays

    digits = load_digits()
    images, labels = load_digit_arrays()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)


def test_demo_data_loads_without_scikit_learn(tmp_path):
    done = _run_hidden("from pathlib import Path\nfrom graft.analysis.demo import write_digits\n"
                       "write_digits(Path('digits'), shots=2, val_per_class=1)\n"
                       "assert 'sklearn' not in [m for m in sys.modules if sys.modules[m] is not None]\n", tmp_path)
    assert done.returncode == 0, done.stderr
    counts = {split: len(list((tmp_path / "digits" / split).rglob("*.png"))) for split in ("train", "val", "test")}
    assert counts == {"train": 20, "val": 10, "test": 1797 - 30}


def test_a_report_is_written_without_matplotlib(trained_run, shapes, tmp_path):
    code = ("from graft.cli import main\nsys.argv = ['graft', 'evaluate', %r, %r, '-o', %r]\nmain()\n"
            % (str(trained_run), str(shapes / "val"), str(tmp_path / "eval")))
    done = _run_hidden(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "matplotlib is not installed (pip install 'graft[plots]')" in done.stderr, done.stderr
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Confusion matrix" in page and "matplotlib is not installed" in page and "<img class='plot'" not in page
    assert (tmp_path / "eval" / "metrics.json").exists() and (tmp_path / "eval" / "predictions.csv").exists()
    assert not list((tmp_path / "eval").glob("*.png"))


def test_leaderboard_and_lr_find_are_written_without_matplotlib(shapes, tmp_path):
    commands = [["probe", str(shapes), "--backbones", "test_resnet", "--no-pretrained", "--image-size", "32",
                 "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "board")],
                ["lr-find", str(shapes), "-b", "test_resnet", "--no-pretrained", "--image-size", "32", "--steps", "8",
                 "--batch-size", "8", "-o", str(tmp_path / "lr")]]
    code = ("from typer.testing import CliRunner\nfrom graft.cli import app\n"
            f"for argv in {commands!r}:\n"
            "    result = CliRunner().invoke(app, argv)\n    print(result.output)\n    assert result.exit_code == 0\n")
    done = _run_hidden(code, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = done.stdout + done.stderr  # typer's runner prints the commands' stderr into its output
    for name in ("leaderboard.png", "lr_find.png"):
        assert f"note: {name} skipped: matplotlib is not installed (pip install 'graft[plots]')" in printed, printed
        assert printed.count(name) == 1, printed  # the note only: never claimed as written
    assert (tmp_path / "board" / "leaderboard.csv").exists() and (tmp_path / "lr" / "lr_find.csv").exists()
    assert not list(tmp_path.rglob("*.png"))
