"""What graft prints is plain text: brackets in a message (an extra's name, a file or class name) reach the terminal.

rich's console markup would read `[serve]` as a style tag and print `pip install 'graft'`; each missing-extra error
is checked here through the real CLI printer (typer's runner, graft's console), with the extra's package hidden.
"""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from graft.cli import app

runner = CliRunner()

# (hidden packages, extra named in the fix, the command's arguments after the run/data placeholders are filled in)
MISSING_EXTRAS = [
    (["uvicorn"], "serve", ["serve", "{run}"]),
    (["fastapi"], "serve", ["serve", "{run}"]),
    (["onnx"], "export", ["export", "{run}", "--format", "onnx", "-o", "{out}"]),
    (["onnxruntime"], "export", ["export", "{run}", "--format", "onnx", "-o", "{out}"]),
    (["captum"], "explain", ["explain", "{run}", "{image}", "-o", "{out}"]),
    (["torch.utils.tensorboard", "tensorboard"], "track",
     ["fit", "{data}", "-b", "test_resnet", "--no-pretrained", "--log", "tensorboard", "-o", "{out}"]),
    (["webdataset"], "shards", ["shard", "{data}", "-o", "{out}"]),
]


@pytest.mark.parametrize(("hidden", "extra", "argv"), MISSING_EXTRAS,
                         ids=[f"{extra}-{hidden[0]}" for hidden, extra, _ in MISSING_EXTRAS])
def test_a_missing_extra_names_its_extra_with_brackets(hidden, extra, argv, trained_run, shapes, tmp_path,
                                                       monkeypatch):
    for name in hidden:  # `import name` (and of any submodule an earlier test loaded) raises, as without the extra
        for loaded in [module for module in sys.modules if module == name or module.startswith(f"{name}.")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)
    image = next((shapes / "val").rglob("*.png"))
    filled = [a.format(run=trained_run, data=shapes, out=tmp_path / "out", image=image) for a in argv]
    result = runner.invoke(app, filled)
    assert result.exit_code == 2, result.output
    assert f"pip install 'graft[{extra}]'" in result.output, result.output


def test_a_file_name_with_brackets_is_printed_as_it_is(trained_run, tmp_path):
    missing = tmp_path / "a[b]c [red]x[/red].png"
    result = runner.invoke(app, ["predict", str(trained_run), str(missing)])
    assert result.exit_code == 2, result.output
    assert "a[b]c [red]x[/red].png" in result.output, result.output
    assert result.output.startswith("error: "), result.output


def test_the_consoles_print_brackets_as_they_are():
    """Every line graft prints through its consoles (progress, `wrote ...`, warnings), not only the error path: a
    message with brackets (an extra, a file `a[b]c.png`) reaches the terminal unchanged."""
    from graft.cli.shared import err, out

    message = "pip install 'graft[audit]' for photos/a[b]c.png and [red]not a style[/red]"
    for console in (out, err):
        with console.capture() as captured:
            console.print(message)
        assert captured.get().strip() == message
