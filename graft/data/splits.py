"""What discovery finds: samples per split with a stable class order (every source gives ``DatasetSplits``)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

__all__ = ["DatasetSplits", "SPLIT_NAMES", "Sample", "stratified_split"]

Sample = tuple[str, int]  # (path, class index)

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

    def counts(self, split: str) -> dict[str, int]:
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
