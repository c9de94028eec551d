"""The index of a WebDataset shard set: the sidecar ``graft-shards.json`` (class names, per split the shard names and
the (key, label) of every sample in order), read and checked field by field before any work, and the splits it
gives the rest of graft. Holds no torch: discovery asks here whether a path is a shard set.

The sidecar is data, perhaps copied from elsewhere or edited: a shard name is only ever a plain ``.tar`` name inside
the shard folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from graft.data.splits import DatasetSplits
from graft.errors import GraftError
from graft.utils.text import display_name

__all__ = ["SHARD_FORMAT", "SIDECAR", "discover_shards", "is_plain_shard_name", "is_shard_source", "read_sidecar"]

SIDECAR = "graft-shards.json"
SHARD_FORMAT = 1


def _sidecar_of(path: str) -> tuple[Path, set[str] | None]:
    """The shard folder and, for a brace pattern (``shards/train-{000000..000009}.tar``), the shard names it selects."""
    if Path(path).is_dir():
        return Path(path), None
    from braceexpand import braceexpand  # a webdataset dependency

    names = [Path(p) for p in braceexpand(path)]
    folders = {p.parent for p in names}
    if len(folders) != 1:
        raise GraftError(f"{path}: a shard pattern must name shards of one folder (the one holding {SIDECAR})")
    return folders.pop(), {p.name for p in names}


def is_shard_source(path: str | os.PathLike) -> bool:
    """A folder holding ``graft-shards.json``, or a ``.tar`` path or brace pattern beside one."""
    text = str(path)
    if Path(text).is_dir():
        return (Path(text) / SIDECAR).is_file()
    return text.endswith(".tar") and (Path(text.split("{")[0]).parent / SIDECAR).is_file()


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is a Python int; 1.7 is not


def _shown(value) -> str:
    """A value from the sidecar, shortened and on one line, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_plain_shard_name(name) -> bool:
    """A ``.tar`` file name inside the shard folder: no folder part, no ``..``, no URL scheme (``pipe:``, ``http:``),
    nothing a shell or a URL opener would interpret."""
    return (isinstance(name, str) and name.endswith(".tar") and name not in ("..tar", ".tar")
            and not any(char in name for char in "/\\:\0") and name.isprintable() and name == name.strip()
            and not name.startswith(("-", "..")))


