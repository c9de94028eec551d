import json
import shutil

import pytest
import torch

from graft.errors import GraftError
from graft.evaluation.inference import predict
from graft.evaluation.metrics import classification_metrics
from graft.evaluation.scoring import evaluate


def test_metrics_match_hand_computed_numbers():
    # true:      a a a b b c ; predicted: a a b b c c
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.full((6, 3), -5.0)
    for row, predicted in enumerate([0, 0, 1, 1, 2, 2]):
        logits[row, predicted] = 5.0
    logits[2, 0] = 0.0  # the missed 'a' has 'a' second
    metrics = classification_metrics(logits, labels, ["a", "b", "c"], top_k=2)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = metrics["per_class"]
    assert (a["precision"], a["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0)
    assert metrics["top2_accuracy"] == pytest.approx(5 / 6)  # row 2 has 'a' second; row 4 ('b' → 'c') does not
    assert metrics["images"] == 6 and [p["support"] for p in metrics["per_class"]] == [3, 2, 1]


def test_predict_files_folders_and_an_unreadable_file(trained_run, shapes, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    rows = predict(trained_run, [str(shapes / "val" / "circle"), str(broken)], top_k=2, device="cpu")
    assert len(rows) == 11
    good = [r for r in rows if not r.error]
    assert len(good) == 10 and all(len(r.labels) == 2 and r.probabilities[0] >= r.probabilities[1] for r in good)
    assert sum(r.labels[0] == "circle" for r in good) >= 6
    (bad,) = [r for r in rows if r.error]
    assert bad.path == str(broken) and "broken.png" in bad.error and bad.labels == []


def test_evaluate_writes_metrics_json(trained_run, shapes, tmp_path):
    metrics = evaluate(trained_run, shapes, output=tmp_path / "eval", device="cpu")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["images"] == 30 and saved["accuracy"] == metrics["accuracy"] > 0.5
    assert len(saved["confusion_matrix"]) == 3 and sum(map(sum, saved["confusion_matrix"])) == 30


def test_ensemble_of_identical_runs_equals_one_run(trained_run, shapes, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    single = predict(trained_run, [str(shapes / "val" / "square")], device="cpu")
    double = predict([trained_run, copy], [str(shapes / "val" / "square")], device="cpu")
    assert [r.labels for r in single] == [r.labels for r in double]
    flat = [p for r in single for p in r.probabilities]
    assert flat == pytest.approx([p for r in double for p in r.probabilities], abs=1e-6)


def test_ensemble_needs_the_same_classes(trained_run, shapes, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    card = json.loads((other / "graft.json").read_text())
    card["classes"] = ["circle", "square", "star"]
    (other / "graft.json").write_text(json.dumps(card))
    with pytest.raises(GraftError, match="its classes differ .* an ensemble needs the same classes"):
        predict([trained_run, other], ["whatever.png"], device="cpu")
    with pytest.raises(GraftError, match="its classes differ .* an ensemble needs the same classes"):
        evaluate([trained_run, other], shapes, device="cpu")


def test_newer_or_damaged_run_folders_are_refused(trained_run, tmp_path):
    from graft.models.run_folder import load

    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run, damaged)
    card = json.loads((damaged / "graft.json").read_text())
    (damaged / "graft.json").write_text(json.dumps({**card, "format_version": 99}))
    with pytest.raises(GraftError, match="newer than this graft"):
        load(damaged)
    with pytest.raises(GraftError, match="not a graft run folder"):
        load(tmp_path)


def test_an_unknown_split_is_one_error_before_the_data_is_read(trained_run, tmp_path):
    with pytest.raises(GraftError, match="--split '0' not understood: choose one of train, val, test"):
        evaluate(trained_run, tmp_path / "no-such-data", split="0")
