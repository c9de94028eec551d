"""Damaged files and failures that used to end in a traceback: each ends in one line naming the file and the fix."""

import json
import logging
import pickle
import shutil
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from synthetic import make_shapes
from typer.testing import CliRunner

from graft import cli
from graft.cli import shared
from graft.data.discovery import discover
from graft.errors import GraftError
from graft.models.backbones.base import file_preprocessing
from graft.utils.memory import out_of_memory_hint
from graft.utils.safefiles import read_safetensors

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def _with_offsets(good: bytes, end: int) -> bytes:
    """The same file with its first tensor's end offset replaced (and the header length updated)."""
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] = end
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + good[8 + length:]


DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "pickle": lambda good: pickle.dumps({"weight": [1.0, 2.0]}),
    "terabyte-header": lambda good: struct.pack("<Q", 2**42) + good[8:],
    "bad-offsets": lambda good: _with_offsets(good, 10**12),
    "not-json-header": lambda good: struct.pack("<Q", 16) + b"\xff" * 16 + good[24:],
}


@pytest.fixture()
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(path), metadata={"k": "v"})
    return path


def test_a_whole_file_reads_back(good_file):
    tensors, metadata = read_safetensors(good_file, "fix")
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3)) and metadata == {"k": "v"}


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_damage_is_one_error_naming_the_file_and_the_fix(good_file, tmp_path, kind):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(DAMAGE[kind](good_file.read_bytes()))
    with pytest.raises(GraftError, match=r"bad.safetensors: damaged or not a safetensors file \(.+\); do this"):
        read_safetensors(path, "do this")


def test_a_terabyte_header_is_refused_from_the_size_alone(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**42) + b"{}")
    with pytest.raises(GraftError, match="header claims 4,398,046,511,104 bytes, the file has 10"):
        read_safetensors(path, "fix")


def test_a_wrong_tensor_length_is_refused(good_file, tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(_with_offsets(good_file.read_bytes(), 20))  # 'a' (6 floats, 24 bytes) given 20
    with pytest.raises(GraftError, match="shape needs 24 bytes, its offsets give 20"):
        read_safetensors(path, "fix")


# ------------------------------------------------------------------------------------------------ every reader, CLI


def _run_copy(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def _damage(path, kind):
    path.write_bytes(DAMAGE[kind](path.read_bytes()))


READERS = {
    "predict": lambda run, shapes, tmp: ("predict", run, shapes / "val" / "circle"),
    "evaluate": lambda run, shapes, tmp: ("evaluate", run, shapes, "--output", tmp / "eval", "--device", "cpu"),
    "export": lambda run, shapes, tmp: ("export", run, "-o", tmp / "export", "--format", "safetensors"),
    "serve": lambda run, shapes, tmp: ("serve", run, "--device", "cpu"),
    "precise-bn": lambda run, shapes, tmp: ("precise-bn", run, "--device", "cpu"),
}


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickle", "terabyte-header", "bad-offsets"])
@pytest.mark.parametrize("reader", READERS)
def test_a_damaged_model_file_is_one_line_for_every_reader(trained_run, shapes, tmp_path, reader, kind):
    run = _run_copy(trained_run, tmp_path)
    _damage(run / "model.safetensors", kind)
    before = (run / "model.safetensors").read_bytes()
    result = invoke(*READERS[reader](run, shapes, tmp_path))
    assert result.exit_code == 2, result.output
    assert "model.safetensors: damaged or not a safetensors file" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # an exit, not a crash
    assert (run / "model.safetensors").read_bytes() == before  # nothing replaced or deleted


@pytest.mark.parametrize("kind", ["truncated", "pickle", "terabyte-header"])
def test_a_damaged_weights_file_for_fit(pretrained_tiny, shapes, tmp_path, kind):
    weights = tmp_path / "trunk.safetensors"
    weights.write_bytes(DAMAGE[kind](pretrained_tiny.read_bytes()))
    result = invoke("fit", shapes, "-o", tmp_path / "out", "--backbone", "test_resnet", "--weights", weights,
                    "--strategy", "probe", "--image-size", 32, "--workers", 0)
    assert result.exit_code == 2, result.output
    assert "trunk.safetensors: damaged or not a safetensors file" in result.output
    assert "another --weights file" in result.output


@pytest.mark.parametrize("kind", ["truncated", "empty", "bad-offsets"])
def test_a_damaged_checkpoint_on_resume(trained_run, tmp_path, kind):
    run = _run_copy(trained_run, tmp_path)
    card = json.loads((run / "graft.json").read_text())
    (run / "graft.json").write_text(json.dumps({**card, "status": "training"}))  # as if killed mid-run
    shutil.copyfile(run / "model.safetensors", run / "checkpoint.safetensors")
    _damage(run / "checkpoint.safetensors", kind)
    result = invoke("fit", "--resume", "-o", run)
    assert result.exit_code == 2, result.output
    assert "checkpoint.safetensors: damaged or not a safetensors file" in result.output
    assert "restart with --overwrite" in result.output


# ------------------------------------------------------------------------------------------ config.json beside weights


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable JSON"),
    ("[1, 2, 3]", "expected a JSON object with mean/std, found list"),
    ('{"mean": ["a", 0.4, 0.4], "std": [0.2, 0.2, 0.2]}', "mean must be 3 numbers"),
    ('{"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2]}', "std must be 3 numbers"),
    ('{"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "input_size": [3, 100000, 100000]}', "beyond the limit of 2048 pixels"),
    ('{"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "input_size": 224}', "input_size must be \\[C, H, W\\]"),
    ('{"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.0, 0.2, 0.2]}}', "std must be positive"),
])
def test_a_bad_config_json_beside_weights_is_one_error(tmp_path, content, message):
    weights = tmp_path / "model.safetensors"
    (tmp_path / "config.json").write_bytes(content.encode())
    with pytest.raises(GraftError, match=rf"config.json: .*{message}.*; fix or delete it"):
        file_preprocessing(weights, {}, None, "resnet18")