class _Sidecar:
    """Checks every field of a sidecar before any work: it is data, perhaps written elsewhere or edited, and names
    files graft opens. A problem is one ``GraftError`` line naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def refuse(self, field: str, problem: str) -> GraftError:
        return GraftError(f"{self.path}: {field} {problem}; write the shards again with graft shard")

    def check(self, sidecar) -> None:
        if not isinstance(sidecar, dict):
            raise self.refuse("the file", "is not a JSON object")
        if sidecar.get("format") != SHARD_FORMAT:
            raise self.refuse("format", f"is {_shown(sidecar.get('format'))}; this graft reads format {SHARD_FORMAT}")
        classes = sidecar.get("classes")
        if (not isinstance(classes, list) or len(classes) < 2
                or not all(isinstance(name, str) and name.strip() for name in classes)):
            raise self.refuse("classes", f"is {_shown(classes)}: expected a list of two or more class names")
        if len(set(classes)) != len(classes):
            raise self.refuse("classes", f"names a class twice ({_shown(classes)})")
        if not isinstance(sidecar.get("source", ""), str):
            raise self.refuse("source", f"is {_shown(sidecar['source'])}: expected text")
        splits = sidecar.get("splits")
        if not isinstance(splits, dict) or not set(splits) <= {"train", "val", "test"}:
            raise self.refuse("splits", f"is {_shown(splits)}: expected an object with train, val and test parts")
        names: set[str] = set()
        for split, part in splits.items():
            self.check_split(f"splits.{split}", part, classes, names)

    def check_split(self, field: str, part, classes: list[str], names: set[str]) -> None:
        if not isinstance(part, dict) or not isinstance(part.get("shards"), list):
            raise self.refuse(field, "is not an object with a list of shards")
        tally = [0] * len(classes)
        for number, shard in enumerate(part["shards"]):
            where = f"{field}.shards[{number}]"
            if not isinstance(shard, dict):
                raise self.refuse(where, f"is {_shown(shard)}: expected an object with name and samples")
            name = shard.get("name")
            if not is_plain_shard_name(name):
                raise self.refuse(f"{where}.name", f"{_shown(name)} is not the plain name of a .tar file in the "
                                  "shard folder (no folder, '..' or URL scheme)")
            if name in names:
                raise self.refuse(f"{where}.name", f"{_shown(name)} is listed twice")
            names.add(name)
            self.check_samples(f"{where}.samples", shard.get("samples"), len(classes), tally)
        count = part.get("count", sum(tally))
        if not _is_index(count) or count != sum(tally):
            raise self.refuse(f"{field}.count", f"is {_shown(count)} but the shards list {sum(tally)} samples")
        counts = part.get("counts", dict(zip(classes, tally)))
        if counts != dict(zip(classes, tally)):
            raise self.refuse(f"{field}.counts", f"is {_shown(counts)} but the shards list "
                              f"{_shown(dict(zip(classes, tally)))}")

    def check_samples(self, field: str, samples, classes: int, tally: list[int]) -> None:
        if not isinstance(samples, list):
            raise self.refuse(field, f"is {_shown(samples)}: expected a list of [key, label] pairs")
        keys = set()
        for number, sample in enumerate(samples):
            if not isinstance(sample, list) or len(sample) != 2 or not isinstance(sample[0], str) or not sample[0]:
                raise self.refuse(f"{field}[{number}]", f"is {_shown(sample)}: expected a [key, label] pair")
            key, label = sample
            if not _is_index(label) or not 0 <= label < classes:
                raise self.refuse(f"{field}[{number}]", f"label {_shown(label)} is not a class index "
                                  f"(an integer from 0 to {classes - 1})")
            if key in keys:
                raise self.refuse(f"{field}[{number}]", f"key {_shown(key)} is listed twice in the shard")
            keys.add(key)
            tally[label] += 1


def read_sidecar(folder: Path) -> dict:
    """The sidecar of the shard set in ``folder``, every field checked (``_Sidecar``) before anything is opened."""
    path = folder / SIDECAR
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        reason = str(error).splitlines()[0][:150] if str(error) else type(error).__name__
        raise GraftError(f"{path}: not a readable shard sidecar ({reason}); write the shards again with graft "
                         "shard") from None
    _Sidecar(path).check(sidecar)
    return sidecar


def discover_shards(path: str | os.PathLike) -> DatasetSplits:
    """Splits from a shard set's sidecar, without opening a tar. Samples are ``SHARD.tar#KEY`` names (for counts,
    class weights and error messages; graft reads them only through ``ShardDataset``). A pattern selects shards
    of the splits it names; a split it does not name is taken whole. Shard paths are absolute, inside the folder."""
    folder, selected = _sidecar_of(str(path))
    sidecar = read_sidecar(folder)
    folder = Path(os.path.abspath(folder))  # shard names are plain names (checked): these paths stay in the folder
    classes, parts = sidecar["classes"], dict(sidecar["splits"])
    if selected is not None:
        missing = selected - {s["name"] for part in parts.values() for s in part["shards"]}
        if missing:
            raise GraftError(f"{path}: {min(missing)} is not in {folder / SIDECAR}; check the pattern")
        for split, part in parts.items():
            chosen = [s for s in part["shards"] if s["name"] in selected]
            if chosen:
                parts[split] = {**part, "shards": chosen}
    for part in parts.values():
        for shard in part["shards"]:
            if not (folder / shard["name"]).is_file():
                raise GraftError(f"{folder / shard['name']}: listed in {SIDECAR} but missing; copy it back or write "
                                 "the shards again")
    samples = {split: [(f"{folder / s['name']}#{key}", label) for s in part["shards"] for key, label in s["samples"]]
               for split, part in parts.items()}
    if not samples.get("train") or not samples.get("val"):
        raise GraftError(f"{folder}: the shard set needs train and val shards; write it with graft shard from data "
                         "that has both (a plain folder gets a seeded val split)")
    shards = {split: [(str(folder / s["name"]), [(k, v) for k, v in s["samples"]]) for s in part["shards"]]
              for split, part in parts.items()}
    notes = ["test shards are not evaluated by fit; evaluate the run on the test folder"] if samples.get("test") else []
    return DatasetSplits(list(classes), samples["train"], samples["val"], [],
                         f"tar shards {folder} ({display_name(sidecar.get('source', ''))})", notes, str(folder),
                         shards=shards)
