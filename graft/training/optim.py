"""Optimiser and learning-rate schedule (warm-up, then cosine) from the config's parameter groups."""

from __future__ import annotations

import math

import torch

from graft.config import FitConfig
from graft.training.state import TrainState

__all__ = ["create_optimizer", "create_scheduler", "layer_decayed"]


def create_optimizer(groups: list[dict], config: FitConfig) -> torch.optim.Optimizer:
    train = config.train
    if train.lr_decay != 1.0 and train.strategy != "scratch":  # scratch trains every layer at one rate
        groups = layer_decayed(groups, train.lr_decay)
    factories = {
        "adamw": lambda: torch.optim.AdamW(groups, lr=train.lr),
        "sgd": lambda: torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True),
    }
    return factories[train.optimizer]()


def layer_decayed(groups: list[dict], decay: float) -> list[dict]:
    """Layer-wise learning-rate decay over the recipe's named groups (``head``, ``trunk.0`` = the lowest trainable
    stage ... ``trunk.K-1`` = the top one, each with a ``.no_decay`` twin): the top stage trains at the head's rate,
    each stage below at ``decay`` times the rate of the one above. It replaces ``--stem-lr-ratio``'s spread."""
    depths = [int(g["name"].split(".")[1]) for g in groups if g.get("name", "").startswith("trunk.")]
    head = [g["lr"] for g in groups if g.get("name", "").split(".")[0] == "head"]
    if not depths or not head:
        return groups
    top = max(depths)
    out = []
    for group in groups:
        name = group.get("name", "")
        if name.startswith("trunk."):
            group = {**group, "lr": head[0] * decay ** (top - int(name.split(".")[1]))}
        out.append(group)
    return out


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
