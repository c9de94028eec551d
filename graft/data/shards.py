"""WebDataset tar shards: ``graft shard`` writes them from a folder or CSV; ``graft fit SHARDS/`` streams them (the
sidecar index that describes a shard set is ``graft.data.shard_index``).

A shard set is a folder of ``SPLIT-NNNNNN.tar`` files (images as stored, their class index, their relative path)
and the sidecar ``graft-shards.json``: class names, per split the shard names and, per shard, the (key, label) of
every sample in order. The sidecar is what lets every rank of a distributed run take exactly the same number of
samples per epoch without opening a tar, and lets ``discover`` give the rest of graft ordinary splits.

The sidecar is data, perhaps copied from elsewhere or edited: every field is checked before any work, and a shard
name is only ever a plain ``.tar`` name inside the shard folder. graft reads the tars itself (``read_tar``, on a file
it opened): WebDataset would treat a name as a URL and run a ``pipe:`` one through a shell. WebDataset writes them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tarfile
import zlib
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from graft.data.images import DEFAULT_MAX_PIXELS, MAX_FILE_BYTES, ImageError, decode_image
from graft.data.shard_index import SHARD_FORMAT, SIDECAR
from graft.data.splits import DatasetSplits
from graft.errors import GraftError
from graft.utils.progress import Progress

__all__ = ["ShardDataset", "parse_size", "rank_and_world", "read_tar", "shard_datasets", "write_shards"]

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2048  # samples held for the streaming shuffle: ~0.2 GB of JPEG bytes at ImageNet sizes
_NOT_IMAGES = ("cls", "path.txt")  # the members write_shards adds beside each image
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


def write_shards(splits: DatasetSplits, output: str | os.PathLike, shard_size: str | int = "512MB",
                 log=None) -> dict:
    """Writes ``splits`` (after the scan dropped unreadable files) as tar shards and the sidecar into ``output``
    (a folder ``graft.utils.outputs.output_folder`` has checked); returns the sidecar.

    Each shard goes through ``atomic_write`` (temp name, fsync, rename, manifest), so a killed run never leaves a
    half shard under a real name; the sidecar is written last, so a shard set without one is an unfinished run.
    ``log``: where progress lines go (none without it).
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
        shards, plan = [], _plan(samples, limit)
        with Progress(f"shard: {split}", len(samples), "images", log, log is not None) as progress:
            for number, members in enumerate(plan):
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
                progress.update(sum(len(part) for part in plan[:number + 1]))
        sidecar["splits"][split] = {"count": len(samples), "counts": splits.counts(split), "shards": shards}
    text = json.dumps(sidecar, separators=(",", ":"))  # compact: a million samples' (key, label) pairs
    atomic_write(folder / SIDECAR, lambda temp: Path(temp).write_text(text + "\n"))
    return sidecar





def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    return "a folder" if member.isdir() else "not a regular file"


def read_tar(path: str, max_bytes: int = MAX_FILE_BYTES):
    """(key, image member name, image bytes or None, problem or None) per sample of a tar shard, in tar order (no
    bytes and no problem: the sample has no image member).

    The shard is opened here as a local file (never handed to WebDataset as a URL, which would run ``pipe:`` names
    through a shell) and read as a stream; members group into samples by WebDataset's rule (the key is the name up
    to the first dot of its last part). Links and other non-files are skipped with a reason, as are members over
    ``max_bytes``. A tar that cannot be read further ends with one (None, None, None, reason) entry.
    """
    from webdataset.tariterators import base_plus_ext

    key, member_name, data, problem = None, None, None, None
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                prefix, ext = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, member_name, data, problem
                    key, member_name, data, problem = prefix, None, None, None
                if ext.lower() in _NOT_IMAGES or data is not None or problem is not None:
                    continue  # the label and path members; one image per sample: the first
                member_name = member.name
                if not member.isfile():
                    problem = f"{_member_kind(member)} member, skipped"
                elif member.size > max_bytes:
                    problem = f"{member.size / 2**20:,.0f} MB member, more than graft reads from one image, skipped"
                else:
                    data = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
        reason = str(error).splitlines()[0][:150] if str(error) else type(error).__name__
        if key is not None:
            yield key, member_name, data, problem
            key = None
        yield None, None, None, f"unreadable tar: {reason}"
    if key is not None:
        yield key, member_name, data, problem


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
        """(global index, label, (name, image bytes or None, why there are none)) for the shards in ``order``, in tar
        order. Samples the sidecar lists but the tar lacks (a damaged shard) come last, the first of them carrying
        one line for all (the others an empty one: substituted silently)."""
        for number in order:
            path, members = self.shards[number]
            labels = {key: (self.starts[number] + i, label) for i, (key, label) in enumerate(members)}
            seen, broken = set(), "not in the tar"
            for key, member, data, problem in read_tar(path):
                if key is None:
                    broken = problem
                elif key in labels and key not in seen:
                    seen.add(key)
                    name = f"{path}: member {member or key}"
                    yield (*labels[key], (name, data, f"{name}: {problem or 'no image member'}"))
            missing = [key for key, _ in members if key not in seen]
            for position, key in enumerate(missing):
                problem = f"{path}: {len(missing)} sample(s) listed in {SIDECAR} not read ({broken}), e.g. {key}" \
                    if position == 0 else ""
                yield (*labels[key], (path, None, problem))

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
        for index, label, (name, data, problem) in items:
            try:
                if data is None:
                    raise ImageError(problem)
                image = self.transform(decode_image(data, name, self.max_pixels))
            except ImageError as error:
                if str(error):  # one line for all of a damaged shard's missing samples
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


def shard_datasets(splits: DatasetSplits, train_transform, val_transform, max_pixels: int | None,
                   generator: torch.Generator) -> tuple[ShardDataset, ShardDataset]:
    """The training and validation streams of a shard set; ``graft.training.setup.create_loaders`` builds the loaders
    around them exactly as around a folder's datasets (batch size x --accumulate, workers, transforms)."""
    train_set = ShardDataset(splits.shards["train"], train_transform, max_pixels, shuffle=True, generator=generator,
                             with_index=True, samples=splits.train)
    val_set = ShardDataset(splits.shards["val"], val_transform, max_pixels, equal=False, samples=splits.val)
    return train_set, val_set
