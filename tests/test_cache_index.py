"""The feature cache's SQLite index: migration from index.json, one transaction per shard, crash safety."""

import json
import multiprocessing
import os
import sqlite3

import numpy as np

from graft.probing.cache import INDEX, LEGACY_INDEX, CacheSpace


def test_an_old_json_index_is_migrated_once_and_removed(tmp_path):
    space = CacheSpace(tmp_path / "space", {})
    np.save(tmp_path / "space" / "shard-old.npy", np.arange(6, dtype=np.float16).reshape(3, 2))
    legacy = {"format": 1, "entries": {"a": ["shard-old.npy", 0], "b": ["shard-old.npy", 2]}, "dim": 2}
    (tmp_path / "space" / LEGACY_INDEX).write_text(json.dumps(legacy))
    found, missing = space.lookup(["a", "b", "c"])
    assert found == {"a": ("shard-old.npy", 0), "b": ("shard-old.npy", 2)} and missing == ["c"]
    assert not (tmp_path / "space" / LEGACY_INDEX).exists() and (tmp_path / "space" / INDEX).is_file()
    assert space.gather([found["b"], found["a"]]).tolist() == [[4, 5], [0, 1]]
    space.add_shard(["c"], np.ones((1, 2), np.float16))
    assert sorted(space.read_index()["entries"]) == ["a", "b", "c"] and space.read_index()["dim"] == 2


def test_a_damaged_json_index_is_dropped_not_fatal(tmp_path):
    space = CacheSpace(tmp_path / "space", {})
    (tmp_path / "space" / LEGACY_INDEX).write_text("{ half")
    assert space.lookup(["a"]) == ({}, ["a"])
    assert not (tmp_path / "space" / LEGACY_INDEX).exists()


def test_a_later_shard_replaces_a_keys_row(tmp_path):
    space = CacheSpace(tmp_path / "space", {})
    space.add_shard(["a", "b"], np.zeros((2, 2), np.float16))
    space.add_shard(["b"], np.full((1, 2), 7, np.float16))
    found, _ = space.lookup(["a", "b"])
    assert space.gather([found["a"], found["b"]]).tolist() == [[0, 0], [7, 7]]


def test_lookup_of_more_keys_than_one_query_binds(tmp_path):
    space = CacheSpace(tmp_path / "space", {})
    keys = [f"/data/img-{i}.jpg|10|{i}" for i in range(2500)]
    space.add_shard(keys, np.arange(5000, dtype=np.float16).reshape(2500, 2))
    found, missing = space.lookup(keys + ["absent"])
    assert len(found) == 2500 and missing == ["absent"] and found[keys[2499]][1] == 2499


def _killed_mid_commit(root: str) -> None:
    """Opens a transaction, writes rows for a shard, and dies before the commit (no clean-up runs)."""
    db = sqlite3.connect(os.path.join(root, INDEX), isolation_level=None)
    db.execute("BEGIN")
    db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", [(f"k{i}", "shard-never.npy", i)
                                                                     for i in range(1000)])
    os._exit(9)


def test_a_write_killed_mid_transaction_leaves_the_committed_index(tmp_path):
    space = CacheSpace(tmp_path / "space", {})
    space.add_shard(["a"], np.ones((1, 2), np.float16))
    process = multiprocessing.get_context("spawn").Process(target=_killed_mid_commit, args=(str(space.root),))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    assert list(space.read_index()["entries"]) == ["a"]  # none of the uncommitted rows
    space.add_shard(["b"], np.ones((1, 2), np.float16))  # and the index is writable again
    assert space.lookup(["a", "b"])[1] == []


def _open_index(path, barrier):
    from graft.probing.cache import _connect

    barrier.wait()
    _connect(path).close()


def test_processes_creating_the_index_at_once_all_open_it(tmp_path):
    """Ranks of one torchrun job create a new index together: the switch to WAL can meet "database is locked", which
    SQLite's busy timeout does not wait for; opening retries, so no rank fails (the CI saw one do so before)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(10):
        barrier = context.Barrier(4)
        path = tmp_path / f"trial-{trial}" / "index.sqlite"
        path.parent.mkdir()
        openers = [context.Process(target=_open_index, args=(path, barrier)) for _ in range(4)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(60)
        assert [opener.exitcode for opener in openers] == [0] * 4, trial
