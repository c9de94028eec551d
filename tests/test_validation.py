"""Numbers and broken models (issue 10, part 3): every numeric option is range-checked where the config is built
(CLI, YAML and the Python API alike), graft.json is checked on every load, and a model with NaN or infinite weights
is never saved as complete nor loaded."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import TINY, tiny_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from graft.cli.shared import app
from graft.config import load_config
from graft.errors import GraftError
from graft.models.run_folder import load, non_finite_tensors
from graft.training.fitting import fit
from graft.training.state import Hooks

runner = CliRunner()

# flag, its text on the command line, the same value in Python, the dotted key, a piece of the range in the message
NUMERIC = [
    ("--lr", "inf", math.inf, "train.lr", "(0, 100]"),
    ("--lr", "1e6", 1e6, "train.lr", "(0, 100]"),
    ("--lr", "-0.1", -0.1, "train.lr", "(0, 100]"),
    ("--finetune-lr-ratio", "nan", math.nan, "train.finetune_lr_ratio", "(0, 1]"),
    ("--finetune-lr-ratio", "-0.5", -0.5, "train.finetune_lr_ratio", "(0, 1]"),
    ("--stem-lr-ratio", "0", 0.0, "train.stem_lr_ratio", "(0, 1]"),
    ("--weight-decay", "-0.01", -0.01, "train.weight_decay", "[0, 1]"),
    ("--label-smoothing", "5", 5.0, "train.label_smoothing", "[0, 1)"),
    ("--time-budget", "nan", math.nan, "train.time_budget", "0: no limit"),
    ("--time-budget", "-1", -1.0, "train.time_budget", "0: no limit"),
    ("--limit-batches", "-1", -1, "train.limit_batches", "0: no limit"),
    ("--seed", "-1", -1, "train.seed", "[0, 4294967295]"),
    ("--seed", "12345678901234567890", 12345678901234567890, "train.seed", "[0, 4294967295]"),
    ("--epochs", "0", 0, "train.epochs", "[1, 100000]"),
    ("--head-epochs", "-1", -1, "train.head_epochs", "[0, 100000]"),
    ("--patience", "-2", -2, "train.patience", "0: off"),
    ("--image-size", "100000", 100000, "data.image_size", "[8, 2048]"),
    ("--batch-size", "0", 0, "data.batch_size", "[1, 4096]"),
    ("--val-fraction", "1", 1.0, "data.val_fraction", "(0, 1)"),
    ("--dropout", "1", 1.0, "model.dropout", "[0, 1)"),
    ("--augment-views", "-1", -1, "data.augment_views", "[0, 64]"),
]


def _one_line_error(result, *pieces: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])


@pytest.mark.parametrize("flag, text, value, key, allowed", NUMERIC, ids=[f"{f}={t}" for f, t, *_ in NUMERIC])
def test_a_numeric_flag_out_of_range_is_one_line_naming_it(tmp_path, flag, text, value, key, allowed):
    result = runner.invoke(app, ["fit", str(tmp_path), "-o", str(tmp_path / "run"), flag, text])
    _one_line_error(result, key, flag, allowed)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("flag, text, value, key, allowed", NUMERIC, ids=[f"{f}={t}" for f, t, *_ in NUMERIC])
def test_the_same_values_are_refused_from_yaml_and_the_python_api(tmp_path, flag, text, value, key, allowed):
    with pytest.raises(GraftError, match=re_escape(key) + r" must be .*" + re_escape(allowed)):
        load_config(None, {key: value})
    section, leaf = key.split(".")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({section: {leaf: value}}))
    with pytest.raises(GraftError, match=re_escape(key) + r" must be .*" + re_escape(allowed)) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("key, value, message", [
    ("model.head", "mlp:0", "mlp widths must be in [1, 16384]"),
    ("model.head", "mlp:99999999", "mlp widths must be in [1, 16384]"),
    ("model.vgg_stages", "2x100000", "width 1 to 4096"),
    ("model.vgg_stages", ",".join(["1x8"] * 20), "at most 8 stages"),
    ("model.init", "normal:1e999", "STD in (0, 10]"),
])
def test_specs_that_would_allocate_without_bound_are_refused(key, value, message):
    with pytest.raises(GraftError, match=re_escape(message)):
        load_config(None, {key: value})
    result = runner.invoke(app, ["fit", "data", "--" + key.split(".")[1].replace("_", "-"), value])
    _one_line_error(result, message)


def test_a_huge_integer_in_yaml_for_a_float_is_an_error_not_an_overflow(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"train:\n  lr: {10 ** 400}\n")
    with pytest.raises(GraftError, match="train.lr"):
        load_config(path)


def test_the_edges_of_each_range_are_accepted():
    config = load_config(None, {"train.lr": "auto", "train.limit_batches": 0, "train.time_budget": 0,
                                "train.finetune_lr_ratio": 1.0, "train.seed": 2**32 - 1, "data.image_size": 2048,
                                "train.label_smoothing": 0.0, "train.weight_decay": 0, "model.head": "mlp:16384"})
    assert config.train.seed == 2**32 - 1 and config.train.lr == "auto" and config.data.image_size == 2048


@pytest.mark.parametrize("args, message", [
    (["serve", "run", "--port", "-1"], "--port must be an integer in [1, 65535]"),
    (["serve", "run", "--port", "70000"], "--port must be an integer in [1, 65535]"),
    (["serve", "run", "--max-upload-mb", "-1"], "--max-upload-mb must be a finite number in (0, 10240]"),
    (["serve", "run", "--max-upload-mb", "nan"], "--max-upload-mb"),
    (["serve", "run", "--top-k", "-3"], "--top-k must be an integer in [1, 1000]"),
    (["serve", "run", "--max-batch", "0"], "--max-batch"),
    (["serve", "run", "--max-wait-ms", "inf"], "--max-wait-ms"),
    (["serve", "run", "--max-pixels", "0"], "--max-pixels"),
    (["predict", "run", "img.png", "--top-k", "-1"], "--top-k must be an integer in [1, 1000]"),
    (["predict", "run", "img.png", "--batch-size", "0"], "--batch-size must be an integer in [1, 4096]"),
    (["evaluate", "run", "data", "--top-k", "0"], "--top-k"),
    (["layers", TINY, "--size", "100000"], "--size must be an integer in [8, 2048]"),
    (["stats", "data", "--size", "0"], "--size"),
    (["stats", "data", "--max-images", "0"], "--max-images"),
    (["lr-find", "data", "--steps", "0"], "--steps"),
    (["lr-find", "data", "--start-lr", "1", "--end-lr", "0.1"], "--end-lr must be a finite number in (1, 100]"),
    (["compare", "data", "--budget", "nan"], "--budget"),
    (["compare", "data", "--epochs", "0"], "--epochs"),
    (["features", "data", "-b", TINY, "--augment", "-1"], "--augment"),
    (["features", "data", "-b", TINY, "--image-size", "100000"], "--image-size"),
    (["probe", "data", "--backbones", TINY, "--workers", "-5"], "--workers"),
    (["advise", "data", "-b", TINY, "--image-size", "1"], "--image-size"),
    (["diagnose", TINY, "data", "--batch-size", "0"], "--batch-size"),
    (["diagnose", TINY, "data", "--lr", "inf"], "--lr"),
    (["demo", "--shots", "0"], "--shots"),
])
def test_cli_only_options_are_range_checked_before_any_work(args, message):
    _one_line_error(runner.invoke(app, args), message)


# ------------------------------------------------------------------------------------------------- saved models


def _copy_run(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _poison_weights(run):
    from safetensors import safe_open

    path = run / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, str(path), metadata=metadata)


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_a_model_with_nan_weights_is_refused_naming_the_file(trained_run, shapes, tmp_path, command):
    run = _copy_run(trained_run, tmp_path)
    _poison_weights(run)
    image = next(shapes.rglob("*.png"))
    args = {"predict": ["predict", run, image], "evaluate": ["evaluate", run, shapes],
            "export": ["export", run, "-o", tmp_path / "out"]}[command]
    result = runner.invoke(app, [str(a) for a in args])
    _one_line_error(result, "model.safetensors", "NaN or infinite")
    with pytest.raises(GraftError, match="NaN or infinite"):
        load(run)


@pytest.mark.parametrize("edit, message", [
    (lambda card: card["config"]["train"].update(lr="fast"), "train.lr must be"),
    (lambda card: card["config"]["train"].update(sneaky=1), "unknown key 'train.sneaky'"),
    (lambda card: card["config"]["train"].update(seed=-1), "train.seed must be an integer in [0, 4294967295]"),
    (lambda card: card["config"]["data"].update(image_size=100000), "data.image_size must be an integer in [8, 2048]"),
    (lambda card: card["preprocessing"].update(input_size=[100000, 100000]), "beyond the limit of 2048"),
    (lambda card: card.update(dropout="lots"), "'dropout' must be a number"),
])
def test_a_tampered_graft_json_is_refused_by_predict(trained_run, shapes, tmp_path, edit, message):
    run = _copy_run(trained_run, tmp_path)
    card = json.loads((run / "graft.json").read_text())
    edit(card)
    (run / "graft.json").write_text(json.dumps(card))
    result = runner.invoke(app, ["predict", str(run), str(next(shapes.rglob("*.png")))])
    _one_line_error(result, "graft.json", message)


# ------------------------------------------------------------------------------------------------------ training


def _poisoning_hooks(times: int, at: str = "batch") -> tuple[Hooks, list]:
    """Hooks that fill the head's first weight with NaN after a step (``at="batch"``) or after the last epoch's
    checkpoint (``at="epoch"``), ``times`` times: weights going non-finite with no loss computed after them."""
    models, fired = [], []

    def poison(*_):
        if models and len(fired) < times:
            fired.append(True)
            with torch.no_grad():
                next(models[-1].head.parameters()).fill_(math.nan)

    return Hooks(on_stage_start=lambda stage, model: models.append(model),
                 on_batch_end=poison if at == "batch" else None, on_epoch_end=poison if at == "epoch" else None), fired


def _one_epoch_config(shapes, output):
    return tiny_config(shapes, output, **{"train.strategy": "scratch", "train.epochs": 1, "train.limit_batches": 1})


def test_weights_gone_non_finite_at_an_epochs_end_are_rolled_back(shapes, tmp_path, capsys):
    hooks, fired = _poisoning_hooks(times=1)
    result = fit(_one_epoch_config(shapes, tmp_path / "run"), hooks=hooks)
    assert fired and "the weights" in capsys.readouterr().err  # said so
    assert not non_finite_tensors(load(result.run_dir).state_dict())
    assert json.loads((result.run_dir / "graft.json").read_text())["status"] == "complete"


def test_weights_that_stay_non_finite_stop_the_run_not_complete(shapes, tmp_path):
    hooks, _ = _poisoning_hooks(times=100)
    with pytest.raises(GraftError, match="again at half the learning rate.*not complete"):
        fit(_one_epoch_config(shapes, tmp_path / "run"), hooks=hooks, verbose=False)
    assert json.loads((tmp_path / "run" / "graft.json").read_text())["status"] != "complete"
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_the_final_save_refuses_non_finite_weights(shapes, tmp_path):
    hooks, fired = _poisoning_hooks(times=1, at="epoch")  # after the last checkpoint: only the final check sees it
    with pytest.raises(GraftError, match="NaN or infinite values, so the run is not marked complete"):
        fit(_one_epoch_config(shapes, tmp_path / "run"), hooks=hooks, verbose=False)
    assert fired and json.loads((tmp_path / "run" / "graft.json").read_text())["status"] != "complete"
    assert not (tmp_path / "run" / "model.safetensors").exists()
