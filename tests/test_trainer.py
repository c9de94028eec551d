import csv
import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from graft.errors import GraftError
from graft.models.grafted import create_model
from graft.models.run_folder import load
from graft.training import recipes
from graft.training.fitting import fit
from graft.training.state import Hooks
from graft.utils.outputs import MANIFEST


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("strategy, overrides", [
    ("probe", {"model.pool": "avgmax", "train.epochs": 12, "train.lr": 0.03, "train.head_fit": "epochs"}),
    ("probe", {"model.pool": "avgmax"}),
    ("finetune", {"train.epochs": 12}),
    ("scratch", {"train.epochs": 5}),
])
def test_each_strategy_learns_the_synthetic_task(shapes, tmp_path, strategy, overrides):
    result = fit(tiny_config(shapes, tmp_path / strategy, **{"train.strategy": strategy, **overrides}), verbose=False)
    assert result.metrics["val"]["accuracy"] >= 0.6, result.metrics["val"]["accuracy"]  # chance is 1/3


def test_probe_leaves_every_trunk_tensor_bit_identical(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "probe", **{"train.strategy": "probe", "train.epochs": 2,
                                                         "data.augment": "standard", "model.dropout": 0.2})
    torch.manual_seed(config.train.seed)
    before, _ = create_model(config, ["circle", "square", "triangle"])
    result = fit(config, verbose=False)
    after = result.model.state_dict()
    trunk_keys = [k for k in after if k.startswith("trunk.")]
    assert any("running_mean" in k for k in trunk_keys) and any("num_batches_tracked" in k for k in trunk_keys)
    for key in trunk_keys:
        assert torch.equal(before.state_dict()[key], after[key]), key
    assert not torch.equal(before.state_dict()["head.1.weight"], after["head.1.weight"])


def test_frozen_bn_statistics_do_not_move_during_finetune(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "ft", **{"train.strategy": "finetune", "train.epochs": 1,
                                                      "train.bn_stats": "frozen"})
    torch.manual_seed(config.train.seed)
    before, _ = create_model(config, ["circle", "square", "triangle"])
    after = fit(config, verbose=False).model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(before.state_dict()[k], after[k]) for k in stats)
    assert not torch.equal(before.state_dict()["trunk.net.layer4.0.conv1.weight"],
                           after["trunk.net.layer4.0.conv1.weight"])


def test_unfreeze_last_stage_trains_only_that_stage(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "last1", **{"train.unfreeze": "last:1", "train.epochs": 1})
    torch.manual_seed(config.train.seed)
    before = create_model(config, ["circle", "square", "triangle"])[0].state_dict()
    after = fit(config, verbose=False).model.state_dict()
    changed = {k.split(".")[2] for k in after if k.startswith("trunk.") and not torch.equal(before[k], after[k])}
    assert changed == {"layer4"}


def test_run_folder_holds_everything_predict_needs(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"model.safetensors", "graft.json", "metrics.json", "history.csv", "skipped_files.txt",
            "data_report.json"} <= names
    assert "checkpoint.safetensors" not in names and not any(n.startswith(".") for n in names - {MANIFEST})
    card = json.loads((trained_run / "graft.json").read_text())
    assert card["classes"] == ["circle", "square", "triangle"]
    assert card["preprocessing"]["input_size"] == [32, 32]
    assert card["backbone"] == "test_resnet" and card["cut_at"] == "pre_logits" and card["status"] == "complete"
    assert {"torch", "timm", "graft"} <= set(card["versions"])
    rows = list(csv.DictReader(open(trained_run / "history.csv")))
    assert [r["stage"] for r in rows] == ["head"] + ["finetune"] * 12
    assert {"train_loss", "val_acc", "images_per_s", "lr"} <= set(rows[0])


