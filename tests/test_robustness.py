"""Nothing lost, nothing let in: locks, full disks, numeric blow-ups, out-of-memory, imbalance, unsafe files."""

from __future__ import annotations

import errno
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config

from graft.config import load_config
from graft.errors import GraftError
from graft.models.backbones.base import read_weights_file
from graft.models.run_folder import config_from_card, load, read_card
from graft.training import checkpoints, loop, setup
from graft.training.checkpoints import read_checkpoint, run_lock
from graft.training.fitting import fit
from graft.training.setup import balanced_sampler
from graft.training.state import Hooks
from graft.utils.files import atomic_write

# ---------------------------------------------------------------------------------------------- concurrent runs, disk


def test_a_second_fit_into_a_folder_in_use_is_refused_even_with_overwrite(shapes, tmp_path):
    run_dir = tmp_path / "busy"
    with run_lock(run_dir):  # what a first `graft fit` holds for its whole run
        for overwrite in (False, True):
            with pytest.raises(GraftError, match=r"another graft fit \(pid \d+\) is writing"):
                fit(tiny_config(shapes, run_dir), overwrite=overwrite, verbose=False)
    result = fit(tiny_config(shapes, run_dir, **{"train.epochs": 1}), verbose=False)  # released: it may go ahead
    assert not (result.run_dir / ".graft.lock").exists()


def test_a_failed_write_keeps_the_previous_file_and_says_the_disk_is_full(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"previous")

    def fill_the_disk(temp):
        Path(temp).write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(GraftError, match=r"checkpoint.safetensors: could not be written .*previous version is intact"
                                         r".*disk is full.*--resume"):
        atomic_write(path, fill_the_disk)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_a_full_disk_mid_training_leaves_the_last_checkpoint_resumable(shapes, tmp_path, monkeypatch):
    saves = []
    real_save = checkpoints.save_file

    def save_until_the_disk_fills(tensors, path, metadata=None):
        saves.append(path)
        if len(saves) == 3:  # stage start, epoch 1, then the disk is full at epoch 2
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", save_until_the_disk_fills)
    config = tiny_config(shapes, tmp_path / "full", **{"train.strategy": "scratch", "train.epochs": 3})
    with pytest.raises(GraftError, match="disk is full"):
        fit(config, verbose=False)
    monkeypatch.setattr(checkpoints, "save_file", real_save)
    assert read_checkpoint(tmp_path / "full")[3].epoch == 1
    assert not [p for p in (tmp_path / "full").iterdir() if p.name.startswith(".checkpoint")]
    assert fit(config, resume=True, verbose=False).metrics["epochs"] == 3


# ------------------------------------------------------------------------------------------------ numeric blow-ups


def _nan_on_calls(monkeypatch, calls: set[int] | None):
    """Makes the training loss NaN on the given call numbers (None: on every call from the fifth on)."""
    count = {"n": 0}
    real = loop.compute_loss

    def loss(*args, **kwargs):
        count["n"] += 1
        value = real(*args, **kwargs)
        poisoned = count["n"] in calls if calls is not None else count["n"] >= 5
        return value * math.nan if poisoned else value

    monkeypatch.setattr(loop, "compute_loss", loss)


def test_a_nan_loss_rolls_back_and_retries_at_half_the_learning_rate(shapes, tmp_path, monkeypatch, capsys):
    config = tiny_config(shapes, tmp_path / "nan", **{"train.strategy": "scratch", "train.epochs": 3})
    _nan_on_calls(monkeypatch, {7})  # 4 batches an epoch: epoch 2, step 2 (from 0)
    result = fit(config)
    log = capsys.readouterr().err
    assert "the loss became nan (epoch 2, step 2, lr" in log and "retrying at half the learning rate" in log
    assert "/shapes" in log.split("batch:")[1].splitlines()[0]  # names the batch's files
    history = [row["epoch"] for row in trainer_history(result.run_dir)]
    assert history == ["1", "2", "3"] and result.metrics["epochs"] == 3
    clean = fit(tiny_config(shapes, tmp_path / "clean", **{"train.strategy": "scratch", "train.epochs": 3}),
                verbose=False)
    rows, clean_rows = trainer_history(result.run_dir), trainer_history(clean.run_dir)
    assert rows[0]["train_loss"] == clean_rows[0]["train_loss"]  # epoch 1 untouched by the later blow-up
    assert math.isclose(float(rows[1]["lr"]), float(clean_rows[1]["lr"]) / 2, rel_tol=1e-6)


