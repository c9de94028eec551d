"""`graft suggest` and `graft serve --label`: the selection maths on NumPy, one CLI run, the labelling page."""

from __future__ import annotations

import csv
import math
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from graft.cli import app
from graft.data.discovery import discover
from graft.errors import GraftError
from graft.probing.acquisition import entropy, k_center_greedy, margin, select

HOSTILE = "<img src=x onerror=alert(1)>.png"


def test_margin_and_entropy_match_a_hand_computation():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])
    assert margin(p) == pytest.approx([1 - (0.7 - 0.2), 1.0, 0.0])
    by_hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    two_way = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)) / math.log(3)
    assert entropy(p) == pytest.approx([by_hand, two_way, 0.0])


@pytest.mark.parametrize("by", ["margin", "entropy"])
def test_uncertainty_ranks_the_planted_ambiguous_points_first(by):
    rng = np.random.default_rng(0)
    sure = rng.dirichlet([20, 1, 1], size=60)  # confident rows
    planted = np.array([[0.34, 0.33, 0.33], [0.45, 0.45, 0.1], [0.4, 0.39, 0.21], [0.36, 0.34, 0.3]])
    probabilities = np.concatenate([sure[:30], planted, sure[30:]])
    features = rng.normal(size=(len(probabilities), 8))
    chosen = select(probabilities, features, 4, by=by, candidates=1)
    assert sorted(chosen.indices) == [30, 31, 32, 33]


def test_k_center_spreads_over_two_clusters_of_uncertain_points():
    rng = np.random.default_rng(1)
    centre_a, centre_b = np.eye(16)[0] * 10, np.eye(16)[1] * 10
    features = np.concatenate([centre_a + rng.normal(0, 0.1, (20, 16)), centre_b + rng.normal(0, 0.1, (20, 16))])
    # cluster A is a little more uncertain than B: uncertainty alone takes A only
    gap = np.concatenate([np.full(20, 0.02), np.full(20, 0.06)]) + rng.uniform(0, 0.005, 40)
    probabilities = np.stack([(1 + gap) / 2, (1 - gap) / 2], axis=1)
    assert all(i < 20 for i in select(probabilities, features, 6, candidates=1).indices)
    chosen = select(probabilities, features, 6, candidates=5)
    assert {i < 20 for i in chosen.indices} == {True, False}


def test_k_center_keeps_away_from_what_is_labelled():
    features = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    assert k_center_greedy(features, 1, labelled=np.array([[1.0, 0.0]]))[0] in (2, 3)
    assert k_center_greedy(features, 1, labelled=np.array([[0.0, 1.0]]))[0] in (0, 1)