def test_save_load_predict_gives_identical_logits(trained_result, shapes):
    from graft.data.datasets import ImageDataset
    from graft.data.discovery import discover
    from graft.data.transforms import create_transform

    trained = trained_result.model.eval()  # the model fit held in memory and saved
    loaded = load(trained_result.run_dir)
    samples = discover(shapes).val[:8]
    batch = torch.stack([ImageDataset(samples, create_transform(loaded.preprocessing))[i][0] for i in range(8)])
    with torch.no_grad():
        expected, logits = trained(batch), loaded.eval()(batch)
    assert logits.shape == (8, 3)
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
    assert loaded.classes == trained.classes and loaded.preprocessing == trained.preprocessing
    state = _weights(trained_result.run_dir)
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    assert all(torch.equal(v.cpu(), loaded.state_dict()[k]) for k, v in trained.state_dict().items())


RESUME_CASES = {
    # two head-only epochs then fine-tuning: the interruption falls right after the stage boundary
    "head-epochs": ({"train.head_fit": "epochs", "train.head_epochs": 2, "train.patience": 2}, 3, 5),
    # the cached probe replaces stage 1 (LP-FT): the resumed run must not re-solve the head
    "lpft": ({"model.pretrained": True}, 2, 3),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_interrupted_run_resumes_to_the_same_weights(shapes, tmp_path, request, case):
    extra, stop_epoch, total_epochs = RESUME_CASES[case]
    overrides = {"train.strategy": "finetune", "train.epochs": 3, "data.augment": "standard", **extra}
    if case == "lpft":
        overrides["model.weights"] = str(request.getfixturevalue("pretrained_tiny"))
    straight = fit(tiny_config(shapes, tmp_path / "straight", **overrides), verbose=False)

    def stop(row):
        if row["epoch"] == stop_epoch:
            raise KeyboardInterrupt

    interrupted = tiny_config(shapes, tmp_path / "resumed", **overrides)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, hooks=Hooks(on_epoch_end=stop), verbose=False)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = fit(interrupted, resume=True, verbose=False)
    expected, actual = _weights(straight.run_dir), _weights(resumed.run_dir)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert len(list(csv.DictReader(open(tmp_path / "resumed" / "history.csv")))) == total_epochs


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, shapes):
    config = tiny_config(shapes, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftError, match="graft.json"):
        fit(config, resume=True, verbose=False)


def test_a_non_empty_output_folder_is_not_overwritten_by_accident(trained_run, shapes):
    with pytest.raises(GraftError, match="--resume.*--overwrite"):
        fit(tiny_config(shapes, trained_run), verbose=False)


def test_early_stopping_stops_and_restores_the_best_epoch(shapes, tmp_path):
    # a learning rate this high makes validation loss worse after the first epoch
    config = tiny_config(shapes, tmp_path / "early", **{"train.strategy": "scratch", "train.epochs": 20,
                                                         "train.patience": 2, "train.lr": 0.5,
                                                         "train.calibrate": False})  # its val loss is the epoch's
    result = fit(config, verbose=False)
    rows = list(csv.DictReader(open(result.run_dir / "history.csv")))
    assert len(rows) < 20
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert result.metrics["val"]["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-4)


def test_discriminative_learning_rates_decay_from_top_to_stem(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "x", **{"train.lr": 1e-2, "train.finetune_lr_ratio": 0.1,
                                                     "train.stem_lr_ratio": 0.1, "train.head_fit": "epochs"})
    model, _ = create_model(config, ["a", "b", "c"])
    stages = recipes.plan(config)
    assert [s.name for s in stages] == ["head", "finetune"]
    groups = {g["name"]: g["lr"] for g in recipes.configure(model, stages[1], config.train)}
    assert groups["head"] == pytest.approx(1e-3)
    assert groups["trunk.4"] == pytest.approx(1e-3)  # top stage: the fine-tuning rate
    assert groups["trunk.0"] == pytest.approx(1e-4)  # stem: x stem_lr_ratio
    assert groups["trunk.0"] < groups["trunk.2"] < groups["trunk.4"]
    assert all(g["weight_decay"] == 0 for g in recipes.configure(model, stages[1], config.train)
               if g["name"].endswith("no_decay"))


def test_cut_at_inner_node_and_mlp_head_train_and_reload(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "inner", **{"train.strategy": "probe", "train.epochs": 1,
                                                         "model.cut_at": "layer3", "model.head": "mlp:32"})
    result = fit(config, verbose=False)
    assert json.loads((result.run_dir / "graft.json").read_text())["feature_dim"] == 192
    reloaded = load(result.run_dir)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.model.eval()(x), reloaded(x))


