"""What extraction returns: one node's cached features for every split, and the ``.npz`` file they are saved to.

Apart from ``graft.probing.extraction`` (which imports torchvision for its transforms) so that a warm rerun that only
reads the cache (``graft.probing.warm``) imports neither torchvision nor timm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graft.data.splits import DatasetSplits
from graft.utils.files import atomic_write

__all__ = ["SPLITS", "FeatureSet", "save_feature_set", "split_features"]

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
    digest: str = ""  # the content hash of the weights these features depend on (``node_digests``)

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
                   stats: dict, digest: str = "") -> FeatureSet:
    """One node's FeatureSet from its features in split order (``views``: {view: (N, D)}, view 0 every image, the
    augmented views the training images only)."""
    features, labels, paths, offset = {}, {}, {}, 0
    for split in SPLITS:
        samples = getattr(splits, split)
        features[split] = views[0][offset:offset + len(samples)]
        labels[split] = np.array([label for _, label in samples], dtype=np.int64)
        paths[split] = [path for path, _ in samples]
        offset += len(samples)
    augmented = [views[v] for v in range(1, augment_views + 1)]
    return FeatureSet(node, splits.classes, features, labels, paths, augmented, dict(stats), digest)
