"""Multi-label classification: label sets from a CSV, the one-vs-rest probe, thresholds chosen on val, the metrics
against scikit-learn, fit + predict end to end, and the one-line refusals of the commands that take single labels."""

from __future__ import annotations

import numpy as np
import pytest

from graft.data.discovery import discover
from graft.errors import GraftError


def _manifest(folder, text):
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png", "f.png"):
        (folder / name).touch()
    path = folder / "labels.csv"
    path.write_text(text)
    return path


def test_spaces_are_sets_with_the_flag_and_names_without(tmp_path):
    path = _manifest(tmp_path, "path,label,split\na.png,red blue,train\nb.png,red,train\nc.png,blue,train\n"
                               "d.png,red blue,val\ne.png,red,val\n")
    splits = discover(path, labels="multi")
    assert splits.multi_label and splits.classes == ["blue", "red"]
    assert splits.label_sets[str(tmp_path / "a.png")] == (0, 1)
    assert splits.targets([tmp_path / "d.png", tmp_path / "e.png"]).tolist() == [[1, 1], [0, 1]]
    assert splits.counts("train") == {"blue": 2, "red": 2}
    single = discover(path, labels="auto")  # a class named "red blue" stays one name without --multi-label
    assert not single.multi_label and single.classes == ["blue", "red", "red blue"]
    assert "--multi-label" in single.notes[0]


def test_semicolons_are_detected_and_refused_where_sets_are_not_handled(tmp_path):
    path = _manifest(tmp_path, "path,label,split\na.png,red;blue,train\nb.png,red,train\nc.png,blue;,train\n"
                               "d.png,blue ; red,val\n")
    splits = discover(path, labels="auto")
    assert splits.multi_label and splits.classes == ["blue", "red"]
    assert splits.targets([tmp_path / "c.png", tmp_path / "d.png"]).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(GraftError, match=r"line 2: the label 'red;blue' is a set of classes"):
        discover(path)  # a command that takes single labels
    with pytest.raises(GraftError, match="CSV manifest"):
        discover(tmp_path, labels="multi")


def _planted(seed=0, n=300, dim=20, classes=4):
    """Features where class c is present when a noisy projection on its own direction is positive."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    directions = rng.normal(size=(dim, classes))
    y = ((x @ directions + rng.normal(scale=1.5, size=(n, classes))) > 0.3).astype(np.float32)
    return x, y


def test_probe_matches_sklearn_one_vs_rest():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from graft.probing.multilabel import fit_multilabel_probe

    x, y = _planted(n=600)
    train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
    result = fit_multilabel_probe(train_x, train_y, grid=[1e-1, 1e-2, 1e-3])
    import torch

    with torch.no_grad():
        ours = torch.sigmoid(result.linear(torch.as_tensor(test_x))).numpy()
    scaler = StandardScaler().fit(train_x)
    theirs = OneVsRestClassifier(LogisticRegression(C=1 / (result.l2 * len(train_x)), max_iter=2000)).fit(
        scaler.transform(train_x), train_y).predict_proba(scaler.transform(test_x))
    assert result.selection == "cv-5"
    np.testing.assert_allclose(ours, theirs, atol=2e-3)  # the same objective, solved to the same optimum
    assert average_precision_score(test_y, ours, average="macro") > 0.75


def test_thresholds_are_chosen_on_val_to_maximise_each_class_f1():
    from sklearn.metrics import f1_score

    from graft.probing.multilabel import choose_thresholds

    rng = np.random.default_rng(1)
    truth = (rng.random((80, 3)) < 0.4).astype(np.float32)
    scores = np.clip(truth * 0.3 + rng.random((80, 3)) * 0.7, 0, 1)
    thresholds = choose_thresholds(scores, truth)
    for c, threshold in enumerate(thresholds):
        chosen = f1_score(truth[:, c], scores[:, c] >= threshold)
        every = max(f1_score(truth[:, c], scores[:, c] >= t) for t in np.unique(scores[:, c]))
        assert chosen == pytest.approx(every)  # no threshold does better on these images
        assert threshold != 0.5


def test_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, f1_score

    from graft.evaluation.multilabel import multilabel_metrics

    rng = np.random.default_rng(2)
    truth = (rng.random((50, 4)) < 0.3).astype(np.float32)
    truth[:, 3] = 0  # a class with no positive image: no AP, left out of the mean (sklearn warns and gives 0)
    scores = np.round(np.clip(truth * 0.4 + rng.random((50, 4)) * 0.6, 0, 1), 1)  # rounded: tied scores
    thresholds = [0.5, 0.6, 0.4, 0.5]
    metrics = multilabel_metrics(scores, truth, ["a", "b", "c", "d"], thresholds)
    expected = [average_precision_score(truth[:, c], scores[:, c]) for c in range(3)]
    assert [row["ap"] for row in metrics["per_class"][:3]] == pytest.approx(expected)
    assert metrics["per_class"][3]["ap"] is None and metrics["mAP"] == pytest.approx(np.mean(expected))
    predicted = scores >= np.array(thresholds)
    assert metrics["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert metrics["exact_match"] == pytest.approx((predicted == truth.astype(bool)).all(1).mean())
