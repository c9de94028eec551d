"""A path graft reads from a file (feature-cache index, scan cache, CSV manifest) never leads outside its folder, and
nothing outside graft's own folders is read or deleted because a file said so (issue 22, cases 2 and 7)."""

import json
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_shapes
from typer.testing import CliRunner

from graft import cli
from graft.data.discovery import discover
from graft.data.scan import ScanCache, scan
from graft.errors import GraftError
from graft.probing.cache import INDEX, CacheSpace


def fingerprint(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Size, mtime and bytes of every file below ``root`` (read without following links)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.read_bytes())
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture
def victim(tmp_path) -> Path:
    """A user's folder beside the cache, holding a file that is not a valid shard (so a "damaged shard" clean-up
    would delete it) and one that is (so a lookup would read features from it)."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "important.npy").write_bytes(b"precious, not an array")
    np.save(folder / "features.npy", np.full((4, 2), 9, np.float16))
    return folder


def _tamper(index: Path, shard: str) -> None:
    with sqlite3.connect(index) as db:
        db.execute("UPDATE entries SET shard = ?", (shard,))
    db.close()


def _targets(space: Path, victim: Path) -> dict[str, str]:
    """Each way an index row can point outside its space folder; the symlink lives inside the space."""
    (space / "shard-linked00000.npy").symlink_to(victim / "features.npy")  # a lookup would read it
    return {"relative": "../victim/important.npy", "absolute": str(victim / "important.npy"),
            "symlink": "shard-linked00000.npy", "valid array outside": str(victim / "features.npy"),
            "not a shard name": INDEX}


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink", "valid array outside", "not a shard name"])
def test_an_index_row_leaving_the_cache_is_ignored_never_read_or_deleted(tmp_path, victim, kind, caplog):
    space = CacheSpace(tmp_path / "space", {})
    space.add_shard(["a", "b"], np.zeros((2, 2), np.float16))
    shard = _targets(tmp_path / "space", victim)[kind]
    _tamper(tmp_path / "space" / INDEX, shard)
    before = fingerprint(victim)
    with caplog.at_level(logging.WARNING):
        found, missing = space.lookup(["a", "b"])
    assert (found, missing) == ({}, ["a", "b"])  # extracted again, never read from the victim
    assert fingerprint(victim) == before and (victim / "important.npy").is_file()
    assert (tmp_path / "space" / INDEX).is_file()  # not taken for a damaged shard and deleted either
    warned = [r.getMessage() for r in caplog.records if "damaged feature-cache index row" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    space.add_shard(["a", "b"], np.ones((2, 2), np.float16))  # the re-extraction replaces the rows
    found, _ = space.lookup(["a", "b"])
    assert space.gather([found["a"], found["b"]]).tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize("row", [-1, "one"])
def test_an_index_row_number_outside_the_shard_is_ignored(tmp_path, row):
    space = CacheSpace(tmp_path / "space", {})
    space.add_shard(["a", "b"], np.arange(4, dtype=np.float16).reshape(2, 2))
    with sqlite3.connect(tmp_path / "space" / INDEX) as db:
        db.execute("UPDATE entries SET row = ? WHERE key = 'b'", (row,))
    db.close()
    found, missing = space.lookup(["a", "b"])
    assert found == {"a": (found["a"][0], 0)} and missing == ["b"]  # -1 would read row 1 of 2, silently


@pytest.mark.parametrize("value", ["x'2e2e2f76696374696d2f696d706f7274616e742e6e7079'",  # a BLOB: ../victim/...
                                   "CAST(x'73686172642dff2e6e7079' AS TEXT)"])  # "shard-\xff.npy", not UTF-8
def test_an_index_row_of_bytes_is_ignored_not_an_error(tmp_path, victim, value):
    space = CacheSpace(tmp_path / "space", {})
    space.add_shard(["a"], np.zeros((1, 2), np.float16))
    with sqlite3.connect(tmp_path / "space" / INDEX) as db:
        db.execute(f"UPDATE entries SET shard = {value}")
    db.close()
    before = fingerprint(victim)
    assert space.lookup(["a"]) == ({}, ["a"]) and fingerprint(victim) == before


def test_graft_features_with_a_tampered_index_leaves_the_victim_alone(tmp_path, victim, caplog):
    data = make_shapes(tmp_path / "data", splits={"train": 4, "val": 2}, seed=3)
    cache = tmp_path / "cache"
    args = ["features", str(data), "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32",
            "--workers", "0", "--cache", str(cache)]
    first = CliRunner().invoke(cli.app, args)
    assert first.exit_code == 0, first.output
    indexes = sorted(cache.rglob(INDEX))
    assert indexes
    for index in indexes:  # cache/SPACE/index.sqlite: ../../victim is the victim folder
        _tamper(index, "../../victim/important.npy")
    before = fingerprint(victim)
    with caplog.at_level(logging.WARNING):
        second = CliRunner().invoke(cli.app, args)
    assert second.exit_code == 0, second.output
    assert fingerprint(victim) == before
    assert any("damaged feature-cache index row: '../../victim/important.npy'" in r.getMessage()
               for r in caplog.records)


def test_contained_refuses_every_way_out(tmp_path):
    from graft.utils.outputs import contained

    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link").symlink_to(tmp_path)
    assert contained(tmp_path / "inside", "shard-1.npy") == tmp_path / "inside" / "shard-1.npy"
    assert contained(tmp_path, "a/b.png", nested=True) == tmp_path / "a" / "b.png"
    for name, options in [("../x", {}), ("/etc/passwd", {}), ("a/b", {}), ("..", {}), ("", {}), ("x\0y", {}),
                          ("a/../../x", {"nested": True}), ("link", {}), ("link/x", {"nested": True})]:
        with pytest.raises(GraftError):
            contained(tmp_path / "inside", name, **options)
    assert contained(tmp_path / "inside", "link/x", nested=True, links=True)  # a user's data laid out with links


def test_overwrite_never_removes_a_folder_a_tampered_output_manifest_names(tmp_path, victim):
    from graft.utils.outputs import MANIFEST, output_folder, read_manifest

    out = output_folder(tmp_path / "out")
    (out / "photos").mkdir()
    (out / "photos" / "a.jpg").write_bytes(b"the user's photo")
    (out / "mlruns").mkdir()  # what graft does hand whole to MLflow, and removes whole
    (out / MANIFEST).write_text(json.dumps(["photos/", "mlruns/", "../victim/important.npy", str(victim) + "/"]))
    assert read_manifest(out) == ["photos/", "mlruns/"]
    before = fingerprint(tmp_path)
    output_folder(out, overwrite=True)
    assert not (out / "mlruns").exists()
    assert {k: v for k, v in fingerprint(tmp_path).items() if MANIFEST not in k} == \
        {k: v for k, v in before.items() if MANIFEST not in k}


def test_overwrite_removes_the_wandb_folder_it_handed_out_but_never_follows_a_link_of_that_name(tmp_path, victim):
    """`--log wandb` made `wandb/` the second folder graft removes whole: only a real folder of that name inside the
    run folder, listed in graft's manifest; a link named `wandb` pointing at a user's folder leaves it untouched."""
    from graft.utils.outputs import MANIFEST, output_folder

    out = output_folder(tmp_path / "out")
    (out / "wandb" / "offline-run-1").mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps(["wandb/"]))
    output_folder(out, overwrite=True)
    assert not (out / "wandb").exists()
    linked = output_folder(tmp_path / "linked")
    (linked / "wandb").symlink_to(victim, target_is_directory=True)
    (linked / MANIFEST).write_text(json.dumps(["wandb/"]))
    before = fingerprint(victim)
    output_folder(linked, overwrite=True)
    assert fingerprint(victim) == before


# ------------------------------------------------------------------------------------------------------ scan cache


def test_the_scan_cache_keeps_a_bad_file_whose_name_is_not_utf8(tmp_path):
    data = make_shapes(tmp_path / "data", per_class=8, size=16)
    bad = os.path.join(os.fsencode(data / "circle"), b"caf\xe9.png")
    with open(bad, "wb") as handle:
        handle.write(b"not an image")
    cache = ScanCache(tmp_path / "scan")
    first = scan(discover(data), cache=cache)
    assert [path for path, _ in first.skipped] == [os.fsdecode(bad)]
    assert os.fsdecode(bad) in first.skipped[0][1]  # the reason names the file, byte for byte
    with sqlite3.connect(cache.path) as db:
        assert db.execute("SELECT COUNT(*) FROM checks").fetchone()[0] == 25  # stored, the bad verdict too
    db.close()
    again = scan(discover(data), cache=cache)
    assert again.skipped == first.skipped


# ------------------------------------------------------------------------------------------------------ CSV manifests


def test_a_csv_path_climbing_out_of_its_folder_is_refused_naming_the_line(tmp_path):
    make_shapes(tmp_path / "img", per_class=4, seed=5)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "labels.csv"
    rows = [f"../img/{c}/{i:03d}.png,{c}" for c in ("circle", "square") for i in range(4)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(GraftError, match=rf"^{manifest}, line 2: the path '\.\./img/circle/000\.png' climbs out"
                       ) as caught:
        discover(manifest)
    assert "\n" not in str(caught.value)


def test_a_csv_may_list_absolute_paths_and_paths_inside_its_folder(tmp_path):
    make_shapes(tmp_path / "img", per_class=4, seed=5)
    rows = [f"img/circle/{i:03d}.png,circle" for i in range(4)]
    rows += [f"{tmp_path / 'img' / 'square'}/{i:03d}.png,square" for i in range(4)]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    splits = discover(tmp_path / "labels.csv", seed=0)
    assert len(splits.train) + len(splits.val) == 8 and splits.classes == ["circle", "square"]
