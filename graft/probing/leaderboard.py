"""Answers to the user's real questions from cached features: which backbone, which layer, probe or fine-tune?

``probe_backbones`` is the lecture's "linear classifier from different stages" made into a leaderboard;
``advise`` measures data size and how well each stage's frozen features separate the classes, then places the data
in the lecture's matrix (little/lots of data x similar/different domain) and names the `graft fit` command.
"""

from __future__ import annotations

import copy
import csv
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from graft.data.discovery import DatasetSplits, discover
from graft.data.scan import scan
from graft.errors import GraftError
from graft.models.backbones.registry import create_backbone
from graft.models.surgery import DEFAULT_NODE, cut
from graft.probing.extraction import FeatureExtractor, FeatureSet, extract_features
from graft.probing.linear import fit_linear_probe
from graft.utils import distributed
from graft.utils.runtime import resolve_device
from graft.utils.text import safe_record

__all__ = ["LeaderboardRow", "knn_accuracy", "probe_backbones", "stage_features", "write_leaderboard", "prepare_splits",
           "stage_row"]


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


def prepare_splits(data, val_fraction: float, seed: int, test_fraction: float = 0.0, log=None) -> DatasetSplits:
    """Discovers and scans ``data`` into train/val(/test) splits, refusing an empty validation split."""
    splits = discover(data, val_fraction, seed, test_fraction)
    scan(splits, log=log)
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
                   batch_size: int | None = None, workers: int = -1, log=None, seed: int = 0, augment_views: int = 0,
                   weights_file: str | None = None, compile_mode: str = "off", engine: str = "auto"):
    """(backbone, preprocessing, {node: FeatureSet}) from one pass over the data.

    Args:
        stages: ``all`` (every stage node and the pooled features), ``default`` (pooled features only), or a list
            of node names.
        compile_mode: ``--compile`` for the extraction forward (``extract_features``).
        engine: the extraction engine, ``auto``, ``onnx`` or ``eager`` (``extract_features``).
        seed: seeds random initialisation (pretrained=False), so a rerun has the same weights and hits the cache.
    """
    torch.manual_seed(seed)
    backbone = create_backbone(backbone_name, pretrained=pretrained, weights_file=weights_file if pretrained else None)
    preprocessing = backbone.preprocessing.with_size(image_size)
    if isinstance(stages, str):
        stages = (backbone.stage_nodes if stages == "all" else []) + [DEFAULT_NODE]
    extractor = FeatureExtractor(backbone.net, list(stages), pool)
    sets = extract_features(splits, extractor, preprocessing, backbone_name, cache_dir, batch_size, workers,
                            resolve_device(device), augment_views, log=log, compile_mode=compile_mode,
                            engine=engine)
    return backbone, preprocessing, sets


def probe_backbones(data, backbones: list[str], stages: str = "default", image_size: int | None = None,
                    pool: str = "avg", pretrained: bool = True, cache_dir=None, device: str = "auto",
                    batch_size: int | None = None, workers: int = -1, val_fraction: float = 0.2, seed: int = 0,
                    output: str | os.PathLike | None = None, log=None, engine: str = "auto") -> list[LeaderboardRow]:
    """Linear-probes each backbone (and, with stages='all', each of its stages) on cached features.

    Writes ``leaderboard.csv`` and ``leaderboard.png`` to ``output`` when given. Rows are sorted best first.

    Under torchrun every rank extracts a share of each backbone's images, then the (backbone, node) probes are dealt
    out round-robin over the ranks and their rows gathered; rank 0 writes the files.
    """
    if output:
        from graft.probing.cache import cache_folder
        from graft.utils.outputs import output_folder

        clashes = ((data, "data"), (cache_folder(cache_dir), "feature cache"))
        distributed.main_decides(lambda: output_folder(output, "--output", clashes))  # rank 0 writes there
    for name in backbones:  # every name and its weights checked before the first extraction: fail in seconds
        create_backbone(name, pretrained=pretrained)
    splits = prepare_splits(data, val_fraction, seed, log=log)
    target = resolve_device(device)
    rows, task = [], -1
    for name in backbones:
        backbone, preprocessing, sets = stage_features(splits, name, stages, image_size, pool, pretrained, cache_dir,
                                                       device, batch_size, workers, log, seed, engine=engine)
        for node, features in sets.items():
            task += 1
            if task % distributed.world_size() != distributed.rank():
                continue  # another rank's probe
            stage = stage_row(node, features, len(splits.classes), device)
            params, milliseconds = _speed(backbone.net, node, preprocessing.input_size, target)
            rows.append(LeaderboardRow(name, node, features.dim, stage["probe_accuracy"], stage["knn_accuracy"],
                                       features.stats.get("images_per_s"), params, milliseconds))
    rows = [row for share in distributed.all_gather_object(rows) for row in share]
    rows.sort(key=lambda r: -r.val_accuracy)
    if output and distributed.is_main():
        write_leaderboard(rows, Path(output))
    return rows


def write_leaderboard(rows: list[LeaderboardRow], folder: Path) -> None:
    from graft.utils.files import atomic_write
    from graft.utils.plotting import plots_skipped, pyplot

    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(safe_record(asdict(row)) for row in rows)

    atomic_write(folder / "leaderboard.csv", write)  # atomic and recorded in the folder's manifest
    if plots_skipped("leaderboard.png"):
        return
    plt = pyplot()
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


def stage_row(node: str, features: FeatureSet, classes: int, device: str) -> dict:
    """One leaderboard row for a cut node: the linear probe's and k-NN's validation accuracy on its features."""
    args = (features.features["train"], features.labels["train"], features.features["val"], features.labels["val"])
    probe = fit_linear_probe(*args, classes=classes, device=resolve_device(device))
    return {"node": node, "width": features.dim, "probe_accuracy": probe.val_accuracy,
            "knn_accuracy": knn_accuracy(*args)}