def test_a_good_config_json_beside_weights_is_used(tmp_path):
    (tmp_path / "config.json").write_text('{"pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], '
                                          '"input_size": [3, 160, 160], "crop_pct": 0.9}}')
    preprocessing = file_preprocessing(tmp_path / "model.safetensors", {}, None, "resnet18")
    assert preprocessing.input_size == (160, 160) and preprocessing.std == (0.25, 0.25, 0.25)


def test_bad_preprocessing_metadata_in_a_weights_file_is_one_error(tmp_path):
    with pytest.raises(GraftError, match="graft.preprocessing metadata is invalid"):
        file_preprocessing(tmp_path / "w.safetensors", {"graft.preprocessing": "{oops"}, None, "resnet18")


# -------------------------------------------------------------------------------------------- feature-cache shard


def test_a_truncated_cache_shard_is_rebuilt_once(tmp_path, caplog):
    from graft.models.backbones.registry import create_backbone
    from graft.probing.extraction import FeatureExtractor, extract_features

    data = make_shapes(tmp_path / "data", splits={"train": 4, "val": 2}, seed=3)
    splits, cache = discover(data), tmp_path / "cache"

    def extract():
        torch.manual_seed(0)
        backbone = create_backbone("test_resnet", pretrained=False)
        extractor = FeatureExtractor(backbone.net, ["layer2"], "avg")
        return extract_features(splits, extractor, backbone.preprocessing.with_size(32), "test_resnet",
                                cache_dir=cache, workers=0, batch_size=8)["layer2"]

    first = extract()
    shards = sorted(cache.rglob("shard-*.npy"))
    shards[0].write_bytes(shards[0].read_bytes()[:200])  # cut mid-array, header intact
    with caplog.at_level(logging.WARNING, logger="graft.features"):
        second = extract()
    assert sum("damaged feature-cache shard" in r.message for r in caplog.records) == 1
    assert second.stats["extracted"] > 0 and not shards[0].exists()
    for split in ("train", "val"):
        assert np.array_equal(first.features[split], second.features[split])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="graft.features"):
        third = extract()
    assert third.stats["extracted"] == 0 and not caplog.records  # fixed for good, not warned about every run


# ---------------------------------------------------------------------------------------------------------- resume


def test_resume_after_the_classes_changed_names_them(trained_run, shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    run = _run_copy(trained_run, tmp_path)
    card = json.loads((run / "graft.json").read_text())
    card["config"]["data"]["path"] = str(data)
    (run / "graft.json").write_text(json.dumps({**card, "status": "training"}))
    shutil.copyfile(run / "model.safetensors", run / "checkpoint.safetensors")  # never read: refused before
    for split in ("train", "val"):
        (data / split / "circle").rename(data / split / "disc")
    result = invoke("fit", "--resume", "-o", run)
    assert result.exit_code == 2, result.output
    assert "the classes changed since the run started (gone: circle; new: disc)" in result.output
    assert "--overwrite" in result.output and (run / "checkpoint.safetensors").is_file()


def test_resume_warns_of_each_ignored_flag(shapes, tmp_path):
    from graft.config import load_config
    from graft.training.checkpoints import ignored_on_resume

    saved = load_config(None, {"data.path": str(shapes), "train.lr": 0.01, "train.epochs": 3})
    given = load_config(None, {"data.path": str(shapes), "train.lr": 0.5, "train.epochs": 3, "data.batch_size": 7,
                               "output": "elsewhere"})
    ignored = ignored_on_resume(given, saved)
    assert ignored == ["data.batch_size=7 (saved: 32)", "train.lr=0.5 (saved: 0.01)"]
    assert ignored_on_resume(saved, saved) == []


def test_resume_with_a_changed_flag_prints_the_warning(trained_run, tmp_path):
    run = _run_copy(trained_run, tmp_path)
    card = json.loads((run / "graft.json").read_text())
    (run / "graft.json").write_text(json.dumps({**card, "status": "training"}))
    _damage(run / "model.safetensors", "empty")
    shutil.copyfile(run / "model.safetensors", run / "checkpoint.safetensors")  # stops right after the warning
    result = invoke("fit", "--resume", "-o", run, "--lr", "0.7")
    assert "warning: --resume continues with the run's saved config; ignored: train.lr=0.7 (saved: 0.01)" in \
        result.output


# ------------------------------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 9999999999 bytes"),
                                   MemoryError()])
