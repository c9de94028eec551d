"""Answers to the user's real questions from cached features: which backbone, which layer, probe or fine-tune?

``probe_backbones`` is the lecture's "linear classifier from different stages" made into a leaderboard;
``advise`` measures data size and how well each stage's frozen features separate the classes, then places the data
in the lecture's matrix (little/lots of data x similar/different domain) and names the `graft fit` command.
"""

from __future__ import annotations

import copy
import csv
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from graft.backbones import create_backbone
from graft.config import FitConfig, apply_overrides
from graft.data import DatasetSplits, discover, scan
from graft.errors import GraftError
from graft.evaluate import resolve_device
from graft.features import FeatureExtractor, FeatureSet, extract_features
from graft.probe import fit_linear_probe
from graft.surgery import DEFAULT_NODE, cut
from graft.text import safe_record

LITTLE_DATA = 100  # median training images per class below this: "little data"
LOTS_OF_DATA = 1000  # at or above this: "lots of data"
DOMAIN_MARGIN = 0.02  # an earlier stage must beat the top by this much to call the domain "different"


@dataclass
class LeaderboardRow:
    backbone: str
    node: str
    width: int
    val_accuracy: float
    knn_accuracy: float
    extract_images_per_s: float | None  # None: every feature came from the cache
    params_m: float  # millions of trunk parameters up to the node
    inference_ms: float  # trunk forward per image at batch 32 (random tensors, this device)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, k: int = 5) -> float:
    """Cosine k-NN accuracy on standardised features: separability without any fitted weights."""
    train = torch.as_tensor(train_x, dtype=torch.float32)
    val = torch.as_tensor(val_x, dtype=torch.float32)
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    train = torch.nn.functional.normalize((train - mean) / std, dim=1)
    val = torch.nn.functional.normalize((val - mean) / std, dim=1)
    labels = torch.as_tensor(train_y)
    k = min(k, len(labels))
    votes = labels[(val @ train.T).topk(k, dim=1).indices]
    predicted = torch.mode(votes, dim=1).values
    return (predicted == torch.as_tensor(val_y)).float().mean().item()


def _prepare(data, val_fraction: float, seed: int) -> DatasetSplits:
    splits = discover(data, val_fraction, seed)
    scan(splits)
    if not splits.val:
        raise GraftError(f"{data}: no validation images to compare on; add a val/ folder or more images per class")
    return splits