def test_a_loss_that_stays_nan_fails_with_the_files_and_learning_rate(shapes, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, None)
    config = tiny_config(shapes, tmp_path / "diverged", **{"train.strategy": "scratch", "train.epochs": 2})
    with pytest.raises(GraftError, match=r"loss became nan again at half the learning rate \(epoch 2, step 0, lr "
                                         r"[\d.e-]+; batch: .*\.png.*lower --lr"):
        fit(config, verbose=False)
    assert read_checkpoint(tmp_path / "diverged")[3].epoch == 1  # the last good checkpoint is still there


def trainer_history(run_dir: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(run_dir / "history.csv")))


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(shapes, tmp_path, capsys):
    def simulate_a_small_gpu(stage, model):
        def refuse_big_batches(module, inputs):
            if inputs[0].shape[0] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

        model.trunk.register_forward_pre_hook(refuse_big_batches)

    steps = {"small": 0, "normal": 0}

    def counter(name):
        def count(step, loss):
            steps[name] += 1
        return count

    overrides = {"train.strategy": "scratch", "train.epochs": 2}
    small = fit(tiny_config(shapes, tmp_path / "small", **overrides),
                hooks=Hooks(on_stage_start=simulate_a_small_gpu, on_batch_end=counter("small")))
    log = capsys.readouterr().err
    assert "out of memory at batch size 16; continuing with 2 micro-batches" in log
    assert "continuing with 4 micro-batches of ~4" in log
    fit(tiny_config(shapes, tmp_path / "normal", **overrides), hooks=Hooks(on_batch_end=counter("normal")),
        verbose=False)
    assert steps["small"] == steps["normal"] > 0  # optimiser steps: the effective batch did not shrink
    assert [row["micro_batches"] for row in trainer_history(small.run_dir)] == ["4", "4"]


def test_out_of_memory_at_one_image_per_step_is_a_clear_error(shapes, tmp_path):
    def no_memory_at_all(stage, model):
        def refuse(module, inputs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        model.trunk.register_forward_pre_hook(refuse)

    with pytest.raises(GraftError, match="out of memory even at one image per step; use a smaller --image-size"):
        fit(tiny_config(shapes, tmp_path / "oom", **{"train.strategy": "scratch", "train.epochs": 1}),
            hooks=Hooks(on_stage_start=no_memory_at_all), verbose=False)


# ------------------------------------------------------------------------------------------------------------ imbalance


def test_the_balanced_sampler_draws_classes_equally_often():
    samples = [(f"a{i}", 0) for i in range(900)] + [(f"b{i}", 1) for i in range(100)]
    generator = torch.Generator().manual_seed(0)
    drawn = Counter(samples[i][1] for _ in range(5) for i in balanced_sampler(samples, generator))
    assert abs(drawn[0] / (drawn[0] + drawn[1]) - 0.5) < 0.03  # 0.9 without it


def test_balance_loss_weights_classes_by_inverse_frequency(shapes, tmp_path):
    samples = [("x", 0)] * 6 + [("y", 1)] * 2
    config = load_config(None, {"train.balance": "loss"})
    weights = setup.loss_class_weights(type("D", (), {"samples": samples}), 2, config, torch.device("cpu"))
    assert torch.allclose(weights, torch.tensor([8 / 12, 8 / 4]))
    for balance in ("sampler", "loss"):
        result = fit(tiny_config(shapes, tmp_path / balance, **{"train.strategy": "scratch", "train.epochs": 4,
                                                                "train.balance": balance}), verbose=False)
        assert result.metrics["val"]["accuracy"] > 0.5  # three classes: chance is 0.33


def test_an_unknown_balance_mode_is_refused():
    with pytest.raises(GraftError, match="balance 'weights' not understood: choose one of none, sampler, loss"):
        load_config(None, {"train.balance": "weights"})


# --------------------------------------------------------------------------------------------------------- unsafe files


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_bomb_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "the-bomb-went-off"
    bomb = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, bomb)
    with pytest.raises(GraftError, match=r"weights.pth: refused to load .*only plain tensors.*\.safetensors"):
        read_weights_file(bomb)
    assert not marker.exists()


