"""The training maths, against hand calculations: the warm-up + cosine schedule, SGD with Nesterov momentum, and
gradient accumulation (K micro-batches of B/K equal one step on B for a network without batch norm)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from graft.data.images import load_image
from graft.training.loop import train_epoch
from graft.training.optim import create_optimizer, create_scheduler
from graft.utils.runtime import Runtime


def _learning_rates(total: int, warmup_fraction: float) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = create_scheduler(optimizer, total, warmup_fraction)
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warm_up_then_cosine_to_zero_by_hand():
    rates = _learning_rates(100, 0.1)  # 10 warm-up steps, then 90 of cosine
    assert rates[0] == pytest.approx(1 / 11) and rates[9] == pytest.approx(10 / 11)  # linear: (step+1)/(warmup+1)
    assert rates[10] == pytest.approx(1.0)  # the peak, at the end of the warm-up
    assert rates[55] == pytest.approx(0.5)  # half-way through the cosine: cos(pi/2) = 0
    assert rates[10 + 30] == pytest.approx(0.75)  # a third of the way: (1 + cos(pi/3)) / 2
    assert rates[100] == pytest.approx(0.0, abs=1e-12)  # annealed to zero at the last step
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # rises through the warm-up
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # never rises again


def test_no_warm_up_starts_at_the_peak():
    rates = _learning_rates(8, 0.0)
    assert rates[0] == pytest.approx(1.0) and rates[4] == pytest.approx(0.5)


def test_sgd_is_nesterov_momentum_as_written_by_hand(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "run", **{"train.optimizer": "sgd", "train.lr": 0.1,
                                                        "train.weight_decay": 0.0})
    momentum = config.train.momentum
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = create_optimizer([{"params": [weight], "lr": 0.1, "weight_decay": 0.0}], config)
    expected, buffer = torch.tensor([1.0, -2.0]), torch.zeros(2)
    for _ in range(3):  # loss = sum(w^2): gradient 2w
        optimizer.zero_grad()
        (weight ** 2).sum().backward()
        optimizer.step()
        gradient = 2 * expected
        buffer = momentum * buffer + gradient if buffer.any() else gradient.clone()
        expected = expected - 0.1 * (gradient + momentum * buffer)  # Nesterov: look ahead along the buffer
    torch.testing.assert_close(weight.detach(), expected)
    assert momentum > 0 and optimizer.defaults["nesterov"]


def test_k_micro_batches_equal_one_step_on_the_whole_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))  # no batch norm
    images, labels = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    by_hand = copy.deepcopy(net)
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.5)
    F.cross_entropy(by_hand(images), labels).backward()  # one ordinary step on all 8 images
    optimizer.step()
    runtime = Runtime(torch.device("cpu"), None, False, verbose=False)
    for micro_batches in (1, 2, 4):
        model = copy.deepcopy(net)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        row = train_epoch(model, [(images, labels)], optimizer, scheduler, runtime, micro_batches=micro_batches)
        for ours, theirs in zip(model.parameters(), by_hand.parameters()):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        assert row["train_loss"] == pytest.approx(F.cross_entropy(net(images), labels).item(), rel=1e-5)
    assert not math.isclose(by_hand[1].weight.sum().item(), net[1].weight.sum().item())  # the step moved weights


def test_a_fine_tuned_model_is_temperature_scaled_on_validation(shapes, tmp_path):
    """The same seeded fine-tune with and without --calibrate: the calibrated model's logits are the plain one's
    divided by T, and T is the validation log-loss minimiser that scipy finds on the plain model's logits."""
    from scipy.optimize import minimize_scalar

    from graft.data.discovery import discover
    from graft.training.fitting import fit

    overrides = {"train.strategy": "finetune", "train.epochs": 2}
    plain = fit(tiny_config(shapes, tmp_path / "plain", **overrides, **{"train.calibrate": False}), verbose=False)
    scaled = fit(tiny_config(shapes, tmp_path / "scaled", **overrides), verbose=False)
    if scaled.metrics.get("kept") == "probe":
        pytest.skip("the probe won this seed's comparison: its calibration has its own test")
    val = discover(shapes, seed=0).val
    images = torch.stack([plain.model.transform(load_image(path)) for path, _ in val])
    labels = torch.tensor([label for _, label in val])
    with torch.no_grad():
        before, after = plain.model.eval()(images).double(), scaled.model.eval()(images).double()
    theirs = minimize_scalar(lambda t: F.cross_entropy(before / t, labels).item(), bounds=(0.05, 20), method="bounded",
                             options={"xatol": 1e-7}).x
    temperature = scaled.metrics["temperature"]
    assert temperature == pytest.approx(theirs, rel=2e-3)
    torch.testing.assert_close(after, before / temperature, atol=1e-4, rtol=1e-4)
    assert "temperature (calibration; accuracy unchanged)" in scaled.metrics["selected_on_validation"]
    assert scaled.metrics["val"]["accuracy"] == plain.metrics["val"]["accuracy"]
    assert scaled.metrics["val"]["loss"] <= plain.metrics["val"]["loss"] + 1e-6