def test_suggestions_are_distinct_from_the_pool_and_spread_over_classes():
    rng = np.random.default_rng(2)
    classes = np.repeat(np.arange(3), 30)
    features = np.eye(3)[classes] * 5 + rng.normal(0, 0.2, (90, 3))
    features[10:20] = features[10]  # exact duplicates must not be picked twice
    logits = np.eye(3)[classes] * rng.uniform(0.2, 2.0, (90, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    chosen = select(probabilities, features, 12)
    assert len(set(chosen.indices)) == 12 and all(0 <= i < 90 for i in chosen.indices)
    assert set(chosen.predicted) == {0, 1, 2}
    assert chosen.predicted == [int(probabilities[i].argmax()) for i in chosen.indices]
    assert len(select(probabilities[:5], features[:5], 12).indices) == 5  # a pool smaller than N: all of it


@pytest.fixture
def pool(shapes, tmp_path):
    """Nine unlabelled images (three per class) in one folder, one with a hostile name."""
    folder = tmp_path / "pool"
    folder.mkdir()
    for kind in ("circle", "square", "triangle"):
        for path in sorted((shapes / "val" / kind).iterdir())[:3]:
            shutil.copy(path, folder / f"{kind}-{path.name}")
    first = sorted(folder.iterdir())[0]
    first.rename(folder / HOSTILE)
    return folder


def test_cli_suggest_writes_the_csv_and_an_escaped_page(trained_run, pool, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["suggest", str(trained_run), str(pool), "-n", "4", "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "keep away from 102 labelled images" in result.output  # k-center starts from the run's own data
    with open(out / "suggestions.csv", newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["path", "predicted", "score"]
        rows = list(reader)
    pool_files = {os.path.abspath(p) for p in pool.iterdir()}
    assert len(rows) == 4 and len({row[0] for row in rows}) == 4 and {row[0] for row in rows} <= pool_files
    assert all(row[1] in ("circle", "square", "triangle") and 0 <= float(row[2]) <= 1 for row in rows)
    page = (out / "suggestions.html").read_text()
    assert page.count("<figure>") == 4 and "<img src=x" not in page
    assert sorted(p.name for p in pool.iterdir())[0] == HOSTILE  # the pool is untouched
    again = CliRunner().invoke(app, ["suggest", str(trained_run), str(pool), "-n", "4", "-o", str(out),
                                     "--device", "cpu"])
    assert again.exit_code == 0 and "9 read from the cache" in again.output
    refused = CliRunner().invoke(app, ["suggest", str(trained_run), str(pool), "-o", str(pool / "out")])
    assert refused.exit_code != 0 and "pool" in refused.output and not (pool / "out").exists()


def test_labelled_centres_are_the_run_s_own_images(trained_run, shapes):
    from graft.analysis.suggest import labelled_images

    expected = sorted(os.path.abspath(p) for p in shapes.rglob("*.png"))
    assert labelled_images(trained_run, None) == (expected, [])
    assert labelled_images(trained_run, "") == ([], [])
    assert labelled_images(trained_run, shapes / "val")[0] == sorted(p for p in expected if "/val/" in p)


@pytest.fixture
def label_client(trained_run, pool, tmp_path):
    from fastapi.testclient import TestClient

    from graft.deploy.labelling import create_label_app

    outside = tmp_path / "secret.png"
    shutil.copy(next(p for p in pool.iterdir() if p.name != HOSTILE), outside)
    (pool / "zz-link.png").symlink_to(outside)
    labels = tmp_path / "labelled" / "labels.csv"
    with TestClient(create_label_app(trained_run, pool, labels)) as client:
        yield client, labels


def test_labels_posted_on_the_page_are_a_manifest_graft_fit_reads(label_client):
    client, labels = label_client
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'sha256-" in page.headers["content-security-policy"]
    items = client.get("/label/items").json()
    assert items["classes"] == ["circle", "square", "triangle"] and len(items["items"]) == 10
    by_name = {item["name"]: item["id"] for item in items["items"]}
    names = sorted(name for name in by_name if name.startswith(("circle", "square")))[:4]
    chosen = dict(zip(names, ["circle", "circle", "square", "triangle"]))
    for name, label in chosen.items():
        assert client.post("/label", json={"id": by_name[name], "label": label}).status_code == 200
    last = next(iter(chosen))
    chosen[last] = "square"  # labelling again replaces the label
    assert client.post("/label", json={"id": by_name[last], "label": "square"}).json()["labelled"] == 4
    assert client.post("/label", json={"id": 0, "label": "dog"}).status_code == 400
    assert client.post("/label", json={"id": 99, "label": "circle"}).status_code == 400
    splits = discover(labels)
    found = {os.path.basename(path): splits.classes[label] for path, label in splits.train + splits.val}
    assert found == chosen


def test_the_label_page_shows_pool_images_only(label_client):
    client, _ = label_client
    items = client.get("/label/items").json()["items"]
    inside = next(item["id"] for item in items if item["name"].startswith("square"))
    image = client.get(f"/label/image/{inside}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    link = next(item["id"] for item in items if item["name"] == "zz-link.png")
    assert client.get(f"/label/image/{link}").status_code == 404  # a link out of the pool
    for url in ("/label/image/..%2F..%2Fetc%2Fpasswd", "/label/image/../../etc/passwd", "/label/image/99",
                "/label/image/-1"):
        assert client.get(url).status_code == 404, url


def test_a_labels_file_graft_did_not_write_is_refused(trained_run, pool, tmp_path):
    from graft.deploy.labelling import create_label_app

    foreign = tmp_path / "notes.csv"
    foreign.write_text("name,comment\na,b\n")
    with pytest.raises(GraftError, match="not a labels file graft wrote"):
        create_label_app(trained_run, pool, foreign)
    assert foreign.read_text() == "name,comment\na,b\n"


def test_a_pool_csv_keeps_its_paths_inside_its_folder(pool, tmp_path):
    from graft.data.pool import read_pool

    listing = pool / "list.csv"
    name = sorted(p.name for p in pool.iterdir() if p.suffix == ".png")[1]
    listing.write_text(f"path,note\n{name},x\n{pool / name},duplicate\n")
    assert read_pool(listing).paths == [os.path.abspath(pool / name)]
    for row in ("../secret.png", str(tmp_path / "secret.png")):
        listing.write_text(f"path\n{name}\n{row}\n")
        with pytest.raises(GraftError, match="line 3"):
            read_pool(listing)


def test_labels_go_into_the_pool_folder_only_when_asked(trained_run, pool, monkeypatch):
    from graft.deploy.labelling import create_label_app

    monkeypatch.chdir(pool)
    with pytest.raises(GraftError, match="--labels-out"):
        create_label_app(trained_run, pool)
    assert not (pool / "labels.csv").exists()
    create_label_app(trained_run, pool, pool / "labels.csv")  # asked for: allowed (written on the first label)


def test_cold_start_picks_the_typical_image_of_each_uncovered_cluster():
    """Three tight clusters and a few scattered outliers; cluster 0 is labelled. Two picks: one from each of the
    other clusters, each its densest point (the point nearest its cluster's own mean, computed here), never an
    outlier — where uncertainty + k-center, with a probe that finds the outliers most uncertain, takes outliers."""
    from graft.probing.typical import typical_picks

    rng = np.random.default_rng(3)
    centres = np.eye(8)[:3] * 10
    clusters = [centres[c] + rng.normal(0, 0.5, (40, 8)) for c in range(3)]
    outliers = rng.normal(0, 1, (4, 8)) * 6 + 20
    features = np.concatenate([*clusters, outliers])
    labelled = clusters[0][:2]
    picks = typical_picks(features, 2, labelled)
    assert sorted(p // 40 for p in picks) == [1, 2]
    for p in picks:
        members = features[(p // 40) * 40:(p // 40 + 1) * 40]
        densest = np.argmin(((members[:, None] - members[None]) ** 2).sum(-1).mean(1))
        radius = np.linalg.norm(members - members.mean(0), axis=1).mean()
        assert np.linalg.norm(features[p] - members[densest]) <= radius
    probabilities = np.tile([[0.9, 0.1]], (len(features), 1))
    probabilities[120:] = [0.5, 0.5]  # the outliers are the most uncertain
    cold = select(probabilities, features, 2, labelled=labelled)  # 2 labels, 2 classes: below COLD_START a class
    assert cold.method == "typical" and sorted(p // 40 for p in cold.indices) == [1, 2]
    warm = select(probabilities, features, 2, labelled=labelled, cold_start=0)
    assert warm.method == "k-center" and all(p >= 120 for p in warm.indices)
