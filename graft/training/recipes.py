"""Strategies as short recipes: which stages run, what each trains, at which learning rates.

- ``probe``: the trunk stays frozen and only the new head trains (the seeds' ``var_list`` = the new layer).
- ``finetune``: stage 1 trains the head on the frozen trunk (so random head gradients never wreck pretrained
  features); stage 2 unfreezes everything (or the last K stages) at lr x finetune_lr_ratio, with rates that decay
  geometrically from the top stage to the stem (discriminative learning rates).
- ``scratch``: the same architecture, randomly initialised, all trained at one rate: the baseline to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from graft.config import FitConfig, TrainConfig, parse_unfreeze
from graft.models.grafted import GraftModel
from graft.models.surgery import freeze_trunk, set_trainable, unfreeze_last

__all__ = ["ALL_STAGES", "Stage", "configure", "plan", "solves_head", "starts_pretrained"]

ALL_STAGES = -1  # trunk_stages value: every stage trainable


@dataclass(frozen=True)
class Stage:
    """One phase of training."""

    name: str
    epochs: int
    lr: float  # the head's rate (and the top trunk stage's)
    trunk_stages: int  # 0: trunk frozen; ALL_STAGES: whole trunk; K: the last K stages
    discriminative: bool = True  # decay the rate from the top stage down to the stem


def starts_pretrained(config: FitConfig) -> bool:
    """Whether the fit starts from pretrained weights: asked for (``model.pretrained``), and not ``scratch``, which
    trains the same architecture from a random start. The models layer takes the answer as a plain argument."""
    return config.model.pretrained and config.train.strategy != "scratch"


def solves_head(config: FitConfig) -> bool:
    """Whether the head-on-frozen-trunk phase is the cached L-BFGS probe: a linear head, and for finetune a
    pretrained trunk. (A random trunk's BN running statistics are meaningless: once unfrozen it normalises with
    batch statistics, the features the probe was fitted on change completely, and the solved head is lost.)"""
    train = config.train
    linear = config.model.head == "linear" and config.model.dropout == 0
    if train.head_fit != "lbfgs" or not linear:
        return False
    return train.strategy == "probe" or (train.strategy == "finetune" and config.model.pretrained)


def plan(config: FitConfig) -> list[Stage]:
    """The epoch-based stages a strategy runs, in order (the cached probe, when used, runs before them)."""
    train = config.train
    solved = solves_head(config)
    if train.strategy == "probe":
        return [] if solved else [Stage("probe", train.epochs, train.lr, 0)]
    if train.strategy == "scratch":
        return [Stage("scratch", train.epochs, train.lr, ALL_STAGES, discriminative=False)]
    last = parse_unfreeze(train.unfreeze)
    stages = [Stage("head", train.head_epochs, train.lr, 0)] if train.head_epochs and not solved else []
    return stages + [Stage("finetune", train.epochs, train.lr * train.finetune_lr_ratio, last or ALL_STAGES)]


def configure(model: GraftModel, stage: Stage, train: TrainConfig) -> list[dict]:
    """Sets requires_grad for ``stage`` and returns optimizer parameter groups (named, with their own lr).

    Biases and normalisation weights get no weight decay (decaying them only hurts).
    """
    freeze_trunk(model.trunk)
    set_trainable(model.head, True)
    groups = [("head", list(model.head.named_parameters()), stage.lr)]
    if stage.trunk_stages != 0:
        if stage.trunk_stages == ALL_STAGES:
            chosen = unfreeze_last(model.trunk, None)
        else:
            chosen = unfreeze_last(model.trunk, stage.trunk_stages)
        params = dict(model.trunk.net.named_parameters())
        count = len(chosen)
        for depth, names in enumerate(chosen):  # depth 0 = lowest chosen stage
            decays = stage.discriminative and count > 1
            ratio = train.stem_lr_ratio ** ((count - 1 - depth) / (count - 1)) if decays else 1.0
            groups.append((f"trunk.{depth}", [(n, params[n]) for n in names], stage.lr * ratio))
    model.train()
    return [
        group
        for name, named, lr in groups
        for group in _split_decay(name, named, lr, train.weight_decay)
    ]


def _split_decay(name: str, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if p.ndim > 1]
    no_decay = [p for n, p in named if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups
