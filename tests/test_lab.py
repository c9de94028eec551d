"""The network lab: the lecture's scratch networks, their options, diagnostics, lr-find, statistics, comparison."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config
from PIL import Image
from torch import nn

from graft.analysis.comparison import compare_strategies
from graft.analysis.diagnose import activation_statistics, diagnose, gradient_flow
from graft.config import ACTIVATIONS, NORMS, ArchOptions, load_config
from graft.data.statistics import dataset_statistics
from graft.errors import GraftError
from graft.evaluation.inference import predict
from graft.models.backbones.lab import create_lab_net
from graft.models.backbones.registry import create_backbone
from graft.models.run_folder import load, read_card
from graft.models.inspection import list_nodes, receptive_fields
from graft.training.fitting import fit
from graft.training.lr_find import find_lr, lr_sweep
from graft.utils.runtime import Runtime


def _shapes(name: str, size: int) -> dict[str, tuple]:
    backbone = create_backbone(name, pretrained=False)
    return {n.name: n.shape for n in list_nodes(backbone.net, (size, size), stages_only=False)}


def test_small_cnn_cifar_has_the_lectures_shapes():
    shapes = _shapes("small-cnn-cifar", 32)
    expected = {"features.conv1": (32, 32, 32), "features.conv2": (32, 32, 32), "features.pool1": (32, 16, 16),
                "features.conv3": (64, 16, 16), "features.conv4": (64, 14, 14), "features.pool2": (64, 7, 7),
                "pre_logits": (512,)}
    assert {k: shapes[k] for k in expected} == expected


def test_small_cnn_catsdogs_has_the_lectures_shapes():
    shapes = _shapes("small-cnn-catsdogs", 150)
    expected = {"features.conv1": (32, 148, 148), "features.pool1": (32, 74, 74), "features.conv2": (32, 72, 72),
                "features.pool2": (32, 36, 36), "features.conv3": (64, 34, 34), "features.pool3": (64, 17, 17),
                "pre_logits": (64,)}
    assert {k: shapes[k] for k in expected} == expected


def test_vgg_like_stages_and_receptive_fields():
    net, size = create_lab_net("vgg-like", ArchOptions(vgg_stages="3x8,1x16"))
    fields = receptive_fields(net, ["features.stage1.conv1", "features.stage1.conv2", "features.stage1.conv3",
                                    "features.stage1.pool", "features.stage2.conv1"], (size, size))
    # three stacked 3x3 stride-1 convs see 7x7, like one 7x7 (the VGG argument); the pool adds 1, then 3x3 adds 4
    assert list(fields.values()) == ["3", "5", "7", "8", "12"]
    assert net.num_features == 16 and [i["module"] for i in net.feature_info] == ["features.stage1",
                                                                                   "features.stage2"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_activation_and_norm_builds_and_runs(activation, norm):
    net, _ = create_lab_net("small-cnn-cifar", ArchOptions(activation, norm, "kaiming"))
    net.train()
    out = net.forward_head(net.forward_features(torch.randn(2, 3, 32, 32)))
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    conv = net.features.conv1.conv
    assert (conv.bias is None) == (norm != "none")  # the norm's shift makes the conv's bias redundant


def _deep(activation: str, init: str, width: int = 64, norm: str = "none") -> nn.Module:
    return create_lab_net("vgg-like", ArchOptions(activation, norm, init, f"10x{width}"))[0].features


@pytest.mark.parametrize("activation, norm", [("relu", "none"), ("relu", "batch"), ("relu", "layer"),
                                              ("relu", "group"), ("relu", "instance"), ("selu", "none"),
                                              ("maxout", "layer")])
def test_kaiming_keeps_the_activation_scale_over_ten_layers(activation, norm):
    torch.manual_seed(0)
    rows = activation_statistics(_deep(activation, "kaiming", norm=norm), torch.randn(8, 3, 16, 16))
    stds = [row.std for row in rows]
    assert len(stds) == 10 and max(stds) / min(stds) < 2 and not any(row.flags for row in rows)
    if activation == "selu":
        assert all(0.8 < s < 1.2 for s in stds)  # self-normalising: unit variance throughout


def test_small_normal_init_with_tanh_collapses_and_is_flagged():
    torch.manual_seed(0)
    rows = activation_statistics(_deep("tanh", "normal:0.01"), torch.randn(8, 3, 16, 16))
    assert rows[-1].std < 1e-3 * rows[0].std * 10 and "collapsing" in " ".join(rows[-1].flags)
    assert all(later.std < earlier.std for earlier, later in zip(rows, rows[1:]))


def test_larger_normal_init_with_tanh_saturates_and_xavier_does_not():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    wide = activation_statistics(_deep("tanh", "normal:0.05", width=1024), images)
    assert wide[-1].saturated > 0.4 and "saturated" in " ".join(wide[-1].flags)
    xavier = activation_statistics(_deep("tanh", "xavier", width=1024), images)
    assert xavier[-1].saturated < 0.05 and not xavier[-1].flags


def test_dead_relu_units_are_detected():
    net, _ = create_lab_net("vgg-like", ArchOptions(vgg_stages="2x16"))
    with torch.no_grad():
        net.features.stage1.conv1.conv.bias[:12] = -1e4  # 12 of 16 units can never fire
    rows = activation_statistics(net, torch.randn(8, 3, 16, 16))
    assert rows[0].dead == pytest.approx(12 / 16) and "dead: 75%" in rows[0].flags[0]
    assert rows[1].dead == pytest.approx(0.0, abs=0.2)


def test_gradient_flow_reports_update_ratios():
    net, _ = create_lab_net("vgg-like", ArchOptions(vgg_stages="2x8"))
    model = nn.Sequential(net, nn.Linear(8, 3))
    rows = gradient_flow(model, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]),
                         lambda params: torch.optim.SGD(params, lr=1e-3))
    assert [r.name for r in rows][:2] == ["0.features.stage1.conv1.conv.weight", "0.features.stage1.conv2.conv.weight"]
    for row in rows:  # plain SGD: the update is exactly lr x gradient
        assert row.update_ratio == pytest.approx(1e-3 * row.grad_norm / row.weight_norm, rel=1e-4)


def test_lr_sweep_suggests_a_tenth_of_the_lowest_loss_rate():
    # a loss that is lowest at lr = 0.1 and blows up beyond it: the rule suggests a tenth of that
    finding = lr_sweep(lambda lr: 1.0 + (math.log10(lr) + 1) ** 2 / 10 + (50 * lr if lr > 0.3 else 0), smoothing=0.0)
    assert finding.suggestion == pytest.approx(1e-2, rel=0.2) and finding.lrs[-1] < 10


def test_lr_sweep_warns_when_its_curve_has_no_usable_minimum():
    assert lr_sweep(lambda lr: 1.0 + (math.log10(lr) + 1) ** 2 / 10 + (50 * lr if lr > 0.3 else 0),
                    smoothing=0.0).warning == ""  # a clear minimum inside the sweep
    rising = lr_sweep(lambda lr: 1.0 + lr, smoothing=0.0)  # the loss only rises: lowest at the first rate
    assert rising.suggestion < rising.lrs[0] and "never fell" in rising.warning and "--start-lr" in rising.warning
    falling = lr_sweep(lambda lr: 2.0 - math.log10(lr) / 10, smoothing=0.0)  # still falling at end = 10
    assert falling.lrs[-1] == pytest.approx(10.0) and "raise --end-lr" in falling.warning
    flat = lr_sweep(lambda lr: 1.0 - 1e-3 * math.log10(lr / 1e-7) if lr < 1 else 1.0, smoothing=0.0)
    assert "too flat" in flat.warning


def test_cli_lr_find_writes_the_curve_as_csv(shapes, tmp_path):
    from typer.testing import CliRunner

    from graft.cli import app

    result = CliRunner().invoke(app, ["lr-find", str(shapes), "-b", "test_resnet", "--no-pretrained", "--image-size",
                                      "32", "--batch-size", "8", "--steps", "20", "--start-lr", "1e-5", "--end-lr",
                                      "1", "--strategy", "scratch", "-o", str(tmp_path / "lr")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "lr" / "lr_find.csv")))
    assert len(rows) >= 5 and (tmp_path / "lr" / "lr_find.png").is_file() and "lr_find.csv" in result.output
    rates = [float(row["lr"]) for row in rows]
    assert rates[0] == pytest.approx(1e-5)  # 20 rates from 1e-5 to 1, a constant factor of 10^(5/19) apart
    assert all(b / a == pytest.approx(10 ** (5 / 19)) for a, b in zip(rates, rates[1:]))


def test_lr_find_on_a_toy_task_is_within_an_order_of_magnitude_of_a_known_good_rate(shapes):
    config = tiny_config(shapes, "unused", **{"train.strategy": "scratch"})  # 1e-2 trains it well (other tests)
    runtime = Runtime(torch.device("cpu"), None, True, verbose=False)
    from graft.data.discovery import discover

    finding = find_lr(config, discover(shapes, seed=0), runtime, steps=60, start=1e-6, end=10)
    assert 1e-3 <= finding.suggestion <= 1e-1, finding.reason


def test_fit_with_lr_auto_records_the_found_rate(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "auto", **{"train.strategy": "scratch", "train.epochs": 2,
                                                        "train.lr": "auto"})
    result = fit(config, verbose=False)
    lr = read_card(result.run_dir)["config"]["train"]["lr"]
    assert isinstance(lr, float) and 1e-5 < lr < 1 and (result.run_dir / "lr_find.png").is_file()
    assert len(list(csv.DictReader(open(result.run_dir / "lr_find.csv")))) > 10


def test_a_lab_network_trains_from_scratch_and_reloads(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "cnn", **{"model.backbone": "small-cnn-cifar", "train.strategy": "scratch",
                                                       "train.epochs": 6, "model.norm": "batch",
                                                       "model.activation": "leaky_relu", "train.lr": 3e-3})
    result = fit(config, verbose=False)
    assert result.metrics["val"]["accuracy"] > 0.5  # three classes: chance is 0.33
    card = read_card(result.run_dir)
    assert card["backbone"] == ("lab:small-cnn-cifar?activation=leaky_relu&norm=batch&init=kaiming"
                               "&stages=2x32,2x64,2x128")
    model = load(result.run_dir)
    assert isinstance(model.trunk.net.features.conv1.act, nn.LeakyReLU)
    assert len(predict(result.run_dir, [str(shapes / "val" / "circle")], device="cpu")) == 10


def test_scratch_training_normalises_with_the_datas_own_statistics(shapes, tmp_path):
    result = fit(tiny_config(shapes, tmp_path / "s", **{"train.strategy": "scratch", "train.epochs": 1}), verbose=False)
    from graft.data.discovery import discover

    stats = dataset_statistics([p for p, _ in discover(shapes, seed=0).train], size=32, max_images=2000)
    assert read_card(result.run_dir)["preprocessing"]["mean"] == pytest.approx(list(stats.mean))


def test_dataset_statistics_are_exact_on_known_images(tmp_path):
    for index, colour in enumerate([(0, 0, 255), (255, 0, 255)]):  # red 0 / 1, green 0 / 0, blue 1 / 1
        Image.new("RGB", (10, 10), colour).save(tmp_path / f"{index}.png")
    stats = dataset_statistics([str(tmp_path / "0.png"), str(tmp_path / "1.png")], size=8)
    assert stats.mean == pytest.approx((0.5, 0.0, 1.0)) and stats.std == pytest.approx((0.5, 0.0, 0.0), abs=1e-5)
    assert stats.mean_image.shape == (8, 8, 3) and np.allclose(stats.mean_image[..., 0], 0.5)


def test_the_sigmoid_head_is_one_logit_for_two_classes(tmp_path):
    from synthetic import make_shapes

    from graft.models.heads import BinaryLogit, create_head

    head = create_head(8, 2, "sigmoid")
    features = torch.randn(5, 8)
    logits = head(features)
    z = head[-1].linear(features).squeeze(1)
    assert isinstance(head[-1], BinaryLogit) and torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(z))
    with pytest.raises(GraftError, match="'sigmoid' is for two classes"):
        create_head(8, 3, "sigmoid")
    data = make_shapes(tmp_path / "two", per_class=16, seed=4)
    (data / "triangle").rename(tmp_path / "unused")
    for path in (tmp_path / "unused").iterdir():
        path.unlink()
    config = tiny_config(data, tmp_path / "run", **{"model.backbone": "small-cnn-catsdogs", "data.image_size": 64,
                                                     "model.head": "sigmoid", "train.strategy": "scratch",
                                                     "train.epochs": 4, "train.lr": 3e-3})
    assert fit(config, verbose=False).metrics["val"]["accuracy"] >= 0.5


def test_lab_options_are_validated_and_refused_for_other_backbones():
    with pytest.raises(GraftError, match="activation 'relu6' not understood"):
        load_config(None, {"model.backbone": "vgg-like", "model.activation": "relu6"})
    with pytest.raises(GraftError, match="init 'he' not understood"):
        load_config(None, {"model.init": "he"})
    with pytest.raises(GraftError, match="shape the lab networks"):
        from graft.models.grafted import create_model

        create_model(load_config(None, {"model.backbone": TINY, "model.norm": "batch", "train.strategy": "scratch"}),
                     ["a", "b"], pretrained=False)
    with pytest.raises(GraftError, match="has no pretrained weights"):
        create_backbone("small-cnn-cifar", pretrained=True)


class _TrainingClock:
    """Stands in for ``time`` in the stage loop: training advances it 0.01 s a batch (through the batch hook),
    whatever the load on the machine, so the test checks the planner's arithmetic, not the CPU's speed that day."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def on_batch_end(self, *args, **kwargs) -> None:
        self.now += 0.01


