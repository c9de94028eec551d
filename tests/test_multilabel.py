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


def _red_blue(folder, count=48, seed=0):
    """Images with a red square and/or a blue circle, and a CSV listing each image's label set (spaces, fastai's
    convention): left half red square, right half blue circle, so the two labels are independent."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = ["path,label,split"]
    for index in range(count):
        labels = [["red"], ["blue"], ["red", "blue"]][index % 3]
        image = Image.new("RGB", (32, 32), tuple(rng.randint(0, 60) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        if "red" in labels:
            x, y = rng.randint(1, 6), rng.randint(4, 18)
            draw.rectangle([x, y, x + 8, y + 8], fill=(230, 30, 30))
        if "blue" in labels:
            x, y = rng.randint(17, 22), rng.randint(4, 18)
            draw.ellipse([x, y, x + 9, y + 9], fill=(30, 30, 230))
        image.save(folder / f"{index:03d}.png")
        split = "val" if index % 4 == 3 else "train"
        rows.append(f"{index:03d}.png,{' '.join(labels)},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    from typer.testing import CliRunner

    from graft.cli import app

    data = tmp_path_factory.mktemp("redblue")
    manifest = _red_blue(data)
    run = tmp_path_factory.mktemp("runs") / "ml"
    result = CliRunner().invoke(app, ["fit", str(manifest), "--multi-label", "--strategy", "probe", "--backbone",
                                      "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
                                      "--extract-engine", "eager", "-o", str(run)])
    assert result.exit_code == 0, result.output
    return run, data, result.output


def test_fit_and_predict_label_sets_end_to_end(multilabel_run):
    import json

    from typer.testing import CliRunner

    from graft.cli import app
    from graft.models.run_folder import load

    run, data, output = multilabel_run
    assert "mAP" in output and "per class (val)" in output
    from graft.utils.plotting import can_plot

    assert (run / "precision_recall.png").is_file() == can_plot()
    card = json.loads((run / "graft.json").read_text())
    assert card["multi_label"] is True and card["classes"] == ["blue", "red"] and len(card["thresholds"]) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["mAP"] > 0.8  # a random trunk still sees a red square and a blue circle
    result = CliRunner().invoke(app, ["predict", str(run), str(data / "002.png"), str(data / "000.png"),
                                      "--format", "json", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    model = load(run)
    for row in rows:  # the sets are the classes at or above their thresholds, computed here from the raw logits
        with torch_no_grad():
            logits = model(model.transform(__import__("PIL.Image").Image.open(row["path"]).convert("RGB"))[None])
        probabilities = logits.sigmoid()[0].tolist()
        expected = {c for c, p, t in zip(model.classes, probabilities, card["thresholds"]) if p >= t}
        assert set(row["labels"]) == expected
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
    assert set(rows[0]["labels"]) == {"red", "blue"} and rows[1]["labels"] == ["red"]


def torch_no_grad():
    import torch

    return torch.no_grad()


@pytest.mark.parametrize("command", [
    ["export", "{run}", "--format", "hf", "-o", "{tmp}/export"],
    ["explain", "{run}", "{data}/000.png", "-o", "{tmp}/explained"], ["precise-bn", "{run}"],
    ["diagnose", "{run}", "{data}/labels.csv"], ["push", "{run}", "user/model"],
])
def test_commands_without_label_sets_refuse_a_multi_label_run_in_one_line(multilabel_run, tmp_path, command):
    from typer.testing import CliRunner

    from graft.cli import app

    run, data, _ = multilabel_run
    args = [part.format(run=run, data=data, tmp=tmp_path) for part in command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "a multi-label model (label sets)" in result.output and f"graft {command[0]}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_data_commands_and_fit_options_refuse_label_sets_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from graft.cli import app

    manifest = _red_blue(tmp_path, count=12)
    manifest.write_text(manifest.read_text().replace("red blue", "red;blue"))  # ';': detected without the flag
    result = CliRunner().invoke(app, ["features", str(manifest), "--backbone", "test_resnet", "--no-pretrained"])
    assert result.exit_code == 2 and "is a set of classes (multi-label)" in result.output
    result = CliRunner().invoke(app, ["compare", str(manifest), "--strategies", "probe", "-o", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "is a set of classes (multi-label)" in result.output
    result = CliRunner().invoke(app, ["fit", str(manifest), "--mixup", "0.2", "--backbone", "test_resnet",
                                      "--no-pretrained", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--mixup/--cutmix is not supported" in result.output
    assert len(result.output.strip().splitlines()) == 1
    for option, value in (("--unlabeled", str(tmp_path)), ("--exclude", str(manifest))):
        result = CliRunner().invoke(app, ["fit", str(manifest), option, value, "--strategy", "probe", "--backbone",
                                          "test_resnet", "--no-pretrained", "-o", str(tmp_path / "run")])
        assert result.exit_code == 2 and f"{option} is not supported" in result.output, result.output


def test_multi_label_losses_against_their_formulas():
    import torch

    from graft.training.loop import ASL_CLIP, ASL_GAMMA_NEGATIVE, compute_loss

    rng = np.random.default_rng(3)
    logits, targets = rng.normal(size=(6, 4)) * 3, (rng.random((6, 4)) < 0.4).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(1).mean()
    as_tensors = torch.as_tensor(logits), torch.as_tensor(targets)
    assert compute_loss(*as_tensors, multi_label="bce").item() == pytest.approx(bce, rel=1e-5)
    smooth = targets * 0.9 + 0.05
    smoothed = -(smooth * np.log(p) + (1 - smooth) * np.log(1 - p)).sum(1).mean()
    assert compute_loss(*as_tensors, 0.1, multi_label="bce").item() == pytest.approx(smoothed, rel=1e-5)
    shifted = np.clip(p - ASL_CLIP, 0, None)
    asl = -(targets * np.log(p) + (1 - targets) * shifted ** ASL_GAMMA_NEGATIVE * np.log(1 - shifted)).sum(1).mean()
    assert compute_loss(*as_tensors, 0.1, multi_label="asl").item() == pytest.approx(asl, rel=1e-5)


def test_fit_finetunes_label_sets_with_asl_stops_early_and_refuses_resume(tmp_path):
    import csv
    import itertools
    import json

    from typer.testing import CliRunner

    from graft.cli import app

    manifest = _red_blue(tmp_path, count=24)
    run = tmp_path / "run"
    options = ["--multi-label", "--strategy", "finetune", "--loss", "asl", "--epochs", "4", "--patience", "1",
               "--lr", "0.05", "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
               "--extract-engine", "eager", "--batch-size", "8", "-o", str(run)]
    result = CliRunner().invoke(app, ["fit", str(manifest), *options])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] >= 1 and metrics["val"]["mAP"] is not None
    assert metrics["loss"] == {"finetune": "asl", "probe": "bce (the probe)"}[metrics["kept"]]  # the saved model's
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert len(rows) == metrics["epochs"]
    for _, stage in itertools.groupby(rows, key=lambda row: row["stage"]):  # each stage stops after one worse epoch
        losses = [float(row["val_loss"]) for row in stage]
        worse = [loss >= min(losses[:index]) for index, loss in enumerate(losses) if index]
        assert worse.count(True) <= 1 and (not any(worse) or worse[-1])
    # the fine-tuned model is the last stage's best epoch: its val BCE, recomputed after training, is that minimum
    best = min(float(row["val_loss"]) for row in stage_rows(rows))
    assert metrics["selection"]["finetune_val_loss"] == pytest.approx(best, rel=1e-4)
    if metrics["kept"] == "finetune":  # else the probe came back (the next test)
        assert metrics["val"]["loss"] == pytest.approx(best, rel=1e-4)
    card = json.loads((run / "graft.json").read_text())
    assert card["multi_label"] and card["thresholds"] == [round(row["threshold"], 6)
                                                          for row in metrics["val"]["per_class"]]
    # as an interrupted run leaves it (a multi-label fit writes no checkpoint)
    (run / "graft.json").write_text(json.dumps({**card, "status": "training"}))
    result = CliRunner().invoke(app, ["fit", str(manifest), "--resume", *options])
    assert result.exit_code == 2 and "start the run again with --overwrite" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_fine_tune_that_loses_to_the_probe_on_val_gives_the_probe_back(tmp_path):
    import json

    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from graft.cli import app

    manifest = _red_blue(tmp_path, count=24)
    common = ["--multi-label", "--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
              "--extract-engine", "eager", "--batch-size", "8"]
    for name, options in (("probe", ["--strategy", "probe"]),
                          ("tuned", ["--strategy", "finetune", "--epochs", "2", "--lr", "5"])):  # a rate that wrecks it
        result = CliRunner().invoke(app, ["fit", str(manifest), *common, *options, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert "kept the probe" in result.output
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    probe_metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["kept"] == "probe" and json.loads((tmp_path / "tuned" / "graft.json").read_text())["kept"] == "probe"
    assert metrics["selection"]["finetune_val_mAP"] < metrics["selection"]["probe_val_mAP"]
    assert metrics["val"]["mAP"] == pytest.approx(probe_metrics["val"]["mAP"])
    saved = {name: load_file(tmp_path / name / "model.safetensors") for name in ("probe", "tuned")}
    assert saved["probe"].keys() == saved["tuned"].keys()
    for key, value in saved["probe"].items():  # the probe run's weights, trunk and head, exactly
        np.testing.assert_array_equal(saved["tuned"][key], value, err_msg=key)


def stage_rows(rows: list[dict]) -> list[dict]:
    """The history rows of the last stage."""
    return [row for row in rows if row["stage"] == rows[-1]["stage"]]


def test_tampered_thresholds_in_graft_json_are_refused_in_one_line(multilabel_run, tmp_path):
    import json
    import shutil

    from graft.models.run_folder import load

    run, _, _ = multilabel_run
    copy = shutil.copytree(run, tmp_path / "copy")
    card = json.loads((copy / "graft.json").read_text())
    for thresholds in ([2.0, 0.5], [0.5], ["0.5", 0.5]):
        (copy / "graft.json").write_text(json.dumps({**card, "thresholds": thresholds}))
        with pytest.raises(GraftError, match="'thresholds' a number in \\[0, 1\\] per class"):
            load(copy)


def test_evaluate_scores_label_sets_like_sklearn_on_the_same_outputs(multilabel_run, tmp_path):
    import csv
    import json

    import torch
    from PIL import Image
    from sklearn.metrics import average_precision_score, f1_score
    from typer.testing import CliRunner

    from graft.cli import app
    from graft.models.run_folder import load

    run, data, _ = multilabel_run
    result = CliRunner().invoke(app, ["evaluate", str(run), str(data / "labels.csv"), "--split", "val", "--runtime",
                                      "torch", "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "per class" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    truth_sets = {line.split(",")[0]: line.split(",")[1].split() for line in
                  (data / "labels.csv").read_text().splitlines() if line.endswith(",val")}
    assert len(rows) == metrics["images"] == len(truth_sets)
    model, thresholds = load(run), json.loads((run / "graft.json").read_text())["thresholds"]
    truth = np.array([[name in truth_sets[row["path"].rsplit("/", 1)[-1]] for name in model.classes] for row in rows])
    scores = np.array([[float(row[f"p_{name}"]) for name in model.classes] for row in rows])
    with torch.no_grad():  # the probabilities written are the model's sigmoid outputs
        first = model(model.transform(Image.open(rows[0]["path"]).convert("RGB"))[None]).sigmoid()[0].numpy()
    np.testing.assert_allclose(scores[0], first, atol=1e-4)
    predicted = scores >= np.array(thresholds)
    assert metrics["mAP"] == pytest.approx(average_precision_score(truth, scores, average="macro"), abs=1e-4)
    assert metrics["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"), abs=1e-4)
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-4)
    assert [row["predicted"].split() for row in rows] == [[c for c, p in zip(model.classes, hit) if p]
                                                         for hit in predicted]
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Precision-recall" in page and f"{metrics['per_class'][0]['ap']:.3f}" in page


def test_export_writes_sigmoid_logits_and_thresholds_and_the_example_prints_sets(multilabel_run, tmp_path):
    import json
    import subprocess
    import sys

    import torch
    from PIL import Image
    from typer.testing import CliRunner

    from graft.cli import app
    from graft.deploy.export import onnx_session
    from graft.models.run_folder import load

    run, data, _ = multilabel_run
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run), "--format", "onnx,safetensors", "-o", str(out)])
    assert result.exit_code == 0, result.output
    card = json.loads((run / "graft.json").read_text())
    meta = json.loads((out / "preprocessing.json").read_text())
    assert meta["output"]["multi_label"] and meta["output"]["thresholds"] == card["thresholds"]
    assert json.loads((out / "graft.json").read_text())["thresholds"] == card["thresholds"]
    model = load(run)
    images = [data / "002.png", data / "000.png", data / "001.png"]
    batch = torch.stack([model.transform(Image.open(path).convert("RGB")) for path in images])
    with torch.no_grad():
        expected = model(batch).sigmoid().numpy()
    logits = onnx_session(out / "model.onnx").run(None, {"images": batch.numpy()})[0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), expected, atol=1e-4)
    printed = subprocess.run([sys.executable, str(out / "predict_onnx.py"), *map(str, images)], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    sets = [{name.split(":")[0] for name in line.split("\t")[1].split()} for line in printed]
    assert sets == [{c for c, p, t in zip(model.classes, row, card["thresholds"]) if p >= t} for row in expected]
    result = CliRunner().invoke(app, ["export", str(run), "--quantize", "int8", "-o", str(tmp_path / "int8")])
    assert result.exit_code == 2 and "export without --quantize" in result.output


def _sets_by_hand(run, paths) -> tuple[list[list[float]], list[float]]:
    """Each image's sigmoid probabilities from the model's raw logits, and the thresholds read from graft.json."""
    import json

    import torch
    from PIL import Image

    from graft.models.run_folder import load

    model = load(run)
    with torch.no_grad():
        logits = model(torch.stack([model.transform(Image.open(path).convert("RGB")) for path in paths]))
    return torch.sigmoid(logits).tolist(), json.loads((run / "graft.json").read_text())["thresholds"]


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_serve_answers_label_sets_at_the_runs_thresholds(multilabel_run, tmp_path, runtime):
    import shutil

    from fastapi.testclient import TestClient

    from graft.deploy.serve import ServeConfig, create_app
    from graft.evaluation.inference import predict

    run, data, _ = multilabel_run
    run = shutil.copytree(run, tmp_path / "run")  # the ONNX runtime writes its export into the run folder
    app = create_app(run, "cpu", ServeConfig(runtime=runtime, top_k=1))
    if runtime == "onnx":
        assert app.state.predictor.per_view[0].model is not app.state.predictor.models[0], "ONNX Runtime, not eager"
    paths = [data / name for name in ("000.png", "001.png", "002.png", "005.png")]
    probabilities, thresholds = _sets_by_hand(run, paths)
    with TestClient(app) as client:
        metadata = client.get("/metadata").json()
        response = client.post("/predict", files=[("file", (p.name, p.read_bytes(), "image/png")) for p in paths])
        refused = client.post("/explain", files={"file": ("000.png", paths[0].read_bytes(), "image/png")})
    assert metadata["multi_label"] is True and metadata["thresholds"] == thresholds
    assert metadata["classes"] == ["blue", "red"] and "/explain" not in metadata["endpoints"]
    assert refused.status_code == 422 and "multi-label" in refused.json()["error"]
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    for row, probability, reference in zip(rows, probabilities, predict(run, [str(p) for p in paths], device="cpu")):
        expected = [c for c, p, t in sorted(zip(["blue", "red"], probability, thresholds), key=lambda r: -r[1])
                    if p >= t]
        assert row["labels"] == expected == reference.labels  # the whole set, whatever top_k says
        assert row["probabilities"] == pytest.approx(sorted([p for p, t in zip(probability, thresholds) if p >= t],
                                                            reverse=True), abs=1e-4)
        shown = [c["probability"] for c in row["classes"]]
        assert sorted(c["label"] for c in row["classes"]) == ["blue", "red"] and shown == sorted(shown, reverse=True)
        for entry in row["classes"]:
            index = ["blue", "red"].index(entry["label"])
            assert entry["probability"] == pytest.approx(probability[index], abs=1e-4)
            assert entry["threshold"] == thresholds[index]
            assert entry["passed"] == (probability[index] >= thresholds[index])
    assert set(rows[0]["labels"]) == {"red"} and set(rows[2]["labels"]) == {"red", "blue"}  # as predict's test says


def test_serve_refuses_ensembles_and_review_pages_with_a_multi_label_run_in_one_line(multilabel_run, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from graft.cli import app
    from graft.deploy.serve import create_app

    run, data, _ = multilabel_run
    single = shutil.copytree(run, tmp_path / "single")  # the same weights read as one softmax: a single-label run
    card = json.loads((single / "graft.json").read_text())
    (single / "graft.json").write_text(json.dumps({k: v for k, v in card.items() if k not in ("multi_label",
                                                                                               "thresholds")}))
    for runs in ([single, run], [run, single], [run, run]):
        with pytest.raises(GraftError, match="a multi-label model cannot join an ensemble"):
            create_app(runs, "cpu")
    assert create_app(single, "cpu").state.predictor.metadata()["multi_label"] is False
    for extra in (["--label", str(data)], ["--audit", str(tmp_path)]):
        result = CliRunner().invoke(app, ["serve", str(run), *extra])
        assert result.exit_code == 2, result.output
        assert f"graft serve {extra[0]} (one label per image)" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_the_page_shows_each_images_set_and_marks_the_classes_that_passed(multilabel_run, tmp_path):
    """In headless Chromium (skipped without it, as tests/test_browser.py is): the set, then each class's bar."""
    import os

    from browser_support import find_chromium, live_server

    from graft.deploy.serve import ServeConfig, create_app

    chromium, found = find_chromium()
    if chromium is None:
        pytest.skip(found)
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    from test_browser import Watched

    run, data, _ = multilabel_run
    paths = [data / "000.png", data / "002.png"]
    probabilities, thresholds = _sets_by_hand(run, paths)
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root: no user namespace
    with live_server(create_app(run, "cpu", ServeConfig(runtime="torch"))) as base, \
            playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            watched = Watched(browser)
            page = watched.page
            page.goto(f"{base}/")
            page.wait_for_selector("#facts dl")
            assert "2 classes, label sets" in page.inner_text("#facts") and "val mAP" in page.inner_text("#facts")
            page.set_input_files("#picker", [str(path) for path in paths])
            page.locator(".card.done").nth(1).wait_for(timeout=15_000)  # a locator: the CSP forbids eval
            cards = {card.query_selector(".name").inner_text(): card for card in page.query_selector_all(".card")}
            for path, probability in zip(paths, probabilities):
                ranked = sorted(zip(["blue", "red"], probability, thresholds), key=lambda row: -row[1])
                expected = [name for name, p, t in ranked if p >= t]
                card = cards[path.name]
                assert card.query_selector(".top1") is None, "no top-1 wording for a set"
                assert card.query_selector(".set").inner_text() == ", ".join(expected)
                lines = card.query_selector_all(".label")
                assert [line.query_selector("span").inner_text().lstrip("\u2713 ") for line in lines] == \
                       [name for name, _, _ in ranked]
                assert [line.query_selector("span").inner_text() for line in card.query_selector_all(".label.passed")
                        ] == ["\u2713 " + name for name in expected]
            assert not page.is_visible("#explain-switch")
            page.screenshot(path=str(tmp_path / "serve-page-label-sets.png"), full_page=True)
            watched.check()
        finally:
            browser.close()
