"""The README's tour runs as written on data every install has (`graft demo --write-data digits`) and backbones
that need no download: every command line in it parses with graft's real CLI, and the first three commands run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from graft.cli import app

README = Path(__file__).parents[1] / "README.md"
# packaged weights (Lite1/Lite2: graft[backbones], in the dev extras) or built here
OFFLINE_BACKBONES = {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "vgg-like",
                     "small-cnn-cifar"}


def _tour_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    tour = text[text.index("## A five-minute tour of the CLI"):text.index("### Data")]
    lines, pending = [], ""
    for block in re.findall(r"```bash\n(.*?)```", tour, re.S):
        for line in block.splitlines():
            line = (pending + " " + line.strip()) if pending else line.strip()
            if line.endswith("\\"):
                pending = line[:-1].strip()
                continue
            pending = ""
            if line.startswith("graft "):
                lines.append(line.split("  #")[0].strip())
    return lines


def test_the_tour_uses_the_written_data_and_offline_backbones():
    lines = _tour_lines()
    assert len(lines) >= 25 and lines[0] == "graft demo --write-data digits"
    for line in lines:
        assert "pets" not in line and "resnet50" not in line and "imagenet" not in line, line
        words = shlex.split(line)
        for flag in ("--backbone", "-b", "--backbones", "--scratch-backbone"):
            if flag in words:
                named = words[words.index(flag) + 1].split(",")
                assert set(named) <= OFFLINE_BACKBONES, line


@pytest.mark.parametrize("line", _tour_lines())
def test_every_tour_line_parses_with_the_real_cli(line):
    command = typer.main.get_command(app)
    name, *words = shlex.split(line)[1:]
    context = command.context_class(command, info_name="graft")
    sub = command.get_command(context, name)
    assert sub is not None, f"no command {name!r}"
    sub.make_context(name, words, parent=context)  # raises a usage error for an unknown option or a bad value


def test_the_first_three_commands_run(tmp_path, monkeypatch):
    """As written, in a fresh folder: the demo's data, a fit of the default backbone (bounded here by --epochs 1 and
    a small --image-size: the default would take minutes on two cores), a prediction."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    first, second, third = _tour_lines()[:3]
    assert runner.invoke(app, shlex.split(first)[1:]).exit_code == 0
    for digit in (tmp_path / "digits" / "test").iterdir():  # 12 test digits a class: fit's final evaluation stays short
        for extra in sorted(digit.iterdir())[12:]:
            extra.unlink()
    fitted = runner.invoke(app, shlex.split(second)[1:] + ["--epochs", "1", "--image-size", "32"])
    assert fitted.exit_code == 0, fitted.output
    predicted = runner.invoke(app, shlex.split(third)[1:])
    assert predicted.exit_code == 0, predicted.output
    assert len([line for line in predicted.output.splitlines() if "digits/test/3/" in line]) == 12
