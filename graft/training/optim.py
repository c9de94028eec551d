"""Optimiser and learning-rate schedule (warm-up, then cosine) from the config's parameter groups."""

from __future__ import annotations

import math

import torch

from graft.config import FitConfig
from graft.training.state import TrainState

__all__ = ["create_optimizer", "create_scheduler"]


def create_optimizer(groups: list[dict], config: FitConfig) -> torch.optim.Optimizer:
    train = config.train
    factories = {
        "adamw": lambda: torch.optim.AdamW(groups, lr=train.lr),
        "sgd": lambda: torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True),
    }
    return factories[train.optimizer]()


def create_scheduler(optimizer, total_steps: int, warmup_fraction: float, state: TrainState | None = None):
    """Linear warm-up, then cosine decay to zero, stepped per batch, times ``state.lr_scale`` (halved after a
    non-finite loss)."""
    horizon = {"steps": total_steps}  # shortened by a time-budget re-plan

    def factor(step: int) -> float:
        scale = state.lr_scale if state is not None else 1.0
        warmup = int(horizon["steps"] * warmup_fraction)
        if step < warmup:
            return scale * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, horizon["steps"] - warmup)
        return scale * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.horizon = horizon
    return scheduler
