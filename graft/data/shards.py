"""WebDataset tar shards: ``graft shard`` writes them from a folder or CSV; ``graft fit SHARDS/`` streams them.

A shard set is a folder of ``SPLIT-NNNNNN.tar`` files (images as stored, their class index, their relative path)
and the sidecar ``graft-shards.json``: class names, per split the shard names and, per shard, the (key, label) of
every sample in order. The sidecar is what lets every rank of a distributed run take exactly the same number of
samples per epoch without opening a tar, and lets ``discover`` give the rest of graft ordinary splits.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from graft.data.discovery import DatasetSplits
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from graft.errors import GraftError

__all__ = [
    "SIDECAR", "ShardDataset", "discover_shards", "is_shard_source", "parse_size", "rank_and_world", "shard_dataset",
    "shard_loaders", "write_shards"
]

log = logging.getLogger(__name__)

SIDECAR = "graft-shards.json"
SHARD_FORMAT = 1
SHUFFLE_BUFFER = 2048  # samples held for the streaming shuffle: ~0.2 GB of JPEG bytes at ImageNet sizes
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _wds():
    try:
        import webdataset
    except ImportError:
        raise GraftError("tar shards need the webdataset package: pip install 'graft[shards]'") from None
    return webdataset


def parse_size(text: str | int) -> int:
    """``512MB``, ``1GiB``, ``100000`` → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise GraftError(f"--shard-size {text!r}: expected a size such as 512MB, 1GB or 64MiB")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2).upper()]))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------------------- writing


def _plan(samples: list, limit: int) -> list[list[int]]:
    """Sample indices per shard: consecutive samples until the next would pass ``limit`` bytes (sizes from stat;
    a tar adds ~3 KB of headers and padding per sample: three members)."""
    plan, size = [[]], 0
    for index, (path, _) in enumerate(samples):
        cost = os.path.getsize(path) + 3072
        if plan[-1] and size + cost > limit:
            plan.append([])
            size = 0
        plan[-1].append(index)
        size += cost
    return plan


def write_shards(splits: DatasetSplits, output: str | os.PathLike, shard_size: str | int = "512MB") -> dict:
    """Writes ``splits`` (after the scan dropped unreadable files) as tar shards and the sidecar into ``output``
    (a folder ``graft.utils.outputs.output_folder`` has checked); returns the sidecar.

    Each shard goes through ``atomic_write`` (temp name, fsync, rename, manifest), so a killed run never leaves a
    half shard under a real name; the sidecar is written last, so a shard set without one is an unfinished run.
    """
    from graft.utils.files import atomic_write
    from graft.utils.versions import __version__

    wds, folder, limit = _wds(), Path(output), parse_size(shard_size)
    root = Path(splits.root) if Path(splits.root).is_dir() else Path(splits.root).parent
    sidecar = {"format": SHARD_FORMAT, "graft_version": __version__, "classes": splits.classes,
               "source": splits.source, "splits": {}}
    for split in ("train", "val", "test"):
        samples = getattr(splits, split)
        if not samples:
            continue
        shards = []
        for number, members in enumerate(_plan(samples, limit)):
            name = f"{split}-{number:06d}.tar"

            def write(temp: str, members=members, samples=samples) -> None:
                with wds.TarWriter(temp) as sink:
                    for index in members:
                        path, label = samples[index]
                        ext = Path(path).suffix.lower().lstrip(".") or "img"  # images as stored, never re-encoded
                        sink.write({"__key__": f"{index:09d}", ext: Path(path).read_bytes(), "cls": label,
                                    "path.txt": os.path.relpath(path, root)})

            atomic_write(folder / name, write)
            shards.append({"name": name, "samples": [[f"{i:09d}", samples[i][1]] for i in members]})
        sidecar["splits"][split] = {"count": len(samples), "counts": splits.counts(split), "shards": shards}
    text = json.dumps(sidecar, separators=(",", ":"))  # compact: a million samples' (key, label) pairs
    atomic_write(folder / SIDECAR, lambda temp: Path(temp).write_text(text + "\n"))
    return sidecar


# ---------------------------------------------------------------------------------------------------------- reading


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


