"""`advise` and ``--strategy auto``: which strategy and layer the data's size and a quick probe suggest.

The probes cover every stage and the lecture's far-domain recipe, linear classifiers on several stages at once
(``candidate_cuts``: the pooled features with the stages below them, concatenated from the same extraction pass).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import numpy as np

from graft.models.surgery import DEFAULT_NODE
from graft.probing.extraction import FeatureSet, candidate_cuts
from graft.probing.leaderboard import prepare_splits, stage_features, stage_row
from graft.utils.progress import Progress

__all__ = ["Advice", "DOMAIN_MARGIN", "LITTLE_DATA", "LOTS_OF_DATA", "RANKING_IMAGES", "advise", "combine_features"]

LITTLE_DATA = 100  # median training images per class below this: "little data"
RANKING_IMAGES = 200  # per class: the per-stage probes that rank the cuts train on at most this many images
LOTS_OF_DATA = 1000  # at or above this: "lots of data"
DOMAIN_MARGIN = 0.02  # an earlier stage must beat the top by this much to call the domain "different"


@dataclass
class Advice:
    """A strategy from the lecture's matrix, the measurements behind it, and the command that runs it."""

    recommendation: str  # probe-top | probe-earlier | finetune-all
    reason: str
    command: str
    overrides: dict  # FitConfig dotted keys that implement it
    images_per_class: float
    stages: list[dict] = field(default_factory=list)  # per node: probe and k-NN accuracy, width


def advise(data, backbone: str, image_size: int | None = None, pretrained: bool = True, cache_dir=None,
           device: str = "auto", workers: int = -1, val_fraction: float = 0.2, seed: int = 0, log=None,
           weights_file: str | None = None, test_fraction: float = 0.0, engine: str = "auto") -> Advice:
    """Recommends probe / fine-tune and where to cut, from data size and per-stage separability.

    Only the train and val images are read: test images stay out of every choice (``test_fraction``: the fit's
    carved test split, left out the same way; ``weights_file``: local pretrained weights, as ``--weights``;
    ``engine``: the extraction engine, as ``extract_features``'s).
    """
    splits = replace(prepare_splits(data, val_fraction, seed, test_fraction, log), test=[])
    _, _, sets = stage_features(splits, backbone, "all", image_size, "avg", pretrained, cache_dir, device,
                                workers=workers, log=log, seed=seed, weights_file=weights_file, engine=engine)
    combined = {spec: combine_features([sets[node] for node in spec.split(",")])
                for spec in candidate_cuts([node for node in sets if node != DEFAULT_NODE])}
    keep = _ranking_subset(sets[DEFAULT_NODE].labels["train"], RANKING_IMAGES, seed)
    candidates = {**sets, **combined}  # single nodes first: they win ties
    stages = []
    with Progress("advise: linear probes", len(candidates), "probes", log, log is not None) as progress:
        for node, features in candidates.items():
            stages.append(stage_row(node, _train_subset(features, keep), len(splits.classes), device))
            progress.update(len(stages), node)
    per_class = statistics.median(splits.counts("train").values())
    top = next(s for s in stages if s["node"] == DEFAULT_NODE)
    best = max(stages, key=lambda s: (round(s["probe_accuracy"], 6), s["node"] == DEFAULT_NODE))
    # Another cut must beat the top by the margin and by two validation images: on a small val split one image is
    # several points, and near-equal candidates (the top plus a stage below it) differ by one image of noise.
    margin = max(DOMAIN_MARGIN, 2 / len(splits.val))
    different = best["node"] != DEFAULT_NODE and best["probe_accuracy"] - top["probe_accuracy"] > margin
    size = "little" if per_class < LITTLE_DATA else "lots of" if per_class >= LOTS_OF_DATA else "a fair amount of"
    evidence = (f"{per_class:g} training images per class ({size} data); linear probe accuracy: top layer "
                f"{top['probe_accuracy']:.3f}, best stage {best['node']} {best['probe_accuracy']:.3f}")
    if size == "little" and different:
        key, overrides = "probe-earlier", {"train.strategy": "probe", "model.cut_at": best["node"]}
        why = (f"{'earlier stages add' if DEFAULT_NODE in best['node'] else 'an earlier stage gives'} features that "
               "separate the classes better (a domain unlike the pretraining data)")
    elif size == "little":
        key, overrides = "probe-top", {"train.strategy": "probe"}
        why = "the top layer's features already separate the classes and there is too little data to fine-tune"
    elif different:  # fine-tune from the cut whose probe was best: the trial must beat that probe, not a weaker one
        key, overrides = "finetune-all", {"train.strategy": "finetune", "train.unfreeze": "all",
                                          "model.cut_at": best["node"]}
        why = "enough data to adapt every stage to a different domain, cut where the probe was best"
    else:  # the lecture says "a few layers" here; measured on flowers5 the last two stages lost to the whole trunk
        key, overrides = "finetune-all", {"train.strategy": "finetune", "train.unfreeze": "all"}
        why = "enough data to adapt every stage (the last two alone did not beat the probe on flowers5)"
    flags = " ".join(f"--{k.split('.')[1].replace('_', '-')} {v}" for k, v in overrides.items())
    command = f"graft fit {data} --backbone {backbone} {flags}"
    return Advice(key, f"{evidence}. {why}.", command, overrides, per_class, stages)


def combine_features(parts: list[FeatureSet]) -> FeatureSet:
    """Several nodes' cached features side by side, as a multi-node ``--cut-at a,b`` gives them (same order)."""
    first = parts[0]
    joined = {split: np.concatenate([part.features[split] for part in parts], axis=1) for split in first.features}
    views = [np.concatenate([part.augmented[view] for part in parts], axis=1) for view in range(len(first.augmented))]
    return replace(first, node=",".join(part.node for part in parts), features=joined, augmented=views, stats={})


def _ranking_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray | None:
    """Indices of a seeded, stratified sample of at most ``per_class`` training images per class (None: all of
    them). Ranking cuts needs their order, not their final accuracy: each CV probe then costs seconds at any size
    (MNIST, 800 a class: advise 306 s → see bench/RESULTS.md), and the fit's own probe still uses every image."""
    labels = np.asarray(labels)
    if np.bincount(labels).max(initial=0) <= per_class:
        return None
    generator = np.random.default_rng(seed)
    chosen = [generator.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def _train_subset(features: FeatureSet, keep: np.ndarray | None) -> FeatureSet:
    if keep is None:
        return features
    return replace(features, features={**features.features, "train": features.features["train"][keep]},
                   labels={**features.labels, "train": features.labels["train"][keep]},
                   paths={**features.paths, "train": [features.paths["train"][i] for i in keep]},
                   augmented=[view[keep] for view in features.augmented])
