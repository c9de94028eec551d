"""`graft export --quantize int8`: a real int8 model beside the float one, its accuracy measured, refused when poor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from graft.cli import app
from graft.data.transforms import create_transform
from graft.deploy.export import export
from graft.errors import GraftError
from graft.models.run_folder import load


def _validation_set(run, shapes: Path) -> tuple[np.ndarray, np.ndarray]:
    """The shapes' val/ images, decoded by Pillow here (not graft's reader), in the model's preprocessing."""
    model = load(run)
    transform = create_transform(model.preprocessing)
    files = sorted(shapes.glob("val/*/*.png"))
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in files]).numpy()
    return images, np.array([model.classes.index(path.parent.name) for path in files])


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]


@pytest.fixture(scope="module")
def quantized(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "export"
    export(trained_run, out, ("onnx",), quantize="int8")
    return out


def test_the_int8_model_is_quantized_runs_and_agrees_with_fp32(trained_run, shapes, quantized):
    graph = onnx.load(str(quantized / "model.int8.onnx")).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 10  # activations really quantized
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)  # and int8 weights
    images, labels = _validation_set(trained_run, shapes)
    fp32, int8 = _logits(quantized / "model.onnx", images), _logits(quantized / "model.int8.onnx", images)
    assert int8.shape == fp32.shape and np.isfinite(int8).all()
    assert not np.array_equal(int8, fp32)  # a different model, not a copy
    assert np.abs(int8 - fp32).max() < 0.15 * np.abs(fp32).max()
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    manifest = json.loads((quantized / ".graft-manifest.json").read_text())
    assert "model.int8.onnx" in manifest  # graft's file: --overwrite may replace it


def test_export_json_records_the_accuracies_measured_here(trained_run, shapes, quantized):
    record = json.loads((quantized / "export.json").read_text())
    done = record["quantization"]
    images, labels = _validation_set(trained_run, shapes)
    fp32 = _logits(quantized / "model.onnx", images).argmax(1)
    int8 = _logits(quantized / "model.int8.onnx", images).argmax(1)
    assert done["evaluation_images"] == len(labels) == 30
    assert done["accuracy"]["fp32"] == pytest.approx((fp32 == labels).mean())
    assert done["accuracy"]["int8"] == pytest.approx((int8 == labels).mean())
    assert done["top1_agreement"] == pytest.approx((fp32 == int8).mean())
    assert done["calibration_images"] == 72 and done["kept"] and not done["forced"]  # every training image, here
    assert "model.int8.onnx" in record["files"] and "onnxruntime_int8" in record["latency_ms_batch1_median"]


def test_int8_refused_when_it_loses_too_much_unless_forced(trained_run, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(GraftError) as refused:
        export(trained_run, out, ("onnx",), quantize="int8", max_drop=-1.0)  # no drop can be below -1 point
    message = str(refused.value)
    assert "\n" not in message and "--force-quantize" in message and "points" in message
    assert not (out / "model.int8.onnx").exists() and (out / "model.onnx").is_file()
    assert not list(out.glob(".graft-tmp-*"))
    done = json.loads((out / "export.json").read_text())["quantization"]
    assert done["kept"] is False and done["file"] is None and f"{done['accuracy_drop_points']:.2f}" in message

    forced = tmp_path / "forced"
    result = export(trained_run, forced, ("onnx",), quantize="int8", max_drop=-1.0, force_quantize=True)
    assert (forced / "model.int8.onnx").is_file() and result.quantization["forced"] is True


def test_quantize_errors_are_one_line_before_any_work(trained_run, tmp_path):
    with pytest.raises(GraftError, match="add onnx to --format"):
        export(trained_run, tmp_path / "a", ("torch",), quantize="int8")
    with pytest.raises(GraftError, match="choose int8"):
        export(trained_run, tmp_path / "b", ("onnx",), quantize="int4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export_quantize_prints_both_accuracies(trained_run, tmp_path):
    out = tmp_path / "cli"
    done = CliRunner().invoke(app, ["export", str(trained_run), "-o", str(out), "--format", "onnx", "--quantize",
                                    "int8"])  # in this process: the CLI's wiring, without 3 s of imports
    assert done.exit_code == 0, done.output
    recorded = json.loads((out / "export.json").read_text())["quantization"]["accuracy"]
    assert "int8 vs fp32" in done.stdout and f"{recorded['int8']:.4f}" in done.stdout
    assert (out / "model.int8.onnx").is_file()
