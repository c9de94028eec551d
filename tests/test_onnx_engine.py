"""ONNX Runtime as the inference engine: the same features and predictions as eager PyTorch, a cached export that is
rebuilt when damaged, and one warning (then eager) when a module cannot be exported faithfully."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graft.data.discovery import discover
from graft.data.images import load_image
from graft.data.transforms import create_transform
from graft.models.backbones.registry import create_backbone
from graft.models.onnx_engine import OnnxModule, as_tuple, engine_module, export_onnx, onnxruntime_available
from graft.models.surgery import Trunk
from graft.probing.extraction import FeatureExtractor, extract_features

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="needs onnxruntime, onnx and onnxscript")

MULTI = ["layer2", "layer3", "pre_logits"]  # a multi-node cut: two inner stages and the pooled features


def _backbone():
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", pretrained=False)
    return backbone, backbone.preprocessing.with_size(32)


def _images(shapes, preprocessing, count: int = 6) -> torch.Tensor:
    transform = create_transform(preprocessing)
    paths = sorted((shapes / "val").rglob("*.png"))[::5][:count]
    return torch.stack([transform(load_image(str(path))) for path in paths])


class _Ordered(nn.Module):
    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, x):
        outputs = self.extractor(x)
        return tuple(outputs[node] for node in self.extractor.nodes)


@pytest.mark.parametrize("nodes", [["pre_logits"], MULTI])
def test_onnx_features_equal_eager_in_float32(shapes, tmp_path, nodes):
    backbone, preprocessing = _backbone()
    extractor = FeatureExtractor(backbone.net, nodes).eval()
    images = _images(shapes, preprocessing)
    engine = engine_module(_Ordered(extractor), tmp_path / "trunk.onnx", images[:2], "test",
                           output_names=tuple(f"f{i}" for i in range(len(nodes))))
    assert isinstance(engine, OnnxModule)
    with torch.inference_mode():
        expected = [extractor(images)[node] for node in nodes]
    got = as_tuple(engine(images))  # more images than it was checked on: the batch axis is dynamic
    assert len(got) == len(nodes)
    for want, have in zip(expected, got):
        assert want.shape == have.shape
        torch.testing.assert_close(have, want, atol=1e-4, rtol=0)


def test_extraction_engines_share_features_and_cache_key(shapes, tmp_path):
    """Both engines give the same cached features for a multi-node cut; a cache filled by one is read by the other."""
    backbone, preprocessing = _backbone()
    splits = discover(str(shapes))
    extractor = FeatureExtractor(backbone.net, MULTI)
    warnings = []
    onnx = extract_features(splits, extractor, preprocessing, "test_resnet", tmp_path / "a", workers=0,
                            engine="onnx", log=warnings.append)
    eager = extract_features(splits, extractor, preprocessing, "test_resnet", tmp_path / "b", workers=0,
                             engine="eager")
    assert not [line for line in warnings if line.startswith("warning")]
    assert onnx["pre_logits"].stats["engine"] == "onnx" and eager["pre_logits"].stats["engine"] == "eager"
    assert len(list((tmp_path / "a" / "onnx").glob("*.onnx"))) == 1  # the trunk's export, beside the features
    assert not (tmp_path / "b" / "onnx").exists()
    for node in MULTI:
        for split in ("train", "val"):  # float16 in the cache: equal to its rounding
            np.testing.assert_allclose(onnx[node].features[split].astype(np.float32),
                                       eager[node].features[split].astype(np.float32), rtol=2e-3, atol=2e-3)
    again = extract_features(splits, extractor, preprocessing, "test_resnet", tmp_path / "a", workers=0,
                             engine="eager")
    assert again["pre_logits"].stats["extracted"] == 0  # the same key: onnx's features are eager's
    assert all(np.array_equal(again[n].features["train"], onnx[n].features["train"]) for n in MULTI)


def test_trunk_extraction_uses_onnx_by_default_on_cpu(shapes, tmp_path):
    backbone, preprocessing = _backbone()
    splits = discover(str(shapes))
    sets = extract_features(splits, Trunk(backbone.net, "layer3"), preprocessing, "test_resnet", tmp_path, workers=0)
    assert sets["layer3"].stats["engine"] == "onnx"
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1


def test_damaged_cached_export_is_rebuilt(shapes, tmp_path):
    backbone, preprocessing = _backbone()
    trunk = Trunk(backbone.net).eval()
    images = _images(shapes, preprocessing, 2)
    path = tmp_path / "trunk.onnx"
    assert isinstance(engine_module(trunk, path, images, "test"), OnnxModule)
    path.write_bytes(b"not an onnx file")
    warnings = []
    engine = engine_module(trunk, path, images, "test", warnings.append)
    assert isinstance(engine, OnnxModule) and not warnings
    assert path.stat().st_size > 1000
    with torch.inference_mode():
        torch.testing.assert_close(engine(images), trunk(images), atol=1e-4, rtol=0)


class _ExportsDifferently(nn.Module):
    def forward(self, x):
        pooled = x.mean((2, 3))
        return pooled + 1 if torch.onnx.is_in_onnx_export() else pooled  # no exporter writes the eager model


class _NotExportable(nn.Module):
    def forward(self, x):
        gram = x.mean(1) @ x.mean(1).transpose(1, 2)
        return torch.linalg.eigh(gram)[0]  # no ONNX operator for it


@pytest.mark.parametrize("module", [_ExportsDifferently(), _NotExportable()])
def test_unfaithful_or_unexportable_module_runs_eager_after_one_warning(tmp_path, module):
    warnings = []
    engine = engine_module(module, tmp_path / "m.onnx", torch.randn(2, 3, 8, 8), "test", warnings.append)
    assert engine is module
    assert len(warnings) == 1 and warnings[0].startswith("warning: ONNX Runtime not used for test (")
    assert "\x1b" not in warnings[0] and "\n" not in warnings[0]


class _TracedWrong(nn.Module):
    def forward(self, x):
        pooled, bright = x.mean((2, 3)), x.max() > 1.5
        # a trace keeps the branch its example took; the dynamo exporter keeps the condition in the graph
        return torch.where(bright, pooled, -pooled) if torch.compiler.is_exporting() else (
            pooled if bright else -pooled)


class _OnlyDynamoExports(nn.Module):
    def forward(self, x):
        return torch.logcumsumexp(x.mean((2, 3)), 1)  # no TorchScript symbolic for it; the dynamo exporter has one


@pytest.mark.parametrize("module, example", [(_OnlyDynamoExports(), torch.randn(2, 3, 8, 8)),
                                             (_TracedWrong(), torch.ones(2, 3, 8, 8))])
def test_the_dynamo_exporter_takes_over_when_torchscript_fails_or_mismatches(tmp_path, module, example, capfd):
    """The TorchScript exporter runs first; when it raises, or its graph does not match eager, the dynamo exporter
    writes the file, and that export is checked like any other (here on batches it never saw)."""
    first = "dynamo" if isinstance(module, _OnlyDynamoExports) else "torchscript"  # what wrote the file
    assert export_onnx(module, example, tmp_path / "first.onnx") == first
    warnings = []
    engine = engine_module(module, tmp_path / "m.onnx", example, "test", warnings.append)
    assert isinstance(engine, OnnxModule) and not warnings
    assert "Torch IR graph" not in capfd.readouterr().out  # the TorchScript exporter's dump on failure stays quiet
    inputs = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for batch in (inputs, inputs.clamp(-1, 1)):  # either side of _TracedWrong's condition
            torch.testing.assert_close(engine(batch), module(batch), atol=1e-5, rtol=0)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the shared trained run: the ONNX runtime export is written into it, not into the shared one."""
    import shutil

    # without runtime/: other tests' CLI predicts (--runtime auto) may have exported into the shared run already
    return Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("runtime")))


