"""The feature cache: spaces keyed by network, node and preprocessing; entries by path, size and mtime."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing
from graft.utils.files import atomic_write

__all__ = [
    "CacheSpace", "FEATURE_FORMAT", "SHARD_IMAGES", "cache_folder", "default_cache_dir", "file_key", "space_key",
    "weights_digest"
]

log = logging.getLogger(__name__)


FEATURE_FORMAT = 1
SHARD_IMAGES = 4096  # features are flushed to a shard every this many images: a crash loses at most one shard


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAFT_CACHE", Path.home() / ".cache" / "graft" / "features"))


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The feature cache folder: the one given, else the default; a blank name is refused (it would make a folder
    called " " wherever graft runs)."""
    if cache_dir is None or cache_dir == "":
        return default_cache_dir()
    if not str(cache_dir).strip():
        raise GraftError(f"--cache {str(cache_dir)!r} is blank: name a folder, or leave the option out for the default")
    return Path(cache_dir)


def weights_digest(module: nn.Module) -> str:
    """A content hash of every tensor in the module's state dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_key(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def space_key(architecture: str, digest: str, node: str, pool: str, preprocessing: Preprocessing, view: int) -> str:
    identity = {"format": FEATURE_FORMAT, "architecture": architecture, "weights": digest, "node": node,
                "pool": pool, "preprocessing": preprocessing.to_dict(), "view": view}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------------------ one space


class CacheSpace:
    """One folder of features: ``index.json`` → {file key: [shard, row]}, plus ``shard-*.npy`` files."""

    def __init__(self, root: Path, description: dict):
        self.root = root
        self.description = description
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self):
        """Serialises index updates between processes sharing a cache."""
        from filelock import FileLock  # not fcntl: graft imports and runs on Windows too

        with FileLock(self.root / "index.lock", thread_local=False):  # waits for the other writer
            yield

    def read_index(self) -> dict:
        path = self.root / "index.json"
        empty = {"format": FEATURE_FORMAT, "description": self.description, "entries": {}}
        if not path.is_file():
            return empty
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError):  # damaged by hand or by a disk error: the cache is rebuildable, so start over
            log.warning("%s: unreadable feature-cache index; extracting again", path)
            return empty
        return index if isinstance(index, dict) and isinstance(index.get("entries"), dict) else empty

    def lookup(self, keys: list[str]) -> tuple[dict[str, tuple[str, int]], list[str]]:
        entries = self.read_index()["entries"]
        shards = {shard for shard, _ in entries.values()}
        rows = {shard: self._shard_rows(shard) for shard in shards}  # one header read per shard, not per image
        found = {k: tuple(entries[k]) for k in keys if k in entries and entries[k][1] < rows[entries[k][0]]}
        return found, [k for k in keys if k not in found]

    def _shard_rows(self, shard: str) -> int:
        """Rows in a shard, 0 if it is missing; a damaged (truncated) shard is deleted once, with a warning, so its
        images are extracted again into a new shard and no later run trips over it."""
        path = self.root / shard
        try:
            return _npy_rows(path)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            log.warning("%s: damaged feature-cache shard (%s); extracting its images again", path, error)
            path.unlink(missing_ok=True)
            return 0

    def add_shard(self, keys: list[str], features: np.ndarray) -> None:
        """Writes one shard atomically, then (under the lock) the index that references it."""
        name = f"shard-{uuid.uuid4().hex[:12]}.npy"
        atomic_write(self.root / name, lambda temp: _save_npy(temp, features))
        with self.locked():
            index = self.read_index()
            index["entries"].update({key: [name, row] for row, key in enumerate(keys)})
            index["dim"] = int(features.shape[1])
            atomic_write(self.root / "index.json", lambda temp: Path(temp).write_text(json.dumps(index)))

    def gather(self, locations: list[tuple[str, int]]) -> np.ndarray:
        """Rows in the order given, read from memory-mapped shards (only the rows needed are paged in)."""
        shards: dict[str, np.ndarray] = {}
        rows = []
        for shard, row in locations:
            if shard not in shards:
                shards[shard] = np.load(self.root / shard, mmap_mode="r")
            rows.append(shards[shard][row])
        return np.stack(rows) if rows else np.zeros((0, 0), np.float16)


def _npy_rows(path: Path) -> int:
    """The row count from a .npy header, after checking the file holds all the bytes the header promises.

    Raises:
        ValueError: for a truncated file or a header that is not a numeric 2-D array.
    """
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        needed = handle.tell() + int(np.prod(shape)) * dtype.itemsize
    if len(shape) != 2 or dtype.hasobject:
        raise ValueError(f"expected a 2-D numeric array, found shape {shape} of {dtype}")
    if os.stat(path).st_size < needed:
        raise ValueError(f"truncated: {os.stat(path).st_size} of {needed} bytes")
    return shape[0]


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)