def test_a_time_budget_ends_the_schedule_annealed_within_budget(shapes, tmp_path, monkeypatch):
    from graft.training import stages
    from graft.training.state import Hooks

    clock = _TrainingClock()
    monkeypatch.setattr(stages, "time", clock)
    config = tiny_config(shapes, tmp_path / "budget", **{"train.strategy": "scratch", "train.epochs": 200,
                                                          "train.time_budget": 1.0})
    result = fit(config, verbose=False, hooks=Hooks(on_batch_end=clock.on_batch_end))
    rows = list(csv.DictReader(open(result.run_dir / "history.csv")))
    epoch = float(rows[0]["seconds"])
    assert epoch > 0 and 1 < len(rows) < 200 and float(rows[-1]["lr"]) < 1e-4  # re-planned: the cosine reached its end
    assert sum(float(r["seconds"]) for r in rows) <= 1.0 + epoch  # within the budget, give or take the last epoch
    assert len(rows) >= int(1.0 / epoch) - 1  # and it used the budget rather than stopping early


def test_compare_prints_the_lectures_table_and_writes_csv_and_png(shapes, tmp_path):
    rows = compare_strategies(shapes, TINY, tmp_path / "cmp", epochs=2,
                              overrides={"data.image_size": 32, "data.workers": 0, "train.lr": 1e-2,
                                         "model.pretrained": False, "train.head_fit": "epochs",
                                         "train.head_epochs": 1},
                              scratch_backbone="small-cnn-cifar", scratch_overrides={"model.norm": "batch"})
    assert [r.strategy for r in rows] == ["scratch", "probe", "finetune"]
    assert rows[0].backbone == "small-cnn-cifar" and all(0 <= r.accuracy <= 1 and r.seconds > 0 for r in rows)
    table = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert [r["strategy"] for r in table] == ["scratch", "probe", "finetune"]
    Image.open(tmp_path / "cmp" / "comparison.png").load()


