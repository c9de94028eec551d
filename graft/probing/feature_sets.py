"""Cached features as graft hands them out: one node's features for every split, with labels and paths in split
order (``FeatureSet``), and the ``.npz`` file ``graft features --out`` writes from them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graft.data.discovery import DatasetSplits
from graft.utils.files import atomic_write

__all__ = ["FeatureSet", "SPLITS", "save_feature_set", "split_features"]

SPLITS = ("train", "val", "test")


@dataclass
class FeatureSet:
    """Cached features of one node for every split, with labels and paths in split order."""

    node: str
    classes: list[str]
    features: dict[str, np.ndarray]  # split → (N, D) float16
    labels: dict[str, np.ndarray]
    paths: dict[str, list[str]]
    augmented: list[np.ndarray] = field(default_factory=list)  # K training views, each (N_train, D)
    stats: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features["train"].shape[1])


def save_feature_set(features: FeatureSet, path: str | os.PathLike) -> Path:
    """Writes one node's features with labels, paths and class names to an ``.npz`` readable without graft
    (``np.load(path)``, no pickle: paths and classes are stored as unicode arrays)."""
    arrays = {"classes": np.array(features.classes), "node": np.array(features.node)}
    for split in SPLITS:
        arrays[f"{split}_features"] = features.features[split]
        arrays[f"{split}_labels"] = features.labels[split]
        arrays[f"{split}_paths"] = np.array(features.paths[split], dtype=str)
    for view, augmented in enumerate(features.augmented, start=1):
        arrays[f"train_view{view}_features"] = augmented
    path = Path(path)
    atomic_write(path, lambda temp: _save_npz(temp, arrays))
    return path


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # closed before atomic_write fsyncs: no buffered bytes left behind
        np.savez(handle, **arrays)


def split_features(node: str, splits: DatasetSplits, views: dict[int, np.ndarray], augment_views: int,
                   stats: dict) -> FeatureSet:
    """``node``'s FeatureSet from its extracted ``views`` (view 0: every split's images in order; view k: the
    training images' k-th augmented view)."""
    features, labels, paths, offset = {}, {}, {}, 0
    for split in SPLITS:
        samples = getattr(splits, split)
        features[split] = views[0][offset:offset + len(samples)]
        labels[split] = np.array([label for _, label in samples], dtype=np.int64)
        paths[split] = [path for path, _ in samples]
        offset += len(samples)
    augmented = [views[v] for v in range(1, augment_views + 1)]
    return FeatureSet(node, splits.classes, features, labels, paths, augmented, dict(stats))
