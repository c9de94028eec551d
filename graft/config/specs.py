"""Parsers for the option strings with a small grammar: heads (mlp:512), trackers, unfreeze (last:2), and the lab
network's architecture options (activation, norm, init normal:STD, vgg stages 2x32,2x64)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from graft.config.choices import ACTIVATIONS, LOGGERS, MAX_HEAD_LAYERS, MAX_HEAD_WIDTH, NORMS
from graft.errors import GraftError

__all__ = [
    "MAX_CONVS", "MAX_INIT_STD", "MAX_STAGES", "MAX_WIDTH", "ArchOptions", "parse_head", "parse_init", "parse_log",
    "parse_unfreeze", "parse_vgg_stages",
]

# vgg-like: bounds that keep a typo (2x100000) from allocating tens of GB while the network is built
MAX_WIDTH, MAX_CONVS, MAX_STAGES = 4096, 16, 8
MAX_INIT_STD = 10.0


def parse_head(spec: str) -> list[int]:
    """``linear`` or ``sigmoid`` → [], ``mlp:512,256`` → [512, 256] (hidden widths)."""
    if spec in ("linear", "sigmoid"):
        return []
    match = re.fullmatch(r"mlp:(\d{1,9}(?:,\d{1,9})*)", spec)  # int() refuses 4,300+ digits
    if not match:
        raise GraftError(f"head '{spec}' not understood: use 'linear', 'sigmoid' (two classes, one logit) or "
                         "'mlp:WIDTH[,WIDTH...]' (e.g. mlp:512)")
    widths = [int(width) for width in match.group(1).split(",")]
    if len(widths) > MAX_HEAD_LAYERS or not all(1 <= width <= MAX_HEAD_WIDTH for width in widths):
        raise GraftError(f"head '{spec:.40}' (--head): mlp widths must be in [1, {MAX_HEAD_WIDTH}], at most "
                         f"{MAX_HEAD_LAYERS} hidden layers (e.g. mlp:512)")
    return widths


def parse_log(spec: str) -> tuple[str, ...]:
    """``tensorboard,mlflow`` → ("tensorboard", "mlflow"): the trackers, each once, in the given order; "" → ()."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in spec.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise GraftError(f"--log '{unknown[0]:.40}' not understood: choose from {', '.join(LOGGERS)} "
                         "(comma-separated, e.g. --log tensorboard,mlflow)")
    return names


def parse_unfreeze(spec: str) -> int | None:
    """``all`` → None (every stage), ``last:2`` → 2."""
    if spec == "all":
        return None
    match = re.fullmatch(r"last:(\d{1,9})", spec)
    if not match or int(match.group(1)) < 1:
        raise GraftError(f"unfreeze '{spec}' not understood: use 'all' or 'last:K' with K >= 1 (e.g. last:2)")
    return int(match.group(1))



@dataclass(frozen=True)
class ArchOptions:
    """How a lab network is built; stored in every run's config (model.activation, model.norm, ...)."""

    activation: str = "relu"
    norm: str = "none"
    init: str = "kaiming"  # kaiming | xavier | normal:STD (e.g. normal:0.01)
    vgg_stages: str = "2x32,2x64,2x128"  # vgg-like: CONVSxWIDTH per stage

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise GraftError(f"activation '{self.activation}' not understood: choose one of {', '.join(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise GraftError(f"norm '{self.norm}' not understood: choose one of {', '.join(NORMS)}")
        parse_init(self.init)
        parse_vgg_stages(self.vgg_stages)


def parse_init(spec: str) -> tuple[str, float]:
    """``kaiming`` / ``xavier`` → (scheme, 0); ``normal:0.01`` → ("normal", 0.01)."""
    if spec in ("kaiming", "xavier"):
        return spec, 0.0
    match = re.fullmatch(r"normal:(\d*\.?\d+(?:e-?\d+)?)", spec)
    if not match or not 0 < float(match.group(1)) <= MAX_INIT_STD:  # 1e999 reads as inf
        raise GraftError(f"init '{spec:.40}' not understood: use kaiming, xavier or normal:STD with STD in "
                         f"(0, {MAX_INIT_STD:g}] (e.g. normal:0.01)")
    return "normal", float(match.group(1))


def parse_vgg_stages(spec: str) -> list[tuple[int, int]]:
    """``2x32,2x64`` → [(2, 32), (2, 64)]: convolutions and width per stage."""
    stages = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d{1,9})x(\d{1,9})\s*", part)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise GraftError(f"vgg stages '{spec}' not understood: use CONVSxWIDTH per stage, e.g. 2x32,2x64,3x128")
        stages.append((int(match.group(1)), int(match.group(2))))
    if len(stages) > MAX_STAGES or any(convs > MAX_CONVS or width > MAX_WIDTH for convs, width in stages):
        raise GraftError(f"vgg stages '{spec:.40}': at most {MAX_STAGES} stages, each of 1 to {MAX_CONVS} convolutions "
                         f"of width 1 to {MAX_WIDTH} (e.g. 2x32,2x64,3x128)")
    return stages
