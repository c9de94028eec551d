"""`graft audit`: label issues from out-of-fold probe probabilities (cleanlab), exact and near duplicates, leaks
across splits, outliers, the page, the CLI and the missing-extra message.

The maths is tested on numpy features with planted answers (flipped labels, copies, a far point) and against
brute-force numpy; one CLI run on the shapes covers the whole pipeline.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from graft.analysis.audit import AuditResult, duplicate_rows, find_label_issues, outlier_scores, write_audit_page
from graft.cli import app
from graft.data.duplicates import centred_unit, content_digests, copies_between, exact_pairs, neighbours
from graft.probing.linear import fit_linear_probe

ROOT = Path(__file__).resolve().parents[1]


def _clusters(per_class: int = 40, classes: int = 3, dim: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_flipped_labels_are_found_first_and_match_cleanlab_on_the_same_probabilities():
    from cleanlab.filter import find_label_issues as cleanlab_issues

    features, labels = _clusters()
    flipped = np.array([3, 50, 97, 110])
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + 1) % 3
    probe = fit_linear_probe(features, noisy, classes=3, cv=5)
    assert probe.out_of_fold.shape == (len(labels), 3)
    assert np.allclose(probe.out_of_fold.sum(1), 1)
    issues = find_label_issues(probe.out_of_fold, noisy)
    assert sorted(i for i, _, _ in issues[:len(flipped)]) == sorted(flipped.tolist())
    assert all(suggested == labels[i] for i, suggested, _ in issues[:len(flipped)])  # the true class is suggested
    expected = cleanlab_issues(noisy, probe.out_of_fold, return_indices_ranked_by="self_confidence")
    assert [i for i, _, _ in issues] == list(expected)
    quality = [score for _, _, score in issues]
    assert quality == sorted(quality)  # self-confidence: lowest p(given) first
    assert np.allclose(quality, probe.out_of_fold[[i for i, _, _ in issues], noisy[[i for i, _, _ in issues]]])


def _brute_force(unit: np.ndarray, threshold: float, k: int):
    similarity = unit @ unit.T
    i, j = np.triu_indices(len(unit), 1)
    keep = similarity[i, j] >= threshold
    pairs = {(int(a), int(b)) for a, b in zip(i[keep], j[keep])}
    np.fill_diagonal(similarity, -np.inf)
    return pairs, -np.sort(-similarity, 1)[:, :k]


def test_blocked_search_equals_brute_force_all_pairs():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(150, 6)).astype(np.float32)
    vectors[100:110] = vectors[:10] + rng.normal(scale=0.05, size=(10, 6))  # planted near copies
    unit = centred_unit(vectors)
    found = neighbours(unit, threshold=0.9, k=4, block=37)  # blocks that do not divide N
    pairs, nearest = _brute_force(unit, 0.9, 4)
    assert found.method == "exact"
    assert {tuple(p) for p in found.pairs.tolist()} == pairs and len(found.pairs) == len(pairs)
    assert {(a, a + 100) for a in range(10)} <= pairs
    assert np.allclose(found.nearest, nearest, atol=1e-5)
    assert np.all(np.diff(found.similarity) <= 0)
    assert np.allclose(found.similarity, np.sum(unit[found.pairs[:, 0]] * unit[found.pairs[:, 1]], 1), atol=1e-5)


def test_blocked_nearest_over_many_blocks_equals_brute_force():
    # 30 column blocks a row: after the first ones only the entries beating a row's k-th best are merged
    unit = centred_unit(np.random.default_rng(4).normal(size=(480, 10)))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.argsort(-similarity, 1, kind="stable")[:, :6]
    found = neighbours(unit, 0.99, k=6, block=16)
    assert np.array_equal(found.nearest_index, expected)
    assert np.allclose(found.nearest, np.take_along_axis(similarity, expected, 1), atol=1e-6)


def test_csv_files_keep_a_name_that_is_not_utf8_and_quote_formulas(tmp_path):
    from graft.utils.files import write_csv
    from graft.utils.text import safe_record

    name = os.fsdecode(b"=cmd|caf\xe9.png")  # Latin-1 bytes: not UTF-8, kept as surrogates
    write_csv(tmp_path / "rows.csv", ["path", "score"], [safe_record({"path": name, "score": 0.5})])
    assert (tmp_path / "rows.csv").read_bytes() == b"path,score\r\n'=cmd|caf\xe9.png,0.5\r\n"


def test_the_approximate_index_finds_the_planted_pairs():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(400, 32)).astype(np.float32)
    planted = [(5, 300), (17, 250), (42, 399), (100, 101)]
    for a, b in planted:
        vectors[b] = vectors[a] + rng.normal(scale=0.02, size=32)
    found = neighbours(centred_unit(vectors), threshold=0.95, k=5, exact_limit=50)  # forced onto the index
    assert found.method == "faiss-ivf"
    assert {tuple(p) for p in found.pairs.tolist()} == set(planted)  # random 32-d vectors are far from each other
    assert found.nearest.shape == (400, 5)


def test_missing_faiss_is_one_line_naming_the_extra():
    code = ("import sys\nsys.modules['faiss'] = None\nimport numpy as np\n"
            "from graft.data.duplicates import neighbours\nfrom graft.errors import GraftError\n"
            "try:\n    neighbours(np.eye(6, dtype=np.float32), exact_limit=3)\n"
            "except GraftError as error:\n    print(error)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "6 images need an approximate neighbour index: pip install 'graft[audit]' (faiss-cpu)"


def test_exact_duplicates_by_content_and_copies_between_splits(tmp_path):
    (tmp_path / "a.png").write_bytes(b"same bytes")
    (tmp_path / "b.png").write_bytes(b"same bytes")
    (tmp_path / "c.png").write_bytes(b"same bytez")  # same size, other bytes: not a copy
    (tmp_path / "d.png").write_bytes(b"same bytes")
    paths = [str(tmp_path / name) for name in ("a.png", "b.png", "c.png", "d.png")]
    assert exact_pairs(content_digests(paths)) == [(0, 1), (0, 3)]
    assert copies_between(paths[2:], paths[:2]) == [(paths[3], paths[0])]


def test_pairs_across_splits_are_leaks():
    from graft.data.duplicates import Neighbours

    paths = ["t0", "t1", "v0", "v1"]
    found = Neighbours(np.array([[0, 2], [0, 1]]), np.array([0.99, 0.97], np.float32), np.zeros((4, 0)), "exact")
    rows = duplicate_rows(paths, ["train", "train", "val", "val"], ["x", "y", "z", "y"], found)
    assert [(r["path_a"], r["path_b"], r["kind"]) for r in rows] == [
        ("t1", "v1", "exact-leak"), ("t0", "v0", "near-leak"), ("t0", "t1", "near")]


def test_a_far_point_is_the_top_outlier():
    features, _ = _clusters(per_class=30)
    features = np.vstack([features, np.full((1, features.shape[1]), 25.0) * np.sign(np.arange(12) % 2 - 0.5)])
    found = neighbours(centred_unit(features), k=5)
    scores = outlier_scores(found.nearest)
    assert int(np.argmax(scores)) == len(features) - 1


def test_the_page_escapes_a_hostile_file_name(tmp_path):
    hostile = tmp_path / "<img src=x onerror=alert(1)>.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(hostile, format="PNG")
    result = AuditResult(tmp_path, [{"path": str(hostile), "given": "<b>cat", "suggested": "dog", "score": 0.01}],
                         [{"path_a": str(hostile), "path_b": str(hostile), "similarity": 1.0, "kind": "exact"}],
                         [{"path": str(hostile), "split": "train", "score": 0.5}])
    result.summary = {"images": {"train": 1}, "backbone": "b", "node": "n", "neighbour_search": "exact",
                      "label_check": {"method": "m", "probe": "cv-5"}, "thresholds": {"near_similarity": 0.95},
                      "counts": {"label_issues": 1, "exact": 1, "near": 0, "leaks": 0}}
    page = write_audit_page(tmp_path / "audit.html", result, tmp_path, {str(hostile): "<b>cat"}).read_text()
    assert "onerror=alert(1)>" not in page and "<b>cat" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page and "&lt;b&gt;cat" in page
    assert "<script" not in page and "data:image/jpeg;base64," in page


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_cli_audit_finds_the_flipped_label_and_the_copied_image(shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    shutil.copy(data / "val" / "circle" / "003.png", data / "train" / "circle" / "copy.png")
    shutil.move(data / "train" / "square" / "005.png", data / "train" / "circle" / "flipped.png")
    refused = CliRunner().invoke(app, ["audit", str(data), "-o", str(data / "out")])
    assert refused.exit_code == 2 and "data" in refused.output  # never written inside the data
    done = CliRunner().invoke(app, ["audit", str(data), "-o", str(tmp_path / "out"), "-b", "test_resnet",
                                    "--no-pretrained", "--image-size", "32", "--workers", "0"])
    assert done.exit_code == 0, done.output
    issues = _rows(tmp_path / "out" / "label_issues.csv")
    assert issues[0] == ["path", "given", "suggested", "score"]
    assert issues[1][:3] == [os.path.abspath(data / "train" / "circle" / "flipped.png"), "circle", "square"]
    duplicates = _rows(tmp_path / "out" / "duplicates.csv")
    assert duplicates[0] == ["path_a", "path_b", "similarity", "kind"]
    copy = {os.path.abspath(data / "train" / "circle" / "copy.png"),
            os.path.abspath(data / "val" / "circle" / "003.png")}
    assert [row for row in duplicates[1:] if {row[0], row[1]} == copy][0][2:] == ["1.0", "exact-leak"]
    assert _rows(tmp_path / "out" / "outliers.csv")[0] == ["path", "split", "score"]
    assert len(_rows(tmp_path / "out" / "outliers.csv")) == 1 + 3 * 24 + 1 + 3 * 10
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert summary["counts"]["exact"] == 1 and summary["node"] == "pre_logits"
    assert "flipped.png" in (tmp_path / "out" / "audit.html").read_text()


def test_missing_cleanlab_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys\nsys.modules['cleanlab'] = None\nfrom graft.cli import main\n"
            f"sys.argv = ['graft', 'audit', {str(tmp_path / 'data')!r}, '-o', {str(tmp_path / 'out')!r}]\nmain()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: graft audit's label check needs cleanlab: pip install 'graft[audit]'"
    assert not (tmp_path / "out").exists()  # refused before any work


def test_evaluate_warns_about_copies_of_training_images(trained_run, shapes, tmp_path):
    from graft.evaluation.scoring import evaluate

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    shutil.copy(data / "train" / "square" / "002.png", data / "val" / "square" / "copied.png")
    lines: list[str] = []
    metrics = evaluate(trained_run, data, split="val", output=tmp_path / "eval", report=False, log=lines.append)
    assert metrics["copies_of_training"] == 1
    assert [line for line in lines if line.startswith("warning: 1 evaluated image(s) are byte-identical")]