def _speed(net, node: str, input_size, device: torch.device, batch: int = 32, repeats: int = 3) -> tuple[float, float]:
    """(millions of parameters up to the node, milliseconds per image) for the trunk cut at ``node``."""
    trunk, _ = cut(copy.deepcopy(net), None if node == DEFAULT_NODE else node, "avg", input_size)
    params = sum(p.numel() for p in trunk.parameters()) / 1e6
    trunk = trunk.eval().to(device).to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, *input_size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        trunk(images)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            trunk(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return params, (time.perf_counter() - start) * 1000 / (repeats * batch)


def stage_features(splits: DatasetSplits, backbone_name: str, stages="all", image_size: int | None = None,
                   pool: str = "avg", pretrained: bool = True, cache_dir=None, device: str = "auto",
                   batch_size: int | None = None, workers: int = -1, log=None, seed: int = 0, augment_views: int = 0):
    """(backbone, preprocessing, {node: FeatureSet}) from one pass over the data.

    Args:
        stages: ``all`` (every stage node and the pooled features), ``default`` (pooled features only), or a list
            of node names.
        seed: seeds random initialisation (pretrained=False), so a rerun has the same weights and hits the cache.
    """
    torch.manual_seed(seed)
    backbone = create_backbone(backbone_name, pretrained=pretrained)
    preprocessing = backbone.preprocessing.with_size(image_size)
    if isinstance(stages, str):
        stages = (backbone.stage_nodes if stages == "all" else []) + [DEFAULT_NODE]
    extractor = FeatureExtractor(backbone.net, list(stages), pool)
    sets = extract_features(splits, extractor, preprocessing, backbone_name, cache_dir, batch_size, workers,
                            resolve_device(device), augment_views, log=log)
    return backbone, preprocessing, sets


def probe_backbones(data, backbones: list[str], stages: str = "default", image_size: int | None = None,
                    pool: str = "avg", pretrained: bool = True, cache_dir=None, device: str = "auto",
                    batch_size: int | None = None, workers: int = -1, val_fraction: float = 0.2, seed: int = 0,
                    output: str | os.PathLike | None = None, log=None) -> list[LeaderboardRow]:
    """Linear-probes each backbone (and, with stages='all', each of its stages) on cached features.

    Writes ``leaderboard.csv`` and ``leaderboard.png`` to ``output`` when given. Rows are sorted best first.
    """
    if output:
        from graft.features import cache_folder
        from graft.outputs import output_folder

        output_folder(output, "--output", ((data, "data"), (cache_folder(cache_dir), "feature cache")))
    splits = _prepare(data, val_fraction, seed)
    target = resolve_device(device)
    rows = []
    for name in backbones:
        backbone, preprocessing, sets = stage_features(splits, name, stages, image_size, pool, pretrained, cache_dir,
                                                       device, batch_size, workers, log, seed)
        for node, features in sets.items():
            stage = _stage_row(node, features, len(splits.classes), device)
            params, milliseconds = _speed(backbone.net, node, preprocessing.input_size, target)
            rows.append(LeaderboardRow(name, node, features.dim, stage["probe_accuracy"], stage["knn_accuracy"],
                                       features.stats.get("images_per_s"), params, milliseconds))
    rows.sort(key=lambda r: -r.val_accuracy)
    if output:
        write_leaderboard(rows, Path(output))
    return rows


def write_leaderboard(rows: list[LeaderboardRow], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from graft.model import atomic_write

    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(safe_record(asdict(row)) for row in rows)

    atomic_write(folder / "leaderboard.csv", write)  # atomic and recorded in the folder's manifest
    labels = [f"{r.backbone} @ {r.node}" for r in rows][::-1]
    figure, axis = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    axis.barh(labels, [r.val_accuracy for r in rows][::-1], color="#4878a8")
    axis.set_xlim(0, 1)
    axis.set_xlabel("validation accuracy (linear probe)")
    axis.set_title("linear probes on frozen features")
    for index, row in enumerate(rows[::-1]):
        axis.text(min(row.val_accuracy + 0.01, 0.9), index, f"{row.val_accuracy:.3f}", va="center")
    figure.tight_layout()
    atomic_write(folder / "leaderboard.png", lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)


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
           device: str = "auto", workers: int = -1, val_fraction: float = 0.2, seed: int = 0, log=None) -> Advice:
    """Recommends probe / fine-tune and where to cut, from data size and per-stage separability."""
    splits = _prepare(data, val_fraction, seed)
    _, _, sets = stage_features(splits, backbone, "all", image_size, "avg", pretrained, cache_dir, device,
                                workers=workers, log=log, seed=seed)
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


def _stage_row(node: str, features: FeatureSet, classes: int, device: str) -> dict:
    args = (features.features["train"], features.labels["train"], features.features["val"], features.labels["val"])
    probe = fit_linear_probe(*args, classes=classes, device=resolve_device(device))
    return {"node": node, "width": features.dim, "probe_accuracy": probe.val_accuracy,
            "knn_accuracy": knn_accuracy(*args)}


def resolve_auto(config: FitConfig, log=None) -> FitConfig:
    """``--strategy auto``: runs ``advise`` on the config's data and backbone, then applies its recommendation."""
    advice = advise(config.data.path, config.model.backbone, config.data.image_size, config.model.pretrained,
                    config.data.cache_dir, config.train.device, config.data.workers, config.data.val_fraction,
                    config.train.seed, log)
    if log:
        log(f"auto: {advice.recommendation}: {advice.reason}")
    resolved = copy.deepcopy(config)
    return apply_overrides(resolved, advice.overrides, "advice")
