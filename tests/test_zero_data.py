"""A command that read nothing fails with one line and never leaves a complete run (issue 22, case 3): a train shard
that is empty or random bytes, a val shard of the same, a folder damaged after the scan, a split with no readable
file, feature extraction over tar shards, and the learning-rate finder over shards that decode nothing."""

import gzip
import json
import logging
import random

import pytest
from conftest import tiny_config
from synthetic import make_shapes
from typer.testing import CliRunner

from graft import cli
from graft.data.datasets import ImageDataset
from graft.data.discovery import discover
from graft.errors import GraftError
from graft.training.fitting import fit
from graft.training.state import Hooks

pytest.importorskip("webdataset")

runner = CliRunner()
FIT = ("--backbone", "test_resnet", "--no-pretrained", "--strategy", "probe", "--epochs", 1, "--image-size", 32,
       "--workers", 0, "--batch-size", 16)


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 train and 6 val images: one shard per split at the default shard size."""
    return make_shapes(tmp_path_factory.mktemp("zero"), splits={"train": 4, "val": 2}, seed=3, size=24)


def _shards(folder, output, split: str, kind: str):
    """A fresh shard set of ``folder`` whose ``split`` shard is replaced by ``kind`` bytes."""
    from graft.data.sharding import shard_dataset

    sidecar = shard_dataset(folder, output)
    shard = output / sidecar["splits"][split]["shards"][0]["name"]
    raw = shard.read_bytes()
    damaged = {"empty": b"", "random": random.Random(0).randbytes(len(raw)), "gzip": gzip.compress(raw)}[kind]
    shard.write_bytes(damaged)
    return output, shard


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _assert_not_complete(run):
    """Nothing in the run folder claims a finished model."""
    if (run / "graft.json").exists():
        assert json.loads((run / "graft.json").read_text())["status"] != "complete"
    assert not (run / "model.safetensors").exists() and not (run / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["empty", "random"])
def test_a_train_shard_that_decodes_nothing_fails_the_fit(folder, tmp_path, kind):
    shards, shard = _shards(folder, tmp_path / "shards", "train", kind)
    result = invoke("fit", shards, "-o", tmp_path / "run", *FIT)
    assert result.exit_code == 2, result.output
    line = _error_line(result.output)
    assert f"no training image could be read from {shard}" in line and "graft shard" in line
    _assert_not_complete(tmp_path / "run")


def test_a_val_shard_that_decodes_nothing_fails_the_fit(folder, tmp_path):
    shards, shard = _shards(folder, tmp_path / "shards", "val", "random")
    with pytest.raises(GraftError, match=f"no validation image could be read from {shard}"):
        fit(tiny_config(shards, tmp_path / "run", **{"train.strategy": "probe", "train.epochs": 1}), verbose=False)
    _assert_not_complete(tmp_path / "run")


def test_a_gzip_compressed_train_shard_still_trains_on_its_images(folder, tmp_path):
    """tar reads a gzip stream transparently: every image decodes, so the run trains on all 12 (not substitutes)."""
    shards, _ = _shards(folder, tmp_path / "shards", "train", "gzip")
    seen = []
    hooks = Hooks(on_batch_end=lambda step, loss: seen.append(loss))
    result = fit(tiny_config(shards, tmp_path / "run", **{"train.strategy": "probe", "train.epochs": 1}),
                 verbose=False, hooks=hooks)
    assert len(seen) == 1 and seen[0] > 0 and result.history[0]["images_per_s"] > 0


def test_a_folder_damaged_after_the_scan_fails_the_fit(folder, tmp_path):
    data = make_shapes(tmp_path / "data", splits={"train": 4, "val": 2}, seed=3, size=24)
    train_files = sorted((data / "train").rglob("*.png"))

    def damage(stage, model):  # after the scan read every file: all train images become unreadable
        for path in train_files:
            path.write_bytes(b"not an image any more")

    config = tiny_config(data, tmp_path / "run", **{"train.strategy": "finetune", "train.epochs": 1,
                                                     "train.head_fit": "epochs"})
    with pytest.raises(GraftError, match=f"no image could be read from {data / 'train'}: all 12 file"):
        fit(config, verbose=False, hooks=Hooks(on_stage_start=damage))
    _assert_not_complete(tmp_path / "run")


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_split_with_no_readable_file_is_refused(tmp_path, split):
    data = make_shapes(tmp_path / "data", splits={"train": 4, "val": 2, "test": 2}, seed=3, size=24)
    for path in (data / split).rglob("*.png"):
        path.write_bytes(b"")
    result = invoke("fit", data, "-o", tmp_path / "run", *FIT)
    assert result.exit_code == 2, result.output
    assert f"{split}: none of its 6 image file(s) could be read" in _error_line(result.output)
    _assert_not_complete(tmp_path / "run")


def test_a_damaged_file_is_decoded_once_and_a_wholly_damaged_set_names_its_folder(tmp_path, caplog):
    data = make_shapes(tmp_path / "data", splits={"train": 4}, seed=3, size=24)
    samples = discover(data / "train").train
    samples = sorted(samples)
    for path, _ in samples[:-1]:  # every file but the last breaks after the scan
        open(path, "wb").close()
    dataset = ImageDataset(samples, lambda image: image)
    with caplog.at_level(logging.WARNING):
        labels = [dataset[index][1] for index in range(len(samples))]
    assert labels == [samples[-1][1]] * len(samples)  # each place taken by the one readable image
    assert caplog.text.count("substituted the next image") == len(samples) - 1  # each damaged file tried once
    open(samples[-1][0], "wb").close()
    with pytest.raises(GraftError, match=f"no image could be read from {data / 'train'}: all {len(samples)} file"):
        ImageDataset(samples, lambda image: image)[0]


def test_features_and_probe_refuse_tar_shards_in_one_line(folder, tmp_path):
    shards, _ = _shards(folder, tmp_path / "shards", "train", "empty")
    for command in (("features", shards, "--backbone", "test_resnet"), ("probe", shards, "--backbones", "test_resnet")):
        result = invoke(*command, "--no-pretrained", "--image-size", 32, "--workers", 0, "--cache", tmp_path / "c")
        assert result.exit_code == 2, result.output
        assert "tar shards hold none; pass the folder" in _error_line(result.output)


def test_the_lr_finder_over_shards_that_decode_nothing_stops(folder, tmp_path):
    shards, shard = _shards(folder, tmp_path / "shards", "train", "empty")
    result = invoke("lr-find", shards, "-o", tmp_path / "lr", "--backbone", "test_resnet", "--no-pretrained",
                    "--image-size", 32, "--steps", 5)
    assert result.exit_code == 2, result.output
    assert f"no training image could be read from {shard}" in _error_line(result.output)


def test_an_error_in_a_loader_worker_is_still_one_line(tmp_path):
    """torch re-raises a worker's GraftError with its traceback in the message; graft keeps the worker's own line."""
    from torch.utils.data import DataLoader

    data = make_shapes(tmp_path / "data", splits={"train": 1}, seed=3, size=24)
    samples = discover(data / "train").train
    for path, _ in samples:
        open(path, "wb").close()
    with pytest.raises(GraftError) as caught:
        next(iter(DataLoader(ImageDataset(samples, lambda image: image), num_workers=1)))
    expected = _unreadable(samples)  # the same error raised in this process
    assert str(caught.value) == expected and "no image could be read from" in expected and "\n" not in expected


def _unreadable(samples) -> str:
    dataset = ImageDataset(samples, lambda image: image)
    with pytest.raises(GraftError) as caught:
        dataset[0]
    return str(caught.value)
