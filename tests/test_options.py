"""`graft fit`'s options generated from the config fields, --set, --version and a start-up without torch."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

import graft.training.fitting
from graft.cli.shared import app
from graft.config import flag_of, option_fields
from graft.utils.versions import __version__

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "220"}  # rich wraps help at the terminal's width: one option per line here


def _fit_flags() -> set[str]:
    command = typer.main.get_command(app).commands["fit"]
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("dotted", [dotted for dotted, _ in option_fields() if dotted != "data.path"])
def test_every_config_field_has_a_fit_flag_and_a_set_key(dotted, monkeypatch, tmp_path):
    spec = dict(option_fields())[dotted]
    assert flag_of(dotted, spec) in _fit_flags()
    assert spec.metadata["help"], dotted  # generated options have help text, not a bare flag
    settings = _fit_with(monkeypatch, tmp_path, "--set", f"{dotted}={_other_value(dotted, spec)}")
    assert _get(settings, dotted) == _other_value(dotted, spec)


def _other_value(dotted, spec):
    """A valid value that is not the default, so that the test fails if --set does not reach the field."""
    special = {"data.path": "x", "output": "elsewhere", "train.lr": 0.5, "model.head": "mlp:8", "model.init": "xavier",
               "model.vgg_stages": "1x8", "train.unfreeze": "last:1", "model.backbone": "test_resnet",
               "train.device": "cpu", "model.weights": "w.safetensors", "model.cut_at": "layer2",
               "data.cache_dir": "cache", "data.image_size": 32, "log": "tensorboard,csv", "data.exclude": "a.csv",
               "data.image_column": "picture", "data.label_column": "kind",
               "data.unlabeled": "pool"}
    if dotted in special:
        return special[dotted]
    if spec.metadata["choices"]:
        return next(choice for choice in spec.metadata["choices"] if choice != spec.default)
    if isinstance(spec.default, bool):
        return not spec.default
    allowed = spec.metadata["range"]
    middle = (allowed.low + allowed.high) / 2 if allowed.high < 1000 else allowed.low + 3
    return int(middle) if isinstance(spec.default, int) else middle


def _get(settings, dotted):
    value = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _fit_with(monkeypatch, tmp_path, *args):
    """Runs `graft fit` up to the training, which is replaced: returns the config it would have trained with."""
    seen = {}

    def fake_fit(settings, resume=False, overwrite=False):
        seen["settings"] = settings
        return SimpleNamespace(metrics={}, run_dir=tmp_path / "run")

    monkeypatch.setattr(graft.training.fitting, "fit", fake_fit)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # without -o, fit claims runs/graft-N in the working folder: not the repo's
    result = runner.invoke(app, ["fit", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    return seen["settings"]


def test_precedence_is_defaults_then_yaml_then_set_then_flags(monkeypatch, tmp_path):
    path = tmp_path / "graft.yaml"
    path.write_text("train:\n  momentum: 0.5\n  warmup_fraction: 0.2\n  weight_decay: 0.3\n")
    settings = _fit_with(monkeypatch, tmp_path, "--config", path, "--set", "train.momentum=0.8", "--set",
                         "train.weight_decay=0.4", "--weight-decay", "0.6")
    assert settings.train.warmup_fraction == 0.2  # YAML over the default
    assert settings.train.momentum == 0.8  # --set over YAML (no --momentum given, so it does not hide --set)
    assert settings.train.weight_decay == 0.6  # the field's own flag over --set
    assert settings.train.label_smoothing == 0.1  # the default where nobody says otherwise


def test_flags_without_a_yaml_key_before_are_set(monkeypatch, tmp_path):
    settings = _fit_with(monkeypatch, tmp_path, "--momentum", "0.7", "--no-channels-last", "--warmup-fraction", "0",
                         "--lr", "auto", "-b", "test_resnet", "-o", tmp_path / "out")
    assert settings.train.momentum == 0.7 and settings.train.channels_last is False
    assert settings.train.warmup_fraction == 0.0 and settings.train.lr == "auto"
    assert settings.model.backbone == "test_resnet" and settings.output == str(tmp_path / "out")


@pytest.mark.parametrize("args, pieces", [
    (["--set", "train.nope=1"], ["unknown key 'train.nope'", "momentum"]),
    (["--set", "nope.momentum=1"], ["unknown section 'nope'"]),
    (["--set", "train.__init__.x=1"], ["unknown key 'train.__init__.x'", "valid keys in train:", "momentum"]),
    (["--set", "__class__.x=1"], ["unknown section '__class__'", "data, model, train"]),
    (["--set", "train.momentum=" + "[" * 5000], ["'train.momentum' must be float"]),
    (["--set", "train=5"], ["'train' is a section, not a value"]),
    (["--set", "train.momentum"], ["--set 'train.momentum': expected KEY=VALUE"]),
    (["--set", "=3"], ["expected KEY=VALUE"]),
    (["--set", "train.momentum="], ["--set train.momentum: a value is needed"]),
    (["--set", "train.momentum=fast"], ["'train.momentum' must be float"]),
    (["--set", "train.momentum=1.5"], ["train.momentum must be", "[0, 1)", "(option --momentum)"]),
    (["--set", "train.strategy=magic"], ["choose one of probe, finetune, scratch"]),
    (["--set", "model.pretrained=maybe"], ["'model.pretrained' must be bool"]),
    (["--warmup-fraction", "1"], ["train.warmup_fraction must be", "(option --warmup-fraction)"]),
])
def test_a_bad_set_or_flag_is_one_line(tmp_path, args, pieces):
    result = runner.invoke(app, ["fit", str(tmp_path), "-o", str(tmp_path / "run"), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, pieces", [
    (b"train:\n  lr: 0.1\n  name: caf\xe9\n", ["not a UTF-8 text file (byte offset 28)"]),
    (b"train:\n  lr: " + b"[" * 5000 + b"]" * 5000 + b"\n", ["nested too deeply"]),
    (b"train: " + b"{k: " * 5000 + b"1" + b"}" * 5000 + b"\n", ["nested too deeply"]),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, content, pieces):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["fit", str(tmp_path), "-o", str(tmp_path / "run"), "--config", str(path)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}:"), result.output
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    assert not (tmp_path / "run").exists()


def test_fit_help_shows_defaults_choices_and_panels():
    result = runner.invoke(app, ["fit", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = result.output
    for panel in ("Data", "Model", "Training", "Runtime", "Run"):
        assert f"─ {panel} ─" in text, panel
    assert text.index("─ Data ─") < text.index("─ Model ─") < text.index("─ Training ─") < text.index("─ Runtime ─")
    for flag, default in [("--momentum", "0.9"), ("--strategy", "finetune"), ("--batch-size", "32"),
                          ("--backbone", "tf_efficientnet_lite0"), ("--channels-last", "--channels-last"),
                          ("--precise-bn", "--no-precise-bn"), ("--output", "runs/graft")]:
        line = next(line for line in text.splitlines() if line.lstrip("│ ").startswith(f"{flag} "))
        assert f"(default: {default})" in line, line
    assert "[probe|finetune|scratch|auto]" in text and "[adamw|sgd]" in text and "--set" in text


def test_version_prints_graft_torch_and_timm():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert line.startswith(f"graft {__version__} (")
    for name in ("torch", "timm", "torchvision"):
        assert f"{name} {metadata.version(name)}" in line


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_python_m_graft_help_and_version_start_without_torch():
    result = _python("-m", "graft", "--help")
    assert result.returncode == 0 and "Usage" in result.stdout and "fit" in result.stdout, result.stderr
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom graft.cli import app\n"
             "for args in (['--help'], ['--version'], ['fit', '--help'], ['lr-find', '--help']):\n"
             "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
             "print(sorted(name for name in ('torch', 'timm', 'torchvision', 'numpy') if name in sys.modules))\n")
    result = _python("-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    result = _python("-X", "importtime", "-m", "graft", "--version")
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert result.returncode == 0 and "graft" in imported and not {"torch", "timm"} & imported


def test_precise_bn_help_names_the_transform_the_code_uses():
    """The statistics are recomputed in the training augmentation (the default of recompute_bn_statistics); the help
    once said 'eval transform'."""
    import inspect

    from graft.training.precise_bn import recompute_bn_statistics

    help_text = dict(option_fields())["train.precise_bn"].metadata["help"]
    assert inspect.signature(recompute_bn_statistics).parameters["augmented"].default is True
    assert "training augmentation" in help_text and "eval" not in help_text
