"""The notebook-grade Python API: graft.fit(**fields), graft.load(...).predict(anything), the history table, progress
lines off a terminal, and the backbone checked before the scan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

import graft
from graft.config import load_config
from graft.errors import GraftError
from graft.training.arguments import config_from_arguments

FAST = {"backbone": TINY, "pretrained": False, "image_size": 32, "workers": 0, "batch_size": 16, "augment": "none",
        "head_epochs": 1, "lr": 1e-2, "patience": 0}


def _image_file(data: Path) -> Path:
    return min((data / "val").rglob("*.png"))


def test_fit_takes_every_field_by_name_and_returns_a_history_table(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAFT_PROGRESS_SECONDS", "1e-9")  # a line after every batch: stderr is captured, no terminal
    result = graft.fit(str(shapes), strategy="finetune", epochs=2, output=str(tmp_path / "run"), **FAST,
                       **{"train.seed": 3})
    saved = json.loads((tmp_path / "run" / "graft.json").read_text())["config"]
    assert saved["train"]["epochs"] == 2 and saved["train"]["seed"] == 3 and saved["data"]["path"] == str(shapes)
    assert saved["model"]["backbone"] == TINY and saved["data"]["image_size"] == 32
    assert [row["epoch"] for row in result.history] == [1, 2, 3]  # one head epoch, then two of the whole network
    assert all(isinstance(row["val_loss"], float) for row in result.history)
    err = capsys.readouterr().err.splitlines()
    lines = [index for index, line in enumerate(err) if " images, loss " in line]
    assert lines and err[lines[0]].startswith("head 1/1: 16/72 images") and "img/s" in err[lines[0]]
    assert lines[0] < next(index for index, line in enumerate(err) if line.startswith("epoch"))  # before it ends
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas absent: a clear error, not an ImportError
    with pytest.raises(GraftError, match="needs pandas"):
        result.history_frame()


def test_history_frame_is_a_dataframe(trained_result):
    import pandas  # the notebook extra installs it, and the dev extras include that: this test never skips
    frame = trained_result.history_frame()
    assert isinstance(frame, pandas.DataFrame) and len(frame) == len(trained_result.history) > 0
    assert list(frame["epoch"]) == [row["epoch"] for row in trained_result.history]


def test_fit_keywords_are_validated_like_the_cli(shapes, tmp_path):
    output = tmp_path / "never"
    with pytest.raises(GraftError, match="unknown argument 'epoch'; did you mean epochs"):
        graft.fit(str(shapes), epoch=5, output=str(output))
    with pytest.raises(GraftError) as from_api:
        graft.fit(str(shapes), epochs=0, output=str(output))
    with pytest.raises(GraftError) as from_cli:
        load_config(None, {"data.path": str(shapes), "train.epochs": 0})
    assert str(from_api.value) == str(from_cli.value) and "--epochs" in str(from_api.value)
    with pytest.raises(GraftError, match="strategy 'nope' not understood"):
        graft.fit(str(shapes), strategy="nope", output=str(output))
    with pytest.raises(GraftError, match="'train.epochs' must be int"):
        graft.fit({"data": {"path": str(shapes)}, "train": {"epochs": "five"}}, output=str(output))
    assert not output.exists()


def test_a_config_object_is_used_as_is_and_keywords_apply_over_a_copy(shapes, tmp_path):
    config = load_config(None, {"data.path": str(shapes), "output": str(tmp_path)})
    assert config_from_arguments(config, {}) is config
    changed = config_from_arguments(config, {"epochs": 4, "model.head": "mlp:8"})
    assert (changed.train.epochs, changed.model.head) == (4, "mlp:8")
    assert (config.train.epochs, config.model.head) == (10, "linear")
    nested = config_from_arguments({"train": {"lr": 0.5}, "data.path": str(shapes)}, {})
    assert nested.train.lr == 0.5 and nested.data.path == str(shapes)


def test_load_predicts_paths_images_arrays_and_tensors_alike(trained_run, shapes):
    path = _image_file(shapes)
    model = graft.load(trained_run)
    from_cli = graft.predict(trained_run, str(path), top_k=3)  # one path, not a list of its characters
    assert len(from_cli) == 1 and from_cli[0].path == str(path)
    assert graft.predict(trained_run, path, top_k=3)[0].labels == from_cli[0].labels  # a Path too
    image = Image.open(path).convert("RGB")
    pixels = np.array(image)
    inputs = [path, str(path), image, pixels, torch.from_numpy(pixels), torch.from_numpy(pixels).permute(2, 0, 1),
              model.transform(image)]
    rows = model.predict(inputs)
    assert len(rows) == len(inputs)
    assert rows[0].path == str(path) and rows[2].path == "<input 2>"
    for row in rows:
        assert row.labels == from_cli[0].labels and not row.error
        assert row.probabilities == pytest.approx(from_cli[0].probabilities, abs=1e-4)
    single = model.predict(image, top_k=1)
    assert single.labels == from_cli[0].labels[:1] and 0 < single.probabilities[0] <= 1
    batch = model.predict(torch.stack([model.transform(image)] * 2))
    assert [row.path for row in batch] == ["<input 0.0>", "<input 0.1>"]


def test_predict_honours_exif_orientation_of_a_pil_image(trained_run, shapes, tmp_path):
    image = Image.open(_image_file(shapes)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer (and graft) turns it 90° clockwise
    rotated_file = tmp_path / "rotated.jpg"
    image.transpose(Image.Transpose.ROTATE_90).save(rotated_file, exif=exif, quality=95)
    model = graft.load(trained_run)
    from_file = graft.predict(trained_run, rotated_file)[0]
    from_pil = model.predict(Image.open(rotated_file))
    assert from_pil.labels == from_file.labels
    assert from_pil.probabilities == pytest.approx(from_file.probabilities, abs=1e-4)


def test_predict_refuses_inputs_it_cannot_read(trained_run):
    model = graft.load(trained_run)
    with pytest.raises(GraftError, match="H x W x 3 uint8"):
        model.predict(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(GraftError, match="must be preprocessed"):
        model.predict(torch.zeros(8, 8))
    with pytest.raises(GraftError, match="expected a path, a PIL image"):
        model.predict(42)
    assert model.predict([]) == []


def test_an_unknown_backbone_fails_before_the_scan_and_leaves_no_trace(shapes, tmp_path, monkeypatch):
    from graft.training import fitting

    def no_scan(*args, **kwargs):
        raise AssertionError("the data was scanned before the backbone was checked")

    output = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(fitting, "scan", no_scan)
        with pytest.raises(GraftError, match="no_such_net"):
            fitting.fit(str(shapes), backbone="no_such_net", output=str(output), verbose=False)
        with pytest.raises(GraftError, match="missing.safetensors"):
            fitting.fit(str(shapes), output=str(output), verbose=False,
                        **{**FAST, "pretrained": True, "weights": str(tmp_path / "missing.safetensors")})
    assert not (output / "data_report.json").exists()
    # the retry, corrected, needs no --overwrite
    result = fitting.fit(str(shapes), output=str(output), verbose=False, **{**FAST, "strategy": "probe", "epochs": 1})
    assert (output / "data_report.json").is_file() and "val" in result.metrics


def test_a_bad_progress_interval_fails_before_anything_is_written(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_PROGRESS_SECONDS", "soon")
    with pytest.raises(GraftError, match="GRAFT_PROGRESS_SECONDS='soon'"):
        graft.fit(str(shapes), output=str(tmp_path / "run"), verbose=False, **FAST)
    assert not (tmp_path / "run").exists()


def test_a_model_shows_itself_in_one_line(trained_result):
    shown = repr(trained_result.model)
    assert shown == ("GraftModel(backbone=test_resnet, cut_at=pre_logits, classes=[circle, square, triangle], "
                     "input=32x32)")
