import csv
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from synthetic import make_shapes
from torch import nn
from typer.testing import CliRunner

from graft.cli.shared import app
from graft.models.backbones.base import Backbone, Preprocessing
from graft.models.backbones.registry import register_source
from graft.probing.advice import advise, combine_features
from graft.probing.extraction import FeatureSet
from graft.probing.leaderboard import knn_accuracy, probe_backbones
from graft.training.fitting import fit


class ToyNet(nn.Module):
    """Three 1x1-conv 'stages' that pass the colour through unchanged; ``kill_top`` zeroes the last one, so only
    the earlier stages' features separate the (colour-coded) classes."""

    def __init__(self, kill_top: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.stage1, self.stage2, self.stage3 = (nn.Conv2d(6, 6, 1) for _ in range(3))
        with torch.no_grad():
            self.stem.weight.copy_(torch.cat([torch.eye(3), -torch.eye(3)])[:, :, None, None])
            for stage in (self.stage1, self.stage2, self.stage3):
                stage.weight.copy_(torch.eye(6)[:, :, None, None])
                stage.bias.zero_()
            self.stem.bias.zero_()
            if kill_top:
                self.stage3.weight.zero_()
        self.num_features = 6
        self.feature_info = [{"module": f"stage{i}"} for i in (1, 2, 3)]

    def forward_features(self, x):
        return self.stage3(self.stage2(self.stage1(self.stem(x))))

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))

    def reset_classifier(self, num_classes=0, global_pool=None):
        pass

    def group_matcher(self, coarse=False):
        return {"stem": r"^stem", "blocks": r"^stage(\d+)"}


class ToySource:
    def create(self, name, pretrained, weights_file):
        return Backbone(name, ToyNet(kill_top=name == "killtop"), Preprocessing((16, 16), (0.5,) * 3, (0.5,) * 3),
                        "toy")


register_source("toy", ToySource())


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("few"), splits={"train": 12, "val": 6}, seed=7, size=16)


def test_advise_probes_an_earlier_stage_when_only_mid_level_features_separate(few):
    advice = advise(few, "toy:killtop", workers=0, device="cpu")
    by_node = {s["node"]: s for s in advice.stages}
    assert by_node["pre_logits"]["probe_accuracy"] < 0.5 and by_node["stage2"]["probe_accuracy"] > 0.7
    assert advice.recommendation == "probe-earlier"
    cut_at = advice.overrides["model.cut_at"]  # stage1, or a combination with it (one val image apart here)
    assert advice.overrides == {"train.strategy": "probe", "model.cut_at": cut_at} and "stage1" in cut_at
    assert by_node[cut_at]["probe_accuracy"] == max(s["probe_accuracy"] for s in advice.stages)
    assert f"--cut-at {cut_at}" in advice.command and "12 training images per class" in advice.reason


def test_advise_also_probes_several_stages_at_once(few):
    advice = advise(few, "toy:killtop", workers=0, device="cpu")
    by_node = {s["node"]: s for s in advice.stages}
    assert by_node["stage2,pre_logits"]["width"] == 12 and by_node["stage1,stage2,pre_logits"]["width"] == 18
    assert by_node["stage2,pre_logits"]["probe_accuracy"] > 0.7  # the dead top adds nothing, stage2 separates


def test_combine_features_concatenates_every_split_and_view_in_order():
    def part(node, value, width):
        block = np.full((4, width), value, dtype=np.float16)
        labels = {"train": np.zeros(4), "val": np.zeros(2)}
        return FeatureSet(node, ["a", "b"], {"train": block, "val": block[:2]}, labels,
                          {"train": list("wxyz"), "val": list("wx")}, [block + 1], {"images_per_s": 9.0})

    joined = combine_features([part("blocks.4", 1, 2), part("pre_logits", 5, 3)])
    assert joined.node == "blocks.4,pre_logits" and joined.dim == 5 and joined.stats == {}
    assert joined.features["train"][0].tolist() == [1, 1, 5, 5, 5] and joined.features["val"].shape == (2, 5)
    assert joined.augmented[0][0].tolist() == [2, 2, 6, 6, 6] and joined.paths["val"] == ["w", "x"]


def test_cuts_are_ranked_on_a_stratified_sample_of_the_training_images():
    from graft.probing.advice import _ranking_subset

    labels = np.array([0] * 500 + [1] * 30 + [2] * 250)
    keep = _ranking_subset(labels, 200, seed=0)
    assert np.bincount(labels[keep]).tolist() == [200, 30, 200] and len(set(keep)) == len(keep)
    assert np.array_equal(keep, _ranking_subset(labels, 200, seed=0))  # seeded
    assert not np.array_equal(keep, _ranking_subset(labels, 200, seed=1))
    assert _ranking_subset(labels, 500, seed=0) is None  # small enough: every image