def discover_shards(path: str | os.PathLike) -> DatasetSplits:
    """Splits from a shard set's sidecar, without opening a tar. Samples are ``SHARD.tar#KEY`` names (for counts,
    class weights and error messages; graft reads them only through ``ShardDataset``). A pattern selects shards
    of the splits it names; a split it does not name is taken whole."""
    folder, selected = _sidecar_of(str(path))
    try:
        sidecar = json.loads((folder / SIDECAR).read_text())
        classes, parts = list(sidecar["classes"]), dict(sidecar["splits"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GraftError(f"{folder / SIDECAR}: not a readable shard sidecar ({error}); write the shards again with "
                         "graft shard") from None
    if selected is not None:
        missing = selected - {s["name"] for part in parts.values() for s in part["shards"]}
        if missing:
            raise GraftError(f"{path}: {min(missing)} is not in {folder / SIDECAR}; check the pattern")
        for split, part in parts.items():
            chosen = [s for s in part["shards"] if s["name"] in selected]
            if chosen:
                parts[split] = {**part, "shards": chosen, "count": sum(len(s["samples"]) for s in chosen)}
    for part in parts.values():
        for shard in part["shards"]:
            if not (folder / shard["name"]).is_file():
                raise GraftError(f"{folder / shard['name']}: listed in {SIDECAR} but missing; copy it back or write "
                                 "the shards again")
    samples = {split: [(f"{folder / s['name']}#{key}", int(label)) for s in part["shards"] for key, label in
                       s["samples"]] for split, part in parts.items()}
    if not samples.get("train") or not samples.get("val"):
        raise GraftError(f"{folder}: the shard set needs train and val shards; write it with graft shard from data "
                         "that has both (a plain folder gets a seeded val split)")
    shards = {split: [(str(folder / s["name"]), [(k, int(v)) for k, v in s["samples"]]) for s in part["shards"]]
              for split, part in parts.items()}
    notes = ["test shards are not evaluated by fit; evaluate the run on the test folder"] if samples.get("test") else []
    return DatasetSplits(classes, samples["train"], samples["val"], [], f"tar shards {folder} ({sidecar['source']})",
                         notes, str(folder), shards=shards)


def _all(urls):
    return urls  # graft splits shards across ranks and workers itself (equal counts per rank)


class ShardDataset(IterableDataset):
    """Streams (image, label[, index]) from tar shards, decoded by graft's own ``decode_image``.

    Training (``equal=True``): each rank takes every world-th shard (in a seeded order when shuffling) and exactly
    ``len(self)`` = total // world samples an epoch, cycling its shards when they hold fewer, so DDP ranks step in
    lockstep; inside a rank, loader worker w takes every w-th sample. A bad sample is logged and replaced by the
    next good one, as with folders. Validation (``equal=False``): rank r takes every r-th sample, no padding.
    """

    def __init__(self, shards: list[tuple[str, list]], transform, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 shuffle: bool = False, generator: torch.Generator | None = None, with_index: bool = False,
                 equal: bool = True, samples: list | None = None):
        self.shards, self.transform, self.max_pixels = shards, transform, max_pixels
        self.shuffle, self.generator, self.with_index, self.equal = shuffle, generator, with_index, equal
        self.samples = samples or [(f"{url}#{key}", label) for url, members in shards for key, label in members]
        starts, total = [], 0
        for _, members in shards:
            starts.append(total)
            total += len(members)
        self.starts, self.total = starts, total

    def __len__(self) -> int:
        rank, world = rank_and_world()
        return self.total // world if self.equal else len(range(rank, self.total, world))

    def _stream(self, order: list[int]):
        """(global index, label, sample dict or None) for the shards in ``order``, in tar order."""
        wds = _wds()
        for number in order:
            url, members = self.shards[number]
            labels = {key: (self.starts[number] + i, label) for i, (key, label) in enumerate(members)}
            seen = set()
            for sample in wds.WebDataset([url], shardshuffle=False, nodesplitter=_all, workersplitter=_all,
                                         empty_check=False, handler=wds.warn_and_continue):
                if sample["__key__"] in labels:
                    seen.add(sample["__key__"])
                    yield (*labels[sample["__key__"]], sample)
            for key in labels.keys() - seen:  # listed in the sidecar, missing from the tar: a damaged shard
                yield (*labels[key], None)

    def _positions(self, rank: int, world: int, seed: int):
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(seed).shuffle(order)
        if not self.equal:
            yield from (item for p, item in enumerate(self._stream(order)) if p % world == rank)
            return
        mine, quota, given = order[rank::world] or order, len(self), 0
        while given < quota:  # cycle: a rank whose shards hold fewer samples repeats some (equal steps per rank)
            for item in self._stream(mine):
                if given == quota:
                    return
                given += 1
                yield item

    def __iter__(self):
        rank, world = rank_and_world()
        self._pending, self._last = 0, None
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        seed = int(torch.randint(2**62, (1,), generator=self.generator)) if self.shuffle else 0
        rng, buffer = random.Random(seed * 1009 + rank * 101 + worker), []
        mine = (item for p, item in enumerate(self._positions(rank, world, seed)) if p % workers == worker)
        for item in mine:
            if not self.shuffle:
                yield from self._decoded([item])
                continue
            buffer.append(item)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield from self._decoded([buffer.pop(rng.randrange(len(buffer)))])
        rng.shuffle(buffer)
        yield from self._decoded(buffer, final=True)

    def _decoded(self, items, final: bool = False):
        for index, label, sample in items:
            try:
                if sample is None:
                    raise ImageError(f"{self.samples[index][0]}: listed in {SIDECAR} but not in the tar (damaged?)")
                ext = next(k for k in sample if not k.startswith("__") and k not in ("cls", "path.txt"))
                name = f"{sample.get('__url__', '')}#{sample['__key__']}.{ext}"
                image = self.transform(decode_image(sample[ext], name, self.max_pixels))
            except (ImageError, StopIteration) as error:
                log.warning("%s (substituted the next image)", error)
                self._pending = getattr(self, "_pending", 0) + 1
                continue
            for _ in range(1 + getattr(self, "_pending", 0)):  # the bad ones' places, so the count stays exact
                yield (image, label, index) if self.with_index else (image, label)
            self._pending, self._last = 0, (image, label, index)
        if final and getattr(self, "_pending", 0) and getattr(self, "_last", None):
            for _ in range(self._pending):
                yield self._last if self.with_index else self._last[:2]
            self._pending = 0


def shard_loaders(splits: DatasetSplits, preprocessing, config, device: torch.device):
    """Training and validation DataLoaders over ``splits.shards`` (``graft.training.setup.create_loaders`` for a
    shard set): the same transforms, batch size and worker rule as for folders."""
    from graft.data.datasets import loader_options
    from graft.data.transforms import create_transform

    data = config.data
    if config.train.balance == "sampler":
        raise GraftError("--balance sampler draws from an indexable folder; with tar shards use --balance loss")
    generator = torch.Generator()
    train_set = ShardDataset(splits.shards["train"],
                             create_transform(preprocessing, True, data.augment, data.hflip), data.max_image_pixels,
                             shuffle=True, generator=generator, with_index=True, samples=splits.train)
    val_set = ShardDataset(splits.shards["val"], create_transform(preprocessing), data.max_image_pixels,
                           equal=False, samples=splits.val)
    train_loader = DataLoader(train_set, batch_size=data.batch_size, generator=generator,
                              drop_last=len(train_set) > data.batch_size,
                              **loader_options(device, data.workers))
    val_loader = DataLoader(val_set, batch_size=data.batch_size * 2, **loader_options(device, data.workers))
    return train_loader, val_loader, generator


def shard_dataset(data: str | os.PathLike, output: str | os.PathLike, shard_size: str | int = "512MB",
                  val_fraction: float = 0.2, seed: int = 0, overwrite: bool | None = None) -> dict:
    """``graft shard``: discovers and scans ``data`` (unreadable files are left out and listed in the sidecar),
    then writes its splits as tar shards into ``output``; a plain folder's seeded val split is computed here once
    and recorded, so every later fit sees the same split. Returns the sidecar."""
    from graft.data.discovery import discover
    from graft.data.scan import scan
    from graft.utils.outputs import output_folder

    parse_size(shard_size)  # a bad size is refused before any work
    folder = output_folder(output, "--output", ((data, "data"),), overwrite)
    splits = discover(data, val_fraction, seed)
    if splits.shards is not None:
        raise GraftError(f"{data}: is already a shard set; graft shard reads class folders or a CSV manifest")
    report = scan(splits)
    sidecar = write_shards(splits, folder, shard_size)
    if report.skipped:
        log.warning("%d unreadable file(s) left out, e.g. %s", len(report.skipped), report.skipped[0][1])
    return sidecar
