"""Deployment: batch-norm folding, precise BN, ONNX / torch.export / safetensors export and their parity checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from torch import nn

from graft.config import load_config
from graft.deploy.export import consumer_metadata, export, onnx_session
from graft.errors import GraftError
from graft.evaluation.inference import predict
from graft.models.batchnorm import fold_batch_norms, recompute_statistics
from graft.models.grafted import create_model
from graft.models.run_folder import load, read_card
from graft.training.fitting import fit
from graft.training.precise_bn import precise_bn


def _model_with_moved_statistics(backbone: str, head: str = "linear", cut_at: str | None = None):
    """A randomly initialised model whose BN running statistics are not the trivial 0/1 (folding would be vacuous)."""
    torch.manual_seed(0)
    config = load_config(None, {"model.backbone": backbone, "model.pretrained": False, "data.image_size": 32,
                                "model.head": head, "model.cut_at": cut_at})
    model, _ = create_model(config, ["a", "b", "c"])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("backbone, head, expected", [
    ("test_resnet", "mlp:16", 16),  # ResNet-style: every conv's BN and the head's BatchNorm1d after its Linear
    ("test_efficientnet", "linear", None),  # timm BatchNormAct2d: the norm goes, its activation stays
    ("test_convnext", "linear", 0),  # ConvNeXt-style: LayerNorm only, nothing to fold, no error
])
def test_folding_keeps_logits_within_1e4(backbone, head, expected):
    model = _model_with_moved_statistics(backbone, head)
    inputs = torch.randn(8, 3, 32, 32)
    folded, result = fold_batch_norms(model, inputs)
    norms_left = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        assert (folded(inputs) - model(inputs)).abs().max().item() < 1e-4
    if expected is not None:
        assert result.count == expected
    assert result.count > 0 or backbone == "test_convnext"
    assert not norms_left and not result.skipped  # every BN in these nets directly follows a conv/linear
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == (result.count > 0)


class _SharedOutput(nn.Module):
    """conv → BN, but the conv's output also feeds a residual sum: folding would change that sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.after = nn.Conv2d(3, 3, 1)
        self.after_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.after_bn(self.after(self.bn(y) + y)).mean((2, 3))


def test_a_conv_whose_output_is_used_elsewhere_is_not_folded():
    torch.manual_seed(0)
    model = _SharedOutput()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    inputs = torch.randn(4, 3, 8, 8)
    folded, result = fold_batch_norms(model, inputs)
    assert result.folded == [("after", "after_bn")]
    assert result.skipped[0][0] == "bn" and "used elsewhere" in result.skipped[0][1]
    with torch.no_grad():
        assert torch.allclose(folded(inputs), model(inputs), atol=1e-5)


def test_precise_bn_gives_the_exact_statistics_of_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    data = [torch.randn(5, 3, 6, 6) * 3 + 1 for _ in range(4)]  # equal batches: the batch average is exact
    seen = recompute_statistics(model, [(batch,) for batch in data], torch.device("cpu"))
    with torch.no_grad():
        outputs = torch.cat([model[0](batch) for batch in data])
    per_batch_var = torch.stack([model[0](b).detach().transpose(0, 1).flatten(1).var(1) for b in data]).mean(0)
    assert seen == 20 and not model.training and model[1].momentum == 0.1
    assert torch.allclose(model[1].running_mean, outputs.transpose(0, 1).flatten(1).mean(1), atol=1e-5)
    assert torch.allclose(model[1].running_var, per_batch_var, atol=1e-4)


def test_precise_bn_in_fit_and_for_an_existing_run(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "run", **{"train.strategy": "scratch", "train.epochs": 2,
                                                      "train.precise_bn": True})
    result = fit(config, verbose=False)
    assert result.metrics["precise_bn"]["images"] == 72 and read_card(result.run_dir)["precise_bn"]["images"] == 72
    report = precise_bn(result.run_dir, device="cpu", verbose=False)
    assert report["images"] == 72 and 0 <= report["after_val_acc"] <= 1
    assert (result.run_dir / "model.before-precise-bn.safetensors").is_file()
    assert read_card(result.run_dir)["precise_bn"]["val_acc_after"] == report["after_val_acc"]
    load(result.run_dir)  # still a loadable run folder


def test_export_writes_every_form_and_each_matches_the_model(trained_run, shapes, tmp_path):
    out = tmp_path / "export"
    result = export(trained_run, out, data=str(shapes))
    assert set(result.files) >= {"model.onnx", "model.pt2", "model.safetensors", "graft.json", "preprocessing.json",
                                 "predict_onnx.py", "export.json"}
    assert result.folded.count > 0 and result.parity["fold_bn"] < 1e-4
    assert result.parity["onnx"] < 1e-3 and result.parity["torch_export"] < 1e-3
    info = json.loads((out / "export.json").read_text())
    assert info["onnx_opset"] == 18 and info["fold_bn"]["count"] == result.folded.count
    assert set(info["latency_ms_batch1_median"]) == {"eager", "folded", "onnxruntime"}
    model = load(trained_run)
    session = onnx_session(out / "model.onnx")
    program = torch.export.load(str(out / "model.pt2")).module()
    for batch in (1, 5):  # the batch axis is dynamic in both
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images)
            assert torch.allclose(program(images), expected, atol=1e-3)
        assert torch.allclose(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), expected, atol=1e-3)
    assert json.loads((out / "preprocessing.json").read_text()) == json.loads(json.dumps(consumer_metadata(model)))
    assert load(out).classes == model.classes  # the safetensors + graft.json form is a run folder


