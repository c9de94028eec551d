"""What discovery finds: samples per split with a stable class order (every source gives ``DatasetSplits``)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SPLIT_NAMES", "DatasetSplits", "Sample", "stratified_split"]

Sample = tuple[str, int]  # (path, class index); multi-label: the first of the image's classes (see DatasetSplits)

# the folder / split names each split goes by (class folders, CSV manifests, Hugging Face datasets)
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


@dataclass
class DatasetSplits:
    """Samples per split with a stable (sorted) class order."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    source: str = ""  # how the splits were found, for the report
    notes: list[str] = field(default_factory=list)  # what discovery ignored (empty classes, loops, non-images)
    root: str = ""  # the folder or CSV manifest discovered: graft never writes inside it
    shards: dict | None = None  # tar shards ({split: [(tar path, [(key, label), ...])]}), see graft.data.shards
    # multi-label data: every image's sorted class indices by path; its Sample carries the first of them (used only
    # to split, scan and cache: the targets come from here)
    label_sets: dict[str, tuple[int, ...]] | None = None

    @property
    def multi_label(self) -> bool:
        return self.label_sets is not None

    def targets(self, paths) -> np.ndarray:
        """(N, classes) multi-hot float32 targets of ``paths`` (multi-label data only)."""
        hot = np.zeros((len(paths), len(self.classes)), dtype=np.float32)
        for row, path in enumerate(paths):
            hot[row, list(self.label_sets[str(path)])] = 1.0
        return hot

    def counts(self, split: str) -> dict[str, int]:
        if self.label_sets is not None:  # an image counts once for each of its classes
            counter = Counter(i for path, _ in getattr(self, split) for i in self.label_sets[path])
        else:
            counter = Counter(label for _, label in getattr(self, split))
        return {name: counter.get(index, 0) for index, name in enumerate(self.classes)}


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Splits each class separately (seeded), so val keeps the class proportions; classes of 1 stay in train."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction))) if len(members) > 1 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)