def test_sgd_optimizer_and_limit_batches(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "sgd", **{"train.optimizer": "sgd", "train.limit_batches": 1,
                                                       "train.strategy": "scratch", "train.epochs": 1})
    result = fit(config, verbose=False)
    rows = list(csv.DictReader(open(result.run_dir / "history.csv")))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0


def test_cached_probe_solves_the_head_and_leaves_the_trunk_alone(shapes, tmp_path):
    config = tiny_config(shapes, tmp_path / "lbfgs", **{"train.strategy": "probe"})
    torch.manual_seed(config.train.seed)
    before = create_model(config, ["circle", "square", "triangle"])[0].state_dict()
    result = fit(config, verbose=False)
    after = result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("trunk."))
    grid = list(csv.DictReader(open(result.run_dir / "probe_grid.csv")))
    assert len(grid) == 9 and {"l2", "val_acc", "train_loss", "cv_acc", "cv_loss"} <= set(grid[0])
    assert result.metrics["val"]["accuracy"] >= 0.8 and result.metrics["epochs"] == 0
    from graft.evaluation.scoring import evaluate

    direct = evaluate(result.run_dir, shapes, split="val", device="cpu", output=tmp_path / "e")
    assert direct["accuracy"] == pytest.approx(result.metrics["val"]["accuracy"], abs=1 / 30 + 1e-6)  # fp16 cache


def test_finetune_starts_from_the_solved_probe(shapes, tmp_path, pretrained_tiny):
    config = tiny_config(shapes, tmp_path / "lpft", **{"train.strategy": "finetune", "model.pretrained": True,
                                                        "model.weights": str(pretrained_tiny), "train.epochs": 2})
    result = fit(config, verbose=False)
    rows = list(csv.DictReader(open(result.run_dir / "history.csv")))
    assert [r["stage"] for r in rows] == ["finetune", "finetune"]  # no head-only epochs: the probe replaced them
    assert (result.run_dir / "probe_grid.csv").is_file()
    assert float(rows[0]["train_acc"]) >= 0.8  # the head starts solved, not random
    assert json.loads((result.run_dir / "graft.json").read_text())["weights"].startswith("file:")


def test_unreadable_files_are_skipped_and_listed_in_the_run_folder(tmp_path):
    from synthetic import make_shapes

    data = make_shapes(tmp_path / "data", splits={"train": 8, "val": 3}, seed=3)
    (data / "train" / "circle" / "zero.png").write_bytes(b"")
    (data / "train" / "square" / "text.jpg").write_text("not an image")
    result = fit(tiny_config(data, tmp_path / "run", **{"train.strategy": "probe"}), verbose=False)
    listed = (result.run_dir / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in listed) == ["text.jpg", "zero.png"]
    assert all("not a readable image" in line or "empty file" in line for line in listed)
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["counts"]["train"] == {"circle": 8, "square": 8, "triangle": 8}


@pytest.mark.parametrize("overrides, images, expected", [
    ({}, 500, "frozen"),  # small data: batch statistics are noise
    ({}, 5000, "frozen"),  # fine-tuning from the solved probe: batch statistics would undo it
    ({"train.head_fit": "epochs"}, 5000, "update"),
    ({"train.head_fit": "epochs"}, 500, "frozen"),
    ({"train.strategy": "scratch"}, 500, "update"),  # a random trunk has nothing worth keeping
    ({"train.bn_stats": "update"}, 500, "update"),
])
def test_auto_batch_norm_statistics(overrides, images, expected):
    from graft.config import load_config
    from graft.training.setup import resolve_bn_stats

    assert resolve_bn_stats(load_config(None, {"train.strategy": "finetune", **overrides}), images) == expected