def test_cli_diagnose_stats_and_lr_find(shapes, tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    runner = CliRunner()
    result = runner.invoke(app, ["diagnose", "vgg-like", str(shapes), "--activation", "tanh", "--init", "normal:0.01",
                                 "--image-size", "32", "--batch-size", "16", "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    diagnosis = json.loads((tmp_path / "d" / "diagnosis.json").read_text())
    assert any("collapsing" in flag for flag in diagnosis["flags"]) and (tmp_path / "d" / "activations.png").is_file()
    result = runner.invoke(app, ["stats", str(shapes), "--size", "16", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0 and json.loads((tmp_path / "s" / "stats.json").read_text())["images"] == 72
    result = runner.invoke(app, ["lr-find", str(shapes), "-b", TINY, "--no-pretrained", "--strategy", "scratch",
                                 "--image-size", "32", "--steps", "30", "-o", str(tmp_path / "l")])
    assert result.exit_code == 0, result.output
    assert "suggested --lr" in result.output and (tmp_path / "l" / "lr_find.png").is_file()


def test_diagnose_a_trained_run(trained_run, shapes):
    result = diagnose(str(trained_run), str(shapes), batch_size=16)
    assert result.activations and result.gradients and result.nodes
    # a healthy trained network: a finite, non-zero gradient reaches every weight tensor, and none is flagged dead
    assert all(math.isfinite(row.grad_norm) and row.grad_norm > 0 for row in result.gradients)
    assert not any("no gradient" in flag for row in result.gradients for flag in row.flags)


def test_gradient_flow_flags_layers_a_collapsed_init_cuts_off():
    net, _ = create_lab_net("vgg-like", ArchOptions(vgg_stages="2x8"))
    head = nn.Linear(8, 3)
    nn.init.zeros_(head.weight)  # a zero head passes no gradient back: every layer below it is cut off
    rows = gradient_flow(nn.Sequential(net, head), torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]),
                         lambda params: torch.optim.SGD(params, lr=1e-3))
    below, top = rows[:-1], rows[-1]
    assert below and all(row.grad_norm == 0 and "no gradient reaches this layer" in row.flags for row in below)
    assert top.name == "1.weight" and top.grad_norm > 0 and "no gradient reaches this layer" not in top.flags
