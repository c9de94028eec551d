"""`advise` and ``--strategy auto``: which strategy and layer the data's size and a quick probe suggest."""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field

from graft.config import FitConfig, apply_overrides
from graft.models.surgery import DEFAULT_NODE
from graft.probing.leaderboard import _prepare, _stage_row, stage_features

__all__ = ["Advice", "DOMAIN_MARGIN", "LITTLE_DATA", "LOTS_OF_DATA", "advise", "resolve_auto"]

LITTLE_DATA = 100  # median training images per class below this: "little data"
LOTS_OF_DATA = 1000  # at or above this: "lots of data"
DOMAIN_MARGIN = 0.02  # an earlier stage must beat the top by this much to call the domain "different"


@dataclass
class Advice:
    """A strategy from the lecture's matrix, the measurements behind it, and the command that runs it."""

    recommendation: str  # probe-top | probe-earlier | finetune-last | finetune-all
    reason: str
    command: str
    overrides: dict  # FitConfig dotted keys that implement it
    images_per_class: float
    stages: list[dict] = field(default_factory=list)  # per node: probe and k-NN accuracy, width


def advise(data, backbone: str, image_size: int | None = None, pretrained: bool = True, cache_dir=None,
           device: str = "auto", workers: int = -1, val_fraction: float = 0.2, seed: int = 0, log=None,
           weights_file: str | None = None) -> Advice:
    """Recommends probe / fine-tune and where to cut, from data size and per-stage separability (``weights_file``:
    local pretrained weights, as ``--weights``)."""
    splits = _prepare(data, val_fraction, seed)
    _, _, sets = stage_features(splits, backbone, "all", image_size, "avg", pretrained, cache_dir, device,
                                workers=workers, log=log, seed=seed, weights_file=weights_file)
    stages = [_stage_row(node, features, len(splits.classes), device) for node, features in sets.items()]
    per_class = statistics.median(splits.counts("train").values())
    top = next(s for s in stages if s["node"] == DEFAULT_NODE)
    best = max(stages, key=lambda s: (round(s["probe_accuracy"], 6), s["node"] == DEFAULT_NODE))
    different = best["node"] != DEFAULT_NODE and best["probe_accuracy"] - top["probe_accuracy"] > DOMAIN_MARGIN
    size = "little" if per_class < LITTLE_DATA else "lots of" if per_class >= LOTS_OF_DATA else "a fair amount of"
    evidence = (f"{per_class:g} training images per class ({size} data); linear probe accuracy: top layer "
                f"{top['probe_accuracy']:.3f}, best stage {best['node']} {best['probe_accuracy']:.3f}")
    if size == "little" and different:
        key, overrides = "probe-earlier", {"train.strategy": "probe", "model.cut_at": best["node"]}
        why = "an earlier stage separates the classes better (a domain unlike the pretraining data)"
    elif size == "little":
        key, overrides = "probe-top", {"train.strategy": "probe"}
        why = "the top layer's features already separate the classes and there is too little data to fine-tune"
    elif different or size == "lots of":
        key, overrides = "finetune-all", {"train.strategy": "finetune", "train.unfreeze": "all"}
        why = "enough data to adapt every stage" + (" to a different domain" if different else "")
    else:
        key, overrides = "finetune-last", {"train.strategy": "finetune", "train.unfreeze": "last:2"}
        why = "a similar domain: fine-tuning the last stages adapts the most specific features"
    flags = " ".join(f"--{k.split('.')[1].replace('_', '-')} {v}" for k, v in overrides.items())
    command = f"graft fit {data} --backbone {backbone} {flags}"
    return Advice(key, f"{evidence}. {why}.", command, overrides, per_class, stages)


def resolve_auto(config: FitConfig, log=None) -> FitConfig:
    """``--strategy auto``: runs ``advise`` on the config's data and backbone, then applies its recommendation."""
    advice = advise(config.data.path, config.model.backbone, config.data.image_size, config.model.pretrained,
                    config.data.cache_dir, config.train.device, config.data.workers, config.data.val_fraction,
                    config.train.seed, log)
    if log:
        log(f"auto: {advice.recommendation}: {advice.reason}")
    resolved = copy.deepcopy(config)
    return apply_overrides(resolved, advice.overrides, "advice")
