"""Never worse than the probe: the probe is candidate epoch 0, auto decides from evidence, and honest labels."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from synthetic import make_shapes

import graft.probing.advice
from graft.data.discovery import discover
from graft.errors import GraftError
from graft.training.fitting import fit
from graft.training.recipes import Stage
from graft.training.selection import PROBE
from graft.training.stages import _budget, _stop_below_probe, beats_probe
from graft.training.state import TrainState


def _wrecking(shapes, output, weights, **overrides):
    """A fine-tune that can only hurt: AdamW at a rate that throws every trunk weight ~1 per step (finite, but the
    pretrained features are gone)."""
    return tiny_config(shapes, output, **{"train.strategy": "finetune", "model.pretrained": True,
                                          "model.weights": str(weights), "train.epochs": 2, "train.lr": 10.0,
                                          "train.finetune_lr_ratio": 1.0, "train.label_smoothing": 0.0,
                                          **overrides})


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_beating_the_probe_is_higher_accuracy_then_lower_loss():
    probe = {"val_acc": 0.9, "val_loss": 0.30}
    assert beats_probe({"val_acc": 0.91, "val_loss": 0.9}, probe)
    assert beats_probe({"val_acc": 0.9, "val_loss": 0.29}, probe)
    assert not beats_probe({"val_acc": 0.9, "val_loss": 0.30}, probe)  # a tie keeps the probe
    assert not beats_probe({"val_acc": 0.89, "val_loss": 0.01}, probe)


def test_probe_patience_stops_after_that_many_epochs_neither_above_the_probe_nor_climbing():
    runtime, said = SimpleNamespace(log=lambda message: said.append(message)), []
    state = TrainState(probe={"val_acc": 0.9, "val_loss": 0.3})
    rows = [{"stage": "finetune", "val_acc": acc, "val_loss": 0.5} for acc in (0.95, 0.8, 0.8)]
    for row in rows:
        _stop_below_probe(state, row, 2, runtime)
        assert not state.stage_done or row is rows[2]
        state.history.append(row)
    assert [r["beats_probe"] for r in rows] == [True, False, False] and state.stage_done
    assert len(said) == 1 and "neither beaten the probe's val accuracy 0.9000 nor improved" in said[0]
    assert "for 2 epoch(s)" in said[0]
    climbing = TrainState(probe=state.probe)  # below the probe but improving each epoch: it goes on
    for epoch, acc in enumerate((0.85, 0.87, 0.88, 0.88, 0.88), start=1):
        row = {"stage": "finetune", "val_acc": acc, "val_loss": 0.5}
        _stop_below_probe(climbing, row, 2, runtime)
        assert climbing.stage_done == (epoch == 5), epoch
        climbing.history.append(row)
    off = TrainState(probe=state.probe)
    _stop_below_probe(off, {"stage": "finetune", "val_acc": 0.1, "val_loss": 9.0}, 0, runtime)
    assert not off.stage_done


def test_auto_without_a_budget_spends_no_more_than_the_default_fine_tune(plain, tmp_path):
    config = tiny_config(plain, tmp_path / "x")
    stage = Stage("finetune", 8, 1e-3, -1)
    # the default fine-tune: the probe's 20 s, then 8 epochs of 50 s; advise spent 100 s of that already
    assert _budget(stage, TrainState(probe={"seconds": 20.0}, overhead=100.0), 50.0, config) == 20 + 8 * 50 - 100
    assert _budget(stage, TrainState(probe={"seconds": 20.0}), 50.0, config) == 0  # not auto: no budget
    config.train.time_budget = 90.0
    assert _budget(stage, TrainState(overhead=100.0), 50.0, config) == 90.0  # the user's budget wins


def test_a_fine_tune_that_only_hurts_keeps_the_probe(shapes, tmp_path, pretrained_tiny, capsys):
    result = fit(_wrecking(shapes, tmp_path / "ft", pretrained_tiny), verbose=True)
    selection = result.metrics["selection"]
    assert selection["kept"] == "probe"
    assert "fine-tuning did not improve on the probe: kept the probe, saved" in capsys.readouterr().err
    assert "with --strategy probe" in selection["why"]
    probe, finetune = selection["candidates"]
    assert probe["name"] == "probe" and finetune["epochs"] == 2 and finetune["val_acc"] < probe["val_acc"]
    assert result.metrics["val"]["accuracy"] == pytest.approx(probe["val_acc"])
    assert not (result.run_dir / PROBE).exists()
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["selection"]["kept"] == "probe" and "probe or fine-tune" in " ".join(saved["selected_on_validation"])
    _everything_says_the_probe_was_kept(result.run_dir)
    reference = fit(tiny_config(shapes, tmp_path / "probe", **{"train.strategy": "probe", "model.pretrained": True,
                                                               "model.weights": str(pretrained_tiny)}),
                    verbose=False)
    images = torch.rand(6, 3, 32, 32)
    assert torch.allclose(_logits(result.model, images), _logits(reference.model, images), atol=1e-5)
    from graft import load

    assert torch.allclose(_logits(load(result.run_dir, "cpu"), images), _logits(reference.model, images), atol=1e-5)


def test_probe_l2_is_cross_validated_and_labelled(shapes, tmp_path, pretrained_tiny):
    result = fit(tiny_config(shapes, tmp_path / "p", **{"train.strategy": "probe", "model.pretrained": True,
                                                        "model.weights": str(pretrained_tiny)}), verbose=False)
    assert result.metrics["features"]["probe_l2_selection"] == "cv-5"
    assert result.metrics["selected_on_validation"] == []
    assert result.metrics["headline"] == {"split": "val", "accuracy": result.metrics["val"]["accuracy"],
                                          "note": "nothing selected on val"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("plain"), per_class=30, seed=2)


def test_test_fraction_carves_a_stratified_disjoint_seeded_split(plain, shapes, tmp_path):
    splits = discover(plain, 0.2, seed=0, test_fraction=0.2)
    assert splits.counts("test") == {"circle": 6, "square": 6, "triangle": 6}
    assert splits.counts("val") == {"circle": 6, "square": 6, "triangle": 6}
    names = [{path for path, _ in getattr(splits, s)} for s in ("train", "val", "test")]
    assert sum(map(len, names)) == 90 and len(set.union(*names)) == 90  # disjoint, nothing lost
    assert discover(plain, 0.2, seed=0, test_fraction=0.2).test == splits.test  # seeded
    assert discover(plain, 0.2, seed=1, test_fraction=0.2).test != splits.test
    with_test = make_shapes(tmp_path / "t", splits={"train": 4, "val": 2, "test": 2})
    with pytest.raises(GraftError, match="already has a test split.*drop --test-fraction"):
        discover(with_test, 0.2, 0, test_fraction=0.1)


def test_auto_trials_fine_tuning_against_the_probe_and_reports(plain, tmp_path, pretrained_tiny, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(graft.probing.advice, "LITTLE_DATA", 5)  # 18 images a class counts as "more data" here
    config = _wrecking(plain, tmp_path / "auto", pretrained_tiny, **{"train.strategy": "auto", "train.epochs": 6,
                                                                     "data.test_fraction": 0.2,
                                                                     "train.time_budget": 600.0})
    result = fit(config, verbose=True)
    err = capsys.readouterr().err
    report = result.metrics["auto"]
    assert report["advice"].startswith("finetune") and report["chose"] == "probe"
    assert [row["candidate"] for row in report["tried"]] == ["per-stage probes (advise)", "probe", "finetune"]
    assert all(row["seconds"] is not None and row["seconds"] >= 0 for row in report["tried"])
    assert report["tried"][2]["epochs"] == 2  # stopped after 2 epochs below the probe, not the 6 planned
    assert "within 600s" in err  # without a budget, advise's seconds would come out of the trial (tested above)
    assert "fine-tuning has neither beaten the probe" in err and "auto chose probe" in err
    assert result.metrics["headline"]["split"] == "test" and result.metrics["test"]["images"] == 18
    assert "strategy (auto)" in result.metrics["selected_on_validation"]


def test_advise_defaults_to_the_config_backbone(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from graft.cli import app
    from graft.config import ModelConfig

    seen = {}

    def fake_advise(data, backbone, *args, **kwargs):
        seen["backbone"] = backbone
        raise GraftError("stop here")

    monkeypatch.setattr(graft.probing.advice, "advise", fake_advise)
    result = CliRunner().invoke(app, ["advise", str(tmp_path)])
    assert seen == {"backbone": ModelConfig.backbone} and "stop here" in result.output + (result.stderr or "")


def _everything_says_the_probe_was_kept(run_dir):
    """graft.json, the served page's facts, the report and the model card describe the model that was saved."""
    from graft.deploy.model_card import hf_model_card
    from graft.deploy.page import run_facts
    from graft.evaluation.report import _training_choices
    from graft.models.run_folder import read_card

    card = read_card(run_dir)
    assert card["strategy"] == "finetune" and card["kept"] == "probe"
    assert run_facts(run_dir)["strategy"].startswith("probe (--strategy finetune fine-tuned, did not beat the probe")
    assert "the saved model is the probe" in _training_choices([run_dir])
    text = hf_model_card(run_dir, card)
    assert "(strategy: probe (--strategy finetune" in text and "strategy `finetune`" not in text
    assert "val split (" in text and "used for model selection" in text and "optimistic" in text
    assert "held-out split" not in text