def _val_files(shapes) -> list[str]:
    return [str(path) for path in sorted((shapes / "val").rglob("*.png"))]


def test_predict_onnx_runtime_equals_torch(run_copy, shapes):
    from graft.evaluation.inference import predict
    from graft.utils.outputs import read_manifest

    files = _val_files(shapes)
    torch_rows = predict(run_copy, files, top_k=3, device="cpu", runtime="torch")
    assert not (run_copy / "runtime").exists()
    onnx_rows = predict(run_copy, files, top_k=3, device="cpu", runtime="onnx")
    exports = list((run_copy / "runtime").glob("model-*.onnx"))
    assert len(exports) == 1 and "runtime" in read_manifest(run_copy)  # --overwrite owns it
    assert exports[0].name in read_manifest(run_copy / "runtime")
    for eager, onnx in zip(torch_rows, onnx_rows, strict=True):
        assert onnx.labels[0] == eager.labels[0]
        assert onnx.probabilities == pytest.approx(eager.probabilities, abs=1e-4)
    again = predict(run_copy, files[:4], top_k=3, device="cpu", runtime="auto")  # reuses the cached export
    assert list((run_copy / "runtime").glob("model-*.onnx")) == exports
    assert [row.labels for row in again] == [row.labels for row in onnx_rows[:4]]


def test_onnx_runtime_ensemble_with_tta_equals_torch(run_copy, shapes, tmp_path):
    import shutil

    from graft.evaluation.inference import predict

    second = Path(shutil.copytree(run_copy, tmp_path / "second"))
    files = _val_files(shapes)[::3]
    eager = predict([run_copy, second], files, device="cpu", tta="flip,crops", runtime="torch")
    onnx = predict([run_copy, second], files, device="cpu", tta="flip,crops", runtime="onnx")
    assert all((run / "runtime").is_dir() for run in (run_copy, second))
    for want, have in zip(eager, onnx, strict=True):
        assert have.labels == want.labels
        assert have.probabilities == pytest.approx(want.probabilities, abs=1e-4)


