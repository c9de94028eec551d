"""Near copies confirmed at the pixels: a resized, re-encoded copy whose features fall under the cosine threshold is
found, a look-alike above it is not, and `graft evaluate`'s check finds such a copy from features in the cache.

Features are made with numpy (the cosines are set, not computed by a network); images are random textures the
tests draw, the copies resized and JPEG re-encoded as the benchmark's are.
"""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from graft.analysis.leaks import LEAKS_FILE, training_near_copies, warn_near_copies
from graft.data.duplicates import centred_unit, near_copies, neighbours
from graft.probing.cache import CacheSpace, file_key


def _textures(folder, count: int, seed: int = 0) -> list[str]:
    """``count`` different pictures: smooth random blobs at 64 px (JPEG keeps them, unlike pixel noise)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        path = folder / f"{index:03d}.png"
        Image.fromarray(small).resize((64, 64), Image.BICUBIC).save(path)
        paths.append(str(path))
    return paths


def _copy(source: str, target) -> str:
    with Image.open(source) as image:
        image.convert("RGB").resize((57, 57), Image.BICUBIC).save(target, "JPEG", quality=80)
    return str(target)


def _features(count: int, pairs: dict[int, tuple[int, float]], dim: int = 64, seed: int = 1) -> np.ndarray:
    """Random vectors, with row ``b`` at cosine ``c`` (after centring, to a few thousandths) of row ``a`` for each
    ``b: (a, c)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, dim))
    for b, (a, cosine) in pairs.items():
        noise = rng.normal(size=dim)
        noise -= noise @ x[a] / (x[a] @ x[a]) * x[a]
        x[b] = cosine * x[a] / np.linalg.norm(x[a]) + np.sqrt(1 - cosine ** 2) * noise / np.linalg.norm(noise)
        x[b] *= np.linalg.norm(x[a])
    return x.astype(np.float32)


def test_a_copy_under_the_threshold_is_found_and_a_look_alike_over_it_is_not(tmp_path):
    paths = _textures(tmp_path, 40)
    paths[30] = _copy(paths[3], tmp_path / "copy-003.jpg")  # the same picture, its features at cosine 0.90
    # image 20 is another picture whose features sit at cosine 0.97 of image 7's: a look-alike (two digits "1")
    features = _features(40, {30: (3, 0.90), 20: (7, 0.97)})
    unit = centred_unit(features)
    found = neighbours(unit, 0.95, k=5)
    assert {tuple(p) for p in found.pairs.tolist()} == {(7, 20)}  # features alone: the look-alike, not the copy
    confirmed = near_copies(found, unit, paths, 0.95)
    assert [tuple(p) for p in confirmed.pairs.tolist()] == [(3, 30)]
    assert confirmed.similarity[0] > 0.99  # the pictures' correlation, the cue that decided


def test_a_pair_that_cannot_be_compared_keeps_the_features_verdict(tmp_path):
    paths = _textures(tmp_path, 12)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths[5] = str(tmp_path / "broken.png")
    features = _features(12, {5: (1, 0.97), 9: (2, 0.90)})
    unit = centred_unit(features)
    confirmed = near_copies(neighbours(unit, 0.95, k=3), unit, paths, 0.95)
    assert [tuple(p) for p in confirmed.pairs.tolist()] == [(1, 5)]  # 2 and 9 are different pictures


def test_the_nearest_index_matches_brute_force():
    rng = np.random.default_rng(3)
    unit = centred_unit(rng.normal(size=(90, 8)))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.argsort(-similarity, 1, kind="stable")[:, :3]
    exact = neighbours(unit, 0.99, k=3, block=17)
    assert np.array_equal(exact.nearest_index[:, 0], expected[:, 0])
    assert np.allclose(np.take_along_axis(similarity, exact.nearest_index, 1), exact.nearest, atol=1e-5)
    # the approximate index may miss a neighbour in a cell it does not search: its nearest image is the true one for
    # nearly every row, and the similarity it reports is that pair's
    approximate = neighbours(unit, 0.99, k=3, exact_limit=10)
    assert approximate.method == "faiss-ivf"
    assert np.mean(approximate.nearest_index[:, 0] == expected[:, 0]) >= 0.95
    assert np.allclose(np.take_along_axis(similarity, approximate.nearest_index, 1), approximate.nearest, atol=1e-5)


def _cached(cache, paths: list[str], features: np.ndarray) -> None:
    CacheSpace(cache / "space", {}).add_shard([file_key(p) for p in paths], features.astype(np.float16))


def test_evaluate_check_finds_a_near_copy_from_the_cached_features(tmp_path):
    train = _textures(tmp_path / "data" / "train" / "blob", 24)
    val = _textures(tmp_path / "data" / "val" / "blob", 8, seed=5)
    val[6] = _copy(train[4], tmp_path / "data" / "val" / "blob" / "copy.jpg")
    (tmp_path / "data" / "val" / "blob" / "006.png").unlink()
    features = _features(32, {6: (8 + 4, 0.88)})  # rows: val then train, as the check orders them
    cache = tmp_path / "cache"
    assert training_near_copies(val, train, cache) is None  # nothing cached: skipped, not extracted
    _cached(cache, val + train, features)
    assert [(a, b) for a, b, _ in training_near_copies(val, train, cache)] == [(val[6], train[4])]
    lines: list[str] = []
    count = warn_near_copies(tmp_path / "data", "val", tmp_path, lines.append, cache)
    assert count == 1 and len(lines) == 1 and lines[0].startswith("warning: 1 evaluated image(s) are near copies")
    with open(tmp_path / LEAKS_FILE, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path_a", "path_b", "similarity", "kind"] and rows[1][:2] == [val[6], train[4]]
    assert rows[1][3] == "near-leak"


def test_cli_evaluate_warns_about_a_near_copy_when_the_cache_holds_features(trained_run, shapes, tmp_path,
                                                                            monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from graft.cli import app

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    copy = _copy(str(data / "train" / "square" / "002.png"), data / "val" / "square" / "copied.jpg")
    val = sorted(str(p) for p in (data / "val").glob("*/*"))
    train = sorted(str(p) for p in (data / "train").glob("*/*"))
    original = train.index(str(data / "train" / "square" / "002.png"))
    features = _features(len(val) + len(train), {val.index(copy): (len(val) + original, 0.9)})
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))
    _cached(tmp_path / "cache", val + train, features)
    done = CliRunner().invoke(app, ["evaluate", str(trained_run), str(data), "--split", "val", "-o",
                                    str(tmp_path / "eval"), "--no-report", "--runtime", "torch"])
    assert done.exit_code == 0, done.output
    assert "near copies of training images" in done.output and LEAKS_FILE in done.output
    with open(tmp_path / "eval" / LEAKS_FILE, newline="") as handle:
        rows = list(csv.reader(handle))
    assert [copy, str(data / "train" / "square" / "002.png")] in [row[:2] for row in rows[1:]]