def test_allocator_failure_names_half_the_batch_size(error):
    expected = r"^out of memory at --batch-size 32: try --batch-size 16$"
    with pytest.raises(GraftError, match=expected), out_of_memory_hint(32):
        raise error


def test_other_runtime_errors_pass_through():
    with pytest.raises(RuntimeError, match="shape mismatch"), out_of_memory_hint(32):
        raise RuntimeError("shape mismatch")


def _fail_forward(monkeypatch, module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setattr(module, "forward", forward)


def test_out_of_memory_in_training_and_predict_is_one_line(trained_run, shapes, tmp_path, monkeypatch):
    from graft.models.grafted import GraftModel

    _fail_forward(monkeypatch, GraftModel)
    result = invoke("predict", trained_run, shapes / "val" / "circle", "--batch-size", 8, "--format", "csv")
    assert result.exit_code == 2 and "out of memory at --batch-size 8: try --batch-size 4" in result.output
    result = invoke("fit", shapes, "-o", tmp_path / "out", "--backbone", "test_resnet", "--no-pretrained",
                    "--strategy", "finetune", "--epochs", 1, "--image-size", 32, "--workers", 0, "--batch-size", 10)
    assert result.exit_code == 2 and "out of memory at --batch-size 10: try --batch-size 5" in result.output, \
        result.output


def test_out_of_memory_in_feature_extraction_is_one_line(shapes, tmp_path, monkeypatch):
    from graft.probing.extraction import FeatureExtractor

    _fail_forward(monkeypatch, FeatureExtractor)
    result = invoke("features", shapes, "--backbone", "test_resnet", "--no-pretrained", "--image-size", 32,
                    "--batch-size", 6, "--workers", 0, "--cache", tmp_path / "cache")
    assert result.exit_code == 2 and "out of memory at --batch-size 6: try --batch-size 3" in result.output, \
        result.output


# ------------------------------------------------------------------------------------------------ internal errors


@pytest.fixture()
def broken_command(monkeypatch, tmp_path):
    """A command with a bug in it, and the log folder under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(shared.DEBUG, "on", False)

    def fail(*args, **kwargs):
        raise ValueError("kaput [red]\nsecond line")

    monkeypatch.setattr("graft.models.backbones.registry.create_backbone", fail)
    monkeypatch.setattr(sys, "argv", ["graft", "layers", "test_resnet"])
    return tmp_path / "cache" / "graft" / "logs"


def test_an_internal_error_is_one_line_and_a_log_file(broken_command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    logs = list(broken_command.glob("graft-internal-error-*.log"))
    assert len(logs) == 1
    assert err.strip() == f"internal error: ValueError: kaput [red]; details in {logs[0]} (--debug prints them)"
    text = logs[0].read_text()
    assert "Traceback" in text and "second line" in text and "graft layers test_resnet" in text


def test_debug_prints_the_traceback_instead(broken_command, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["graft", "--debug", "layers", "test_resnet"])
    with pytest.raises(ValueError, match="kaput"):
        cli.main()
    assert not broken_command.exists()


def test_graft_errors_and_interrupts_keep_their_handling(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("graft.models.backbones.registry.create_backbone", interrupted)
    monkeypatch.setattr(sys, "argv", ["graft", "layers", "test_resnet"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_bad_preprocessing_metadata_in_lab_weights_is_one_error(tmp_path):
    from graft.models.backbones.registry import create_backbone

    net = create_backbone("small-cnn-cifar", pretrained=False).net
    path = tmp_path / "lab.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"graft.preprocessing": "{oops"})
    with pytest.raises(GraftError, match="lab.safetensors: its graft.preprocessing metadata is invalid"):
        create_backbone("small-cnn-cifar", pretrained=True, weights_file=str(path))
