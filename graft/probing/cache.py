"""The feature cache: spaces keyed by network, node and preprocessing; entries by path, size and mtime."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing
from graft.utils.files import atomic_write
from graft.utils.outputs import contained
from graft.utils.text import path_key

__all__ = [
    "FEATURE_FORMAT", "INDEX", "LEGACY_INDEX", "SHARD_IMAGES", "CacheSpace", "cache_folder", "default_cache_dir",
    "file_key", "space_key", "tensor_digests", "view_spaces", "weights_digest"
]

log = logging.getLogger(__name__)


FEATURE_FORMAT = 2  # 2: the weights part of the key covers only the modules a node's features depend on
INDEX, LEGACY_INDEX = "index.sqlite", "index.json"  # the JSON index (one file rewritten whole) is migrated on use
QUERY_KEYS = 900  # keys per IN (...) query: under SQLite's oldest bound-parameter limit (999)
SHARD_IMAGES = 4096  # features are flushed to a shard every this many images: a crash loses at most one shard
SHARD_NAMES = "shard-*.npy"  # the only names graft gives shards: an index row naming anything else is damaged


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


def tensor_digests(module: nn.Module) -> dict[str, bytes]:
    """{state-dict name: SHA-256 of that tensor's name, shape, dtype and values}: each tensor read once, however
    many node digests are then combined from them."""
    digests = {}
    for name, tensor in module.state_dict().items():
        digest = hashlib.sha256(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests[name] = digest.digest()
    return digests


def weights_digest(module: nn.Module, reached: set[str] | None = None,
                   tensors: dict[str, bytes] | None = None) -> str:
    """A content hash of the tensors in the module's state dict (names, shapes, dtypes and values).

    Args:
        reached: only the tensors of these submodules (names as ``named_modules`` spells them) and the module's
            own; None: every tensor.
        tensors: ``tensor_digests(module)`` when several digests of one module are wanted (computed here if None).
    """
    tensors = tensor_digests(module) if tensors is None else tensors
    digest = hashlib.sha256()
    for name, value in sorted(tensors.items()):
        if reached is not None and (owner := name.rpartition(".")[0]) and owner not in reached:
            continue
        digest.update(value)
    return digest.hexdigest()


def file_key(path: str) -> str:
    stat = os.stat(path)
    return f"{path_key(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def space_key(architecture: str, digest: str, node: str, pool: str, preprocessing: Preprocessing, view: int) -> str:
    identity = {"format": FEATURE_FORMAT, "architecture": architecture, "weights": digest, "node": node,
                "pool": pool, "preprocessing": preprocessing.to_dict(), "view": view}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def view_spaces(cache: Path, architecture: str, digests: dict[str, str], pool: str, preprocessing: Preprocessing,
                view: int) -> dict[str, CacheSpace]:
    """{node: its cache space} for one view, ``digests`` giving each node's weights digest (``node_digests``)."""
    return {node: CacheSpace(cache / space_key(architecture, digest, node, pool, preprocessing, view),
                             {"architecture": architecture, "node": node, "pool": pool, "view": view})
            for node, digest in digests.items()}


# ------------------------------------------------------------------------------------------------------------ one space


class CacheSpace:
    """One folder of features: ``index.sqlite`` → {file key: (shard, row)}, plus ``shard-*.npy`` files.

    The index is SQLite in WAL mode: a lookup is an indexed query and a shard's commit one transaction, so both
    cost the same at a million entries as at a thousand (``bench/bench_cache_index.py``), where the JSON index it
    replaces was read and rewritten whole on every shard. A killed write rolls back: the index never holds half a
    shard, and it only ever references shards already renamed into place.
    """

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

    @contextlib.contextmanager
    def _index(self):
        """The open index, created (and an older ``index.json`` migrated) on first use."""
        connection = self._open()
        try:
            yield connection
        finally:
            connection.close()

    def _open(self) -> sqlite3.Connection:
        """Connects; a damaged index is removed and started over, with a warning: the cache is rebuildable, a run
        that stops on it is not."""
        path = self.root / INDEX
        try:
            connection = _connect(path)
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):  # locked or unwritable: not damage, say so
                raise GraftError(f"{path}: cannot open the feature-cache index ({error}); check the cache folder is "
                                 "writable, or pass another --cache") from None
            log.warning("%s: unreadable feature-cache index (%s); extracting again", path, error)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            connection = _connect(path)
        if (self.root / LEGACY_INDEX).is_file():
            self._migrate(connection)
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        """Moves an ``index.json`` (graft before the SQLite index) into the database in one transaction, then
        removes it; a damaged one is dropped (its shards are extracted again)."""
        legacy = self.root / LEGACY_INDEX
        try:
            entries = json.loads(legacy.read_text()).get("entries", {})
            rows = [(key, shard, int(row)) for key, (shard, row) in entries.items()
                    if isinstance(key, str) and isinstance(shard, str)]  # the rest could not be bound: dropped
        except (OSError, ValueError, AttributeError, TypeError):
            log.warning("%s: unreadable feature-cache index; extracting again", legacy)
            rows = []
        with connection:  # one transaction: a kill here leaves index.json to migrate next time
            connection.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)", rows)
        legacy.unlink(missing_ok=True)

    def read_index(self) -> dict:
        """The whole index as {"entries": {key: [shard, row]}, "dim": D} (for inspection and tests; O(entries))."""
        with self._index() as db:
            entries = {key: [shard, row] for key, shard, row in db.execute("SELECT key, shard, row FROM entries")}
            dim = db.execute("SELECT value FROM meta WHERE name = 'dim'").fetchone()
        return {"format": FEATURE_FORMAT, "description": self.description, "entries": entries,
                **({"dim": int(dim[0])} if dim else {})}

    def lookup(self, keys: list[str]) -> tuple[dict[str, tuple[str, int]], list[str]]:
        with self._index() as db:
            entries = {}
            for start in range(0, len(keys), QUERY_KEYS):
                chunk = keys[start:start + QUERY_KEYS]
                query = f"SELECT key, shard, row FROM entries WHERE key IN ({','.join('?' * len(chunk))})"
                entries.update({key: (shard, row) for key, shard, row in db.execute(query, chunk)})
        shards = {shard for shard, _ in entries.values()}
        usable = {shard for shard in shards if self._shard_path(shard) is not None}
        rows = {shard: self._shard_rows(shard) for shard in usable}  # one header read per shard the keys use
        found = {k: entries[k] for k in keys if k in entries and entries[k][0] in usable
                 and _row_in(entries[k][1], rows[entries[k][0]])}
        return found, [k for k in keys if k not in found]

    def _shard_path(self, shard) -> Path | None:
        """The shard file an index row names, or None (with a warning) when the row is damaged: the index is data,
        so a name that is not one of graft's shard names in this folder — ``..``, an absolute path, a separator, a
        symbolic link — is never read or deleted; its images are extracted again."""
        try:
            if not isinstance(shard, str) or not fnmatch.fnmatchcase(shard, SHARD_NAMES):
                raise GraftError(f"{str(shard)!r:.100} is not a shard name ({SHARD_NAMES})")
            return contained(self.root, shard)
        except GraftError as error:
            log.warning("%s: damaged feature-cache index row: %s; ignored, its images are extracted again",
                        self.root / INDEX, error)
            return None

    def _shard_rows(self, shard: str) -> int:
        """Rows in a shard, 0 if it is missing; a damaged (truncated) shard is deleted once, with a warning, so its
        images are extracted again into a new shard and no later run trips over it. Only a file ``_shard_path``
        accepts is ever deleted: a plain ``shard-*.npy`` inside this folder, graft's own."""
        path = self._shard_path(shard)
        if path is None:
            return 0
        try:
            return _npy_rows(path)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            log.warning("%s: damaged feature-cache shard (%s); extracting its images again", path, error)
            path.unlink(missing_ok=True)
            return 0

    def add_shard(self, keys: list[str], features: np.ndarray) -> None:
        """Writes one shard atomically, then (under the lock, in one transaction) the index rows that reference it."""
        name = f"shard-{uuid.uuid4().hex[:12]}.npy"
        atomic_write(self.root / name, lambda temp: _save_npy(temp, features))
        with self.locked(), self._index() as db, db:
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
                           [(key, name, row) for row, key in enumerate(keys)])
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(int(features.shape[1])),))

    def gather(self, locations: list[tuple[str, int]]) -> np.ndarray:
        """Rows in the order given, read from memory-mapped shards (only the rows needed are paged in)."""
        shards: dict[str, np.ndarray] = {}
        rows = []
        for shard, row in locations:
            if shard not in shards:
                shards[shard] = np.load(contained(self.root, shard), mmap_mode="r")
            rows.append(shards[shard][row])
        return np.stack(rows) if rows else np.zeros((0, 0), np.float16)


def _row_in(row, rows: int) -> bool:
    """Whether an index row number is a real row of a shard with ``rows`` rows (a tampered index can hold text or a
    negative number, which numpy would read as a row from the end)."""
    return isinstance(row, int) and not isinstance(row, bool) and 0 <= row < rows


def _connect(path: Path, wait: float = 60.0) -> sqlite3.Connection:
    """Opens (creating) the index: WAL, so readers never block the writer; ``synchronous=FULL`` so a committed
    shard survives a power cut like the fsynced shard file it references.

    Processes opening a new index at once (ranks of one torchrun job) can meet SQLite's "database is locked" while
    one of them switches the file to WAL — a lock the busy timeout does not wait for — so that is retried for up to
    ``wait`` seconds before it is reported.
    """
    deadline, pause = time.monotonic() + wait, 0.02
    while True:
        try:
            return _connect_once(path)
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(1.0, pause * 2)


def _connect_once(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=60, isolation_level="DEFERRED")
    connection.text_factory = _text  # a tampered row's bytes must not stop a lookup with a decode error
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, shard TEXT NOT NULL, "
                           "row INTEGER NOT NULL) WITHOUT ROWID")
        connection.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        connection.commit()
    except BaseException:
        connection.close()
        raise
    return connection


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


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
