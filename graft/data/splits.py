"""What discovery finds: samples per split with a stable class order (every source gives ``DatasetSplits``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DatasetSplits", "Sample"]

Sample = tuple[str, int]  # (path, class index)


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