def test_the_cli_refuses_a_pickle_bomb_in_one_line(shapes, tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    marker = tmp_path / "the-bomb-went-off"
    torch.save(_RunsCodeWhenUnpickled(marker), tmp_path / "model.bin")
    result = CliRunner().invoke(app, ["fit", str(shapes), "-o", str(tmp_path / "run"), "--backbone", TINY,
                                      "--weights", str(tmp_path / "model.bin"), "--image-size", "32"])
    assert result.exit_code == 2 and "refused to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda card: card.update(format_version=99), "format_version 99 is newer than this graft understands"),
    (lambda card: card.pop("classes"), "'classes' must be list, found missing"),
    (lambda card: card.update(classes="circle"), "'classes' must be list, found str"),
    (lambda card: card.update(classes=["circle", "circle", "square"]), "two or more distinct"),
    (lambda card: card["preprocessing"].update(mean=[0.5]), "'preprocessing' is invalid .*mean must be 3 numbers"),
    (lambda card: card["preprocessing"].update(std=[0, 1, 1]), "'preprocessing' is invalid"),
    (lambda card: card.update(cut_at=7), "'cut_at' must be str"),
    (lambda card: card["config"]["train"].update(lr="fast"), r"train.lr must be .*'auto'.*got fast"),
    (lambda card: card["config"]["train"].update(epochs=True), r"'train.epochs' must be int, got True"),
    (lambda card: card["config"].update(evil={"x": 1}), "unknown section 'evil'|unknown key 'evil"),
])
def test_a_tampered_graft_json_is_a_clear_error(trained_run, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    card = json.loads((copy / "graft.json").read_text())
    edit(card)
    (copy / "graft.json").write_text(json.dumps(card))
    with pytest.raises(GraftError, match=message):
        load(copy)
        config_from_card(read_card(copy))  # the config is read when a run is resumed


def test_yaml_style_numbers_are_accepted_and_wrong_types_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 4\n")  # PyYAML reads 1e-3 as a string
    assert load_config(path).train.lr == 1e-3
    path.write_text("data:\n  batch_size: thirty-two\n")
    with pytest.raises(GraftError, match=r"config.yaml: 'data.batch_size' must be int, got 'thirty-two'"):
        load_config(path)


def test_hostile_class_names_never_escape_the_run_folder(tmp_path):
    from synthetic import make_shapes

    from graft.evaluation.scoring import evaluate

    make_shapes(tmp_path / "img", per_class=8, seed=2)
    names = {"circle": "../../escaped", "square": "a/b\\c:d", "triangle": ".."}
    rows = [f"img/{kind}/{i:03d}.png,{label}" for kind, label in names.items() for i in range(8)]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    before = set(tmp_path.parent.rglob("*"))
    run = tmp_path / "work" / "run"
    fit(tiny_config(tmp_path / "labels.csv", run, **{"train.strategy": "scratch", "train.epochs": 1}), verbose=False)
    evaluate(run, tmp_path / "labels.csv")
    assert read_card(run)["classes"] == sorted(names.values())  # labels are kept as they are; only file names change
    created = {p for p in set(tmp_path.parent.rglob("*")) - before if not p.is_relative_to(run)}
    assert created <= {tmp_path / "work", tmp_path / "labels.csv"}, created
