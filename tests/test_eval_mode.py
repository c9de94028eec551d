"""graft.utils.modes.evaluating: eval mode for a block, every submodule's own flag back afterwards."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from graft.utils.modes import evaluating

PACKAGE = Path(__file__).resolve().parent.parent / "graft"


def _mixed() -> nn.Module:
    """A training model holding a frozen batch norm kept in eval and an inner block left in eval by its owner."""
    frozen = nn.BatchNorm2d(3)
    frozen.requires_grad_(False)
    inner = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), frozen, inner, nn.BatchNorm2d(3)).train()
    frozen.eval()
    inner.eval()  # the inner block and both its children
    return model


def test_every_submodule_gets_its_own_flag_back_also_after_an_exception():
    model = _mixed()
    before = {name: part.training for name, part in model.named_modules()}
    assert before == {"": True, "0": True, "1": False, "2": False, "2.0": False, "2.1": False, "3": True}
    with pytest.raises(ValueError), evaluating(model):
        assert not any(part.training for part in model.modules())
        raise ValueError("inside")
    assert {name: part.training for name, part in model.named_modules()} == before


def test_the_frozen_norm_keeps_its_statistics_after_the_block():
    model = _mixed()
    with evaluating(model):
        model(torch.randn(4, 3, 2, 2))
    frozen = model[1]
    model(torch.randn(4, 3, 2, 2) * 5 + 3)  # a training step on shifted data
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and torch.equal(frozen.running_var, torch.ones(3))
    assert not torch.equal(model[3].running_mean, torch.zeros(3))  # the trainable norm did move


def test_nested_blocks_restore_in_order():
    model = _mixed()
    with evaluating(model):
        with evaluating(model[2]):
            pass
        assert not model[2].training and not model.training
    assert model.training and not model[1].training


def test_no_module_saves_and_restores_the_training_flag_by_hand():
    """One mechanism: a new ``was_training = m.training`` block would bypass ``evaluating``."""
    pattern = re.compile(r"=\s*[A-Za-z_][\w.]*\.training\b")
    by_hand = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert by_hand == []
