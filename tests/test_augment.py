"""Training recipes (issue 14): timm augmentation modes, random erasing, mixup/cutmix with soft targets, LLRD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image
from synthetic import make_shapes
from torchvision import transforms

from graft.config import AUGMENTATIONS, load_config
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing
from graft.training import loop
from graft.training.fitting import fit
from graft.training.optim import create_optimizer, layer_decayed

PRE = Preprocessing((32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.9)


def _image() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    return transforms.functional.to_pil_image(torch.rand(3, 40, 56, generator=generator))


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_every_augment_mode_builds_a_training_transform_of_the_input_size(augment):
    transform = create_transform(PRE, train=True, augment=augment, hflip=True)
    out = transform(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    normalize = [t for t in transform.transforms if isinstance(t, transforms.Normalize)]
    assert torch.as_tensor(normalize[0].mean).tolist() == pytest.approx(list(PRE.mean))  # the backbone's statistics
    names = " ".join(type(t).__name__ for t in transform.transforms)
    policy = {"rand": "RandAugment", "auto": "AutoAugment", "trivial": "TrivialAugmentWide"}.get(augment)
    if policy:
        assert policy in names and "ColorJitter" not in names
    assert ("CenterCrop" in names) == (augment == "none")


def test_the_evaluation_transform_is_unchanged_by_the_training_options():
    plain = create_transform(PRE)
    assert [type(t).__name__ for t in plain.transforms] == ["CapAspect", "Resize", "CenterCrop", "ToTensor",
                                                            "Normalize"]


@pytest.mark.parametrize("augment", ["standard", "rand"])
def test_random_erasing_erases_with_probability_one(augment):
    torch.manual_seed(0)
    transform = create_transform(PRE, train=True, augment=augment, random_erasing=1.0)
    assert type(transform.transforms[-1]).__name__ == "RandomErasing"
    flat = Image.new("RGB", (32, 32), (128, 128, 128))
    out = transform(flat)
    assert out[0].std() > 0.1  # per-pixel noise in an erased rectangle of a flat image (channel 0: ~0.01 elsewhere)
    assert create_transform(PRE, train=True, augment="standard")(flat)[0].std() < 0.01  # nothing erased without it


def test_random_erasing_out_of_range_names_the_flag():
    with pytest.raises(GraftError, match="--random-erasing"):
        load_config(None, {"data.random_erasing": 1.5})


@pytest.mark.parametrize("augment", ["rand", "trivial", "auto", "light"])
def test_a_fit_runs_an_epoch_with_each_mode(shapes, tmp_path, augment):
    config = tiny_config(shapes, tmp_path / "run", **{"data.augment": augment, "train.strategy": "finetune",
                                                        "train.epochs": 1, "train.head_epochs": 0,
                                                        "train.limit_batches": 2,
                                                        "data.random_erasing": 0.25})
    result = fit(config, verbose=False)
    assert len(result.history) == 1 and result.history[0]["train_loss"] > 0


def _recording_loss(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = loop.compute_loss

    def record(logits, labels, **options):
        seen.append(labels.detach().clone())
        return real(logits, labels, **options)

    monkeypatch.setattr(loop, "compute_loss", record)
    return seen


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_train_against_soft_targets(shapes, tmp_path, monkeypatch, mixup, cutmix):
    seen = _recording_loss(monkeypatch)
    config = tiny_config(shapes, tmp_path / "run", **{"train.strategy": "finetune", "train.epochs": 1,
                                                        "train.head_epochs": 0, "train.limit_batches": 2,
                                                        "train.mixup": mixup,
                                                        "train.cutmix": cutmix, "train.label_smoothing": 0.1})
    fit(config, verbose=False)
    assert len(seen) == 2
    for targets in seen:
        assert targets.dtype == torch.float32 and targets.shape == (16, 3)
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
        assert targets.min() >= 0.1 / 3 - 1e-6  # timm smooths the mixed targets with --label-smoothing
    assert any((t > 0.1 / 3 + 1e-4).sum(1).gt(1).any() for t in seen)  # some images really mix two classes


def test_an_odd_batch_trains_unmixed_with_soft_targets(tmp_path, monkeypatch):
    data = make_shapes(tmp_path / "odd", splits={"train": 5, "val": 2}, seed=3)  # 15 images: one odd batch
    seen = _recording_loss(monkeypatch)
    config = tiny_config(data, tmp_path / "run", **{"train.strategy": "finetune", "train.epochs": 1,
                                                    "train.head_epochs": 0, "train.mixup": 0.4,
                                                    "train.label_smoothing": 0.0})
    fit(config, verbose=False)
    assert [tuple(t.shape) for t in seen] == [(15, 3)]
    assert set(seen[0].flatten().tolist()) == {0.0, 1.0}  # one-hot: not mixed (timm needs an even batch)


def test_soft_targets_with_class_weights_reduce_to_weighted_cross_entropy_when_one_hot():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 2, 1, 2])
    weights = torch.tensor([0.5, 2.0, 1.5])
    soft = loop.compute_loss(logits, F.one_hot(labels, 3).float(), class_weights=weights)
    hard = loop.compute_loss(logits, labels, class_weights=weights)
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(loop.compute_loss(logits, F.one_hot(labels, 3).float()), F.cross_entropy(logits, labels))


def test_layer_wise_decay_gives_the_top_stage_the_head_rate_and_each_lower_one_less():
    groups = [{"name": "head", "lr": 1e-2}, {"name": "head.no_decay", "lr": 1e-2}] + [
        {"name": f"trunk.{depth}{suffix}", "lr": 123.0} for depth in range(3) for suffix in ("", ".no_decay")]
    decayed = {g["name"]: g["lr"] for g in layer_decayed(groups, 0.5)}
    assert decayed == pytest.approx({"head": 1e-2, "head.no_decay": 1e-2, "trunk.2": 1e-2, "trunk.2.no_decay": 1e-2,
                                     "trunk.1": 5e-3, "trunk.1.no_decay": 5e-3, "trunk.0": 2.5e-3,
                                     "trunk.0.no_decay": 2.5e-3})
    assert groups[2]["lr"] == 123.0  # the recipe's groups are not modified in place


def test_lr_decay_reaches_the_optimiser_and_is_off_by_default():
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    groups = [{"name": "head", "params": [params[0]], "lr": 0.1}, {"name": "trunk.0", "params": [params[1]], "lr": 0.1},
              {"name": "trunk.1", "params": [params[2]], "lr": 0.1}]
    default = create_optimizer([dict(g) for g in groups], load_config(None, {}))
    assert [g["lr"] for g in default.param_groups] == [0.1, 0.1, 0.1]
    decayed = create_optimizer([dict(g) for g in groups], load_config(None, {"train.lr_decay": 0.7}))
    assert [g["lr"] for g in decayed.param_groups] == pytest.approx([0.1, 0.07, 0.1])