def test_serve_onnx_runtime_answers_as_torch(run_copy, shapes):
    from fastapi.testclient import TestClient

    from graft.deploy.serve import ServeConfig, create_app
    from graft.evaluation.inference import predict

    files = [Path(path) for path in _val_files(shapes)[::6]]
    app = create_app(run_copy, "cpu", ServeConfig(top_k=3, runtime="onnx"))
    assert all(isinstance(member.model, OnnxModule) for member in app.state.predictor.per_view)
    with TestClient(app) as client:
        response = client.post("/predict", files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert response.status_code == 200, response.text
    reference = predict(run_copy, [str(f) for f in files], top_k=3, device="cpu", runtime="torch")
    for row, want in zip(response.json()["predictions"], reference, strict=True):
        assert row["labels"][0] == want.labels[0]
        assert row["probabilities"] == pytest.approx(want.probabilities, abs=1e-4)


def test_cli_predict_runtime(run_copy, shapes):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    files = _val_files(shapes)[:3]
    result = CliRunner().invoke(app, ["predict", str(run_copy), *files, "--runtime", "onnx", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert list((run_copy / "runtime").glob("model-*.onnx"))
    refused = CliRunner().invoke(app, ["predict", str(run_copy), *files, "--runtime", "tensorrt"])
    assert refused.exit_code != 0 and "--runtime 'tensorrt' not understood" in refused.output


def test_threaded_decoding_gives_the_sequential_features_in_order(shapes, tmp_path):
    """Decoding in threads ahead of the forward (and taking turns with it) changes nothing: the features of every
    file are exactly those of decoding one image after another in the calling thread."""
    from graft.data.prefetch import DecodePlan

    backbone, preprocessing = _backbone()
    splits = discover(str(shapes))
    extractor = FeatureExtractor(backbone.net, MULTI)
    sets = {}
    for name, plan in {"sequential": DecodePlan(2, 0, 0), "overlap": DecodePlan(2, 3, 1),
                       "turns": DecodePlan(2, 2, 0)}.items():
        sets[name] = extract_features(splits, extractor, preprocessing, "test_resnet", tmp_path / name,
                                      batch_size=5, engine="onnx", decode=plan)
        assert sets[name]["pre_logits"].stats["engine"] == "onnx"
    for node in MULTI:
        for split in ("train", "val"):
            for name in ("overlap", "turns"):
                assert sets[name][node].paths[split] == sets["sequential"][node].paths[split]
                assert np.array_equal(sets[name][node].features[split], sets["sequential"][node].features[split])


def test_threaded_batches_keep_the_dataset_order():
    """Items finishing out of order (the first of each batch waits for the last) still come out in index order,
    collated as a DataLoader collates them."""
    import threading

    from torch.utils.data import DataLoader

    from graft.data.prefetch import ThreadedBatches

    class Items:
        def __init__(self):
            self.done = {index: threading.Event() for index in range(10)}

        def __len__(self):
            return 10

        def __getitem__(self, index):
            if index % 4 == 0 and index + 3 < len(self):
                self.done[index + 3].wait(timeout=30)  # finishes after the last of its batch
            self.done[index].set()
            return torch.full((2,), float(index)), index, f"item {index}"

    in_order = Items()
    for event in in_order.done.values():  # one thread reads in order: nothing to wait for
        event.set()
    expected = list(DataLoader(in_order, batch_size=4))
    for threads, ahead in ((4, 0), (4, 1), (4, 2)):
        got = list(ThreadedBatches(Items(), 4, threads, ahead))
        assert len(got) == len(expected) == 3
        for have, want in zip(got, expected):
            assert torch.equal(have[0], want[0]) and torch.equal(have[1], want[1]) and have[2] == want[2]


def test_evaluate_onnx_runtime_equals_torch(run_copy, shapes, tmp_path):
    from graft.evaluation.scoring import evaluate

    numbers = {runtime: evaluate(run_copy, shapes, split="val", device="cpu", report=False, runtime=runtime,
                                 output=tmp_path / runtime) for runtime in ("torch", "onnx")}
    assert len(list((run_copy / "runtime").glob("model-*.onnx"))) == 1  # made by the onnx evaluation, not torch's
    assert numbers["onnx"]["accuracy"] == numbers["torch"]["accuracy"]
    assert numbers["onnx"]["confusion_matrix"] == numbers["torch"]["confusion_matrix"]
    rows = {runtime: (tmp_path / runtime / "predictions.csv").read_text().splitlines() for runtime in numbers}
    assert [row.split(",")[:3] for row in rows["onnx"]] == [row.split(",")[:3] for row in rows["torch"]]
