"""The feature-cache index at scale: one lookup and one shard commit with N entries already cached.

Compares the JSON index graft used before (``index.json``, read whole for a lookup and rewritten whole, fsynced,
for every shard) with the SQLite index that replaced it (``graft.probing.cache.CacheSpace``). A lookup asks for
one extraction batch of keys (``--batch``, half of them cached); an update commits one shard of ``SHARD_IMAGES``.

    python bench/bench_cache_index.py --entries 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from graft.probing.cache import SHARD_IMAGES, CacheSpace
from graft.utils.files import atomic_write


def _keys(start: int, count: int) -> list[str]:
    return [f"/data/imagenet/train/n{i % 1000:08d}/img_{i:08d}.JPEG|{100_000 + i}|{1_700_000_000_000_000_000 + i}"
            for i in range(start, start + count)]


def _json_index(root: Path, entries: int) -> None:
    index = {"format": 1, "description": {}, "entries": {k: [f"shard-{i // SHARD_IMAGES:06d}.npy", i % SHARD_IMAGES]
                                                          for i, k in enumerate(_keys(0, entries))}, "dim": 2}
    (root / "index.json").write_text(json.dumps(index))


def _json_lookup(root: Path, keys: list[str]) -> int:
    entries = json.loads((root / "index.json").read_text())["entries"]
    return sum(k in entries for k in keys)


def _json_update(root: Path, keys: list[str]) -> None:
    index = json.loads((root / "index.json").read_text())
    index["entries"].update({k: ["shard-new.npy", row] for row, k in enumerate(keys)})
    atomic_write(root / "index.json", lambda temp: Path(temp).write_text(json.dumps(index)))


def _sqlite_index(root: Path, entries: int) -> CacheSpace:
    space = CacheSpace(root, {})
    features = np.zeros((SHARD_IMAGES, 2), np.float16)
    for start in range(0, entries, SHARD_IMAGES):
        count = min(SHARD_IMAGES, entries - start)
        space.add_shard(_keys(start, count), features[:count])
    return space


def _timed(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096, help="keys per lookup")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    probe = _keys(args.entries - args.batch // 2, args.batch)  # half cached, half new
    shard = _keys(args.entries + args.batch, SHARD_IMAGES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "json").mkdir()
        start = time.perf_counter()
        _json_index(root / "json", args.entries)
        built = time.perf_counter() - start
        size = os.path.getsize(root / "json" / "index.json")
        rows.append(("JSON (before)", built, _timed(lambda: _json_lookup(root / "json", probe), args.repeats),
                     _timed(lambda: _json_update(root / "json", shard), args.repeats), size))
        start = time.perf_counter()
        space = _sqlite_index(root / "sqlite", args.entries)
        built = time.perf_counter() - start
        # the lookup's shard-header reads are the same for both indexes; time the index query alone
        space._shard_rows = lambda name: SHARD_IMAGES
        size = sum(p.stat().st_size for p in (root / "sqlite").glob("index.sqlite*"))
        rows.append(("SQLite (now)", built, _timed(lambda: space.lookup(probe), args.repeats),
                     _timed(lambda: space.add_shard(shard, np.zeros((SHARD_IMAGES, 2), np.float16)), args.repeats),
                     size))
    print(f"{args.entries:,} entries; lookup of {args.batch} keys; update of one {SHARD_IMAGES}-image shard "
          f"(best of {args.repeats})\n")
    print("| index | build (s) | lookup (ms) | update (ms) | size on disk (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, built, lookup, update, size in rows:
        print(f"| {name} | {built:.1f} | {lookup * 1000:.1f} | {update * 1000:.1f} | {size / 1e6:.0f} |")


if __name__ == "__main__":
    main()