def test_advise_fine_tunes_from_the_better_cut_on_a_different_domain(tmp_path):
    data = make_shapes(tmp_path, splits={"train": 110, "val": 4}, seed=2, size=16)
    advice = advise(data, "toy:killtop", workers=0, device="cpu")
    assert advice.recommendation == "finetune-all"
    assert advice.overrides == {"train.strategy": "finetune", "train.unfreeze": "all", "model.cut_at": "stage1"}


def test_advise_probes_the_top_layer_when_it_separates(few):
    advice = advise(few, "toy:keep", workers=0, device="cpu")
    assert advice.recommendation == "probe-top" and advice.overrides == {"train.strategy": "probe"}


def test_advise_fine_tunes_the_whole_trunk_with_more_data(tmp_path):
    data = make_shapes(tmp_path, splits={"train": 110, "val": 4}, seed=2, size=16)
    advice = advise(data, "toy:keep", workers=0, device="cpu")
    assert advice.recommendation == "finetune-all"
    assert advice.overrides == {"train.strategy": "finetune", "train.unfreeze": "all"}  # the top's cut: no cut_at


def test_strategy_auto_follows_the_advice(few, tmp_path):
    config = tiny_config(few, tmp_path / "auto", **{"train.strategy": "auto", "model.backbone": "toy:killtop",
                                                     "model.pretrained": True, "data.image_size": None})
    result = fit(config, verbose=False)
    card = json.loads((result.run_dir / "graft.json").read_text())
    assert card["strategy"] == "probe" and card["cut_at"].startswith("stage1")
    assert result.metrics["val"]["accuracy"] > 0.7  # chance: 1/3, the top layer's probe: 1/3


def test_knn_accuracy_on_separable_and_random_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    separable = torch.nn.functional.one_hot(labels, 3).float() * 5 + torch.randn(60, 3, generator=generator) * 0.1
    assert knn_accuracy(separable[:45], labels[:45], separable[45:], labels[45:]) == 1.0
    noise = torch.randn(60, 3, generator=generator)
    assert knn_accuracy(noise[:45], labels[:45], noise[45:], labels[45:]) < 0.8


def test_leaderboard_rows_csv_and_plot(few, tmp_path):
    rows = probe_backbones(few, ["toy:killtop", "toy:keep"], stages="all", workers=0, device="cpu",
                           output=tmp_path / "board")
    assert len(rows) == 8 and rows[0].val_accuracy >= rows[-1].val_accuracy
    assert {(r.backbone, r.node) for r in rows if r.val_accuracy < 0.5} == {("toy:killtop", "stage3"),
                                                                            ("toy:killtop", "pre_logits")}
    table = list(csv.DictReader(open(tmp_path / "board" / "leaderboard.csv")))
    assert len(table) == 8 and {"backbone", "node", "width", "val_accuracy", "inference_ms"} <= set(table[0])
    with Image.open(tmp_path / "board" / "leaderboard.png") as image:
        image.load()
        assert image.width > 100


runner = CliRunner()


def test_cli_features_probe_and_advise(few, tmp_path):
    cache = tmp_path / "cache"
    first = runner.invoke(app, ["features", str(few), "-b", "test_resnet", "--no-pretrained", "--cut-at",
                                "layer2,layer3", "--image-size", "32", "--workers", "0", "--cache", str(cache)])
    assert first.exit_code == 0, first.output
    assert "54 images extracted" in first.output and "layer3" in first.output
    second = runner.invoke(app, ["features", str(few), "-b", "test_resnet", "--no-pretrained", "--cut-at",
                                 "layer2,layer3", "--image-size", "32", "--workers", "0", "--cache", str(cache),
                                 "-o", str(tmp_path / "npz")])
    assert "0 images extracted" in second.output and "54 from the cache" in second.output
    exported = np.load(tmp_path / "npz" / "layer3.npz")  # allow_pickle=False: plain arrays only
    assert exported["train_features"].shape == (36, 192) and exported["val_labels"].tolist() == [0] * 6 + [1] * 6 + [
        2] * 6
    assert exported["classes"].tolist() == ["circle", "square", "triangle"]
    assert exported["val_paths"][0].endswith("val/circle/000.png")
    board = runner.invoke(app, ["probe", str(few), "--backbones", "toy:keep,toy:killtop", "--workers", "0",
                                "-o", str(tmp_path / "board"), "--device", "cpu"])
    assert board.exit_code == 0, board.output
    assert "leaderboard" in board.output and (tmp_path / "board" / "leaderboard.png").is_file()
    advice = runner.invoke(app, ["advise", str(few), "-b", "toy:killtop", "--workers", "0", "--device", "cpu"])
    assert advice.exit_code == 0, advice.output
    assert "probe-earlier" in advice.output and "graft fit" in advice.output
    bad = runner.invoke(app, ["probe", str(few), "--backbones", "toy:keep", "--stages", "some"])
    assert bad.exit_code == 2 and "stages 'some'" in bad.output