def test_the_standalone_onnx_example_needs_no_graft_and_agrees(trained_run, shapes, tmp_path):
    out = tmp_path / "export"
    export(trained_run, out, formats=("onnx",), fold_bn=False, data=str(shapes))
    files = sorted(str(p) for p in (shapes / "val" / "square").iterdir())[:4]
    script = f"import runpy, sys; sys.modules['graft'] = None; sys.modules['torch'] = None; " \
             f"sys.argv = ['x', *{files!r}]; runpy.run_path({str(out / 'predict_onnx.py')!r}, run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = run.stdout.split("\n")
    labels = [line.split("\t")[1] for line in lines if line]
    assert labels == [row.labels[0] for row in predict(trained_run, files, device="cpu")]
    helped = subprocess.run([sys.executable, str(out / "predict_onnx.py"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage:" in helped.stdout and "IMAGE" in helped.stdout, helped.stderr
    assert "Classify images with the exported model" in helped.stdout and not helped.stderr
    bare = subprocess.run([sys.executable, str(out / "predict_onnx.py")], capture_output=True, text=True)
    assert bare.returncode == 2 and "IMAGE" in bare.stderr  # no image: argparse's usage line, not a silent exit


def test_a_model_cut_at_an_inner_node_exports_too(shapes, tmp_path):
    run = fit(tiny_config(shapes, tmp_path / "inner", **{"train.strategy": "scratch", "train.epochs": 1,
                                                         "model.cut_at": "layer2"}), verbose=False).run_dir
    export(run, tmp_path / "out", formats=("torch", "onnx"))
    session = onnx_session(tmp_path / "out" / "model.onnx")
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # recomputed here against the run's own model, not the exporter's parity numbers
        expected = load(run).eval()(images)
        torch.testing.assert_close(program(images), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-4)


def test_export_errors_are_clear(trained_run, tmp_path):
    with pytest.raises(GraftError, match="export format.* tflite not understood"):
        export(trained_run, tmp_path / "a", formats=("tflite",))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(GraftError, match="folder is not empty; pass --overwrite"):
        export(trained_run, tmp_path / "b")


def test_cli_export_prints_parity_and_latency(trained_run, tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    result = CliRunner().invoke(app, ["export", str(trained_run), "-o", str(tmp_path / "cli"), "--format", "onnx",
                                      "--fold-bn"])
    assert result.exit_code == 0, result.output
    assert "folded" in result.output and "onnx" in result.output and "max |Δlogit|" in result.output


def test_every_format_in_one_command_loads_the_run_once(trained_run, shapes, tmp_path, monkeypatch):
    """onnx, torch, safetensors, timm and hf from one call: graft's forms in OUTPUT, timm's and the hub's in
    sub-folders of their own (their model.safetensors holds timm's names), each checked here, not by the exporter."""
    import timm

    import graft.deploy.export as exporting

    loads = []
    monkeypatch.setattr(exporting, "load", lambda *a, **k: loads.append(a) or load(*a, **k))
    out = tmp_path / "all"
    result = exporting.export(trained_run, out, formats=("onnx", "torch", "safetensors", "timm", "hf"),
                              data=str(shapes))
    assert len(loads) == 1  # one model for the five forms
    assert {"model.onnx", "model.pt2", "model.safetensors", "timm/config.json", "hf/README.md"} <= set(result.files)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load(trained_run).eval()(images)
        for folder in ("timm", "hf"):
            rebuilt = timm.create_model(f"local-dir:{out / folder}", pretrained=True).eval()
            torch.testing.assert_close(rebuilt(images), expected, atol=1e-4, rtol=1e-4)
    session = onnx_session(out / "model.onnx")
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-4)
    assert json.loads((out / "hf" / "export.json").read_text())["format"] == "hf"  # push reads this one
    assert load(out).classes == load(trained_run).classes


def test_an_export_timm_cannot_represent_writes_nothing(shapes, tmp_path):
    run = fit(tiny_config(shapes, tmp_path / "inner", **{"train.strategy": "scratch", "train.epochs": 1,
                                                         "model.cut_at": "layer2"}), verbose=False).run_dir
    with pytest.raises(GraftError, match="no timm equivalent"):
        export(run, tmp_path / "out", formats=("onnx", "hf"))
    assert not (tmp_path / "out").exists()
