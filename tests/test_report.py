"""Evaluation a person can look at: the HTML report, test-time augmentation, calibration and ensembles.

The report is checked structurally rather than in a browser: it must parse, hold every section, reference nothing
outside itself (no URL, no script, no stylesheet link), and every image in it and beside it must decode.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from torchvision.transforms import functional as TF

from graft.data.images import load_image
from graft.data.transforms import TTAViews, create_transform
from graft.errors import GraftError
from graft.evaluation.inference import predict
from graft.evaluation.metrics import classification_metrics, expected_calibration_error, reliability_bins
from graft.evaluation.report import PLOTS, write_report
from graft.evaluation.scoring import evaluate
from graft.models.backbones.base import Preprocessing
from graft.training.fitting import fit

SECTIONS = ("summary", "training", "confusion", "per-class", "calibration", "mistakes")
PREPROCESSING = Preprocessing((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 0.875)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.images, self.links = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.links.append(attrs[key])


def check_report(path: Path) -> _Page:
    """Asserts a report is self-contained and every image decodes; returns the parsed page."""
    text = path.read_text()
    page = _Page()
    page.feed(text)
    assert set(SECTIONS) <= page.ids
    assert page.links == [] and "script" not in page.tags and "link" not in page.tags
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert page.images
    for source in page.images:
        header, payload = source.split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64")
        Image.open(io.BytesIO(base64.b64decode(payload))).load()
    return page


def test_report_of_a_tiny_run_is_self_contained_and_complete(trained_run, shapes, tmp_path):
    metrics = evaluate(trained_run, shapes, output=tmp_path / "eval", device="cpu", tta="flip")
    page = check_report(Path(metrics["report"]))
    confusion = metrics["confusion_matrix"]
    mistakes = metrics["images"] - sum(confusion[i][i] for i in range(3))
    # three plots (curves, confusion, reliability) and a thumbnail per mistake (mistakes.png holds the same grid),
    # each with its Grad-CAM overlay beside it when the explain extra is installed
    from graft.evaluation.explain import available

    assert len(page.images) == 3 + min(mistakes, 24) * (2 if available() else 1)
    for name in PLOTS:
        if name != "mistakes" or mistakes:
            Image.open(tmp_path / "eval" / f"{name}.png").load()
    html = Path(metrics["report"]).read_text()
    assert f"{metrics['accuracy']:.4f}" in html and f"{metrics['tta']['accuracy']:.4f}" in html
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,true,predicted,confidence,p_true" and len(rows) == 1 + metrics["images"]
    # what the run chose on validation while training is named, with its headline (README "Honest numbers")
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert "Chosen on validation while training" in html
    for choice in trained["selected_on_validation"]:
        assert choice.split(" (")[0] in html
    assert f"{trained['headline']['split']} accuracy {trained['headline']['accuracy']:.4f}" in html


def test_hostile_class_names_are_escaped_in_the_report(shapes, tmp_path):
    classes = ["<script>alert(1)</script>", "a&b", "\"quoted\""]
    samples = [(str(p), i % 3) for i, p in enumerate(sorted((shapes / "val").rglob("*.png"))[:12])]
    labels = torch.tensor([label for _, label in samples])
    probabilities = torch.softmax(torch.randn(len(samples), 3, generator=torch.Generator().manual_seed(0)), 1)
    metrics = classification_metrics(probabilities.log(), labels, classes)
    metrics.update({"data": "<data>", "ece": expected_calibration_error(probabilities, labels)})
    path = write_report(tmp_path, metrics, samples, probabilities, None, [tmp_path / "no-history"])
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a&amp;b" in text
    check_report(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.html", "confusion_matrix.png",
                                                                 "reliability.png", "mistakes.png"])


def test_expected_calibration_error_matches_a_hand_computation():
    # 4 images at confidence 0.9 (3 right) and 2 at 0.6 (both wrong): |0.75-0.9|*4/6 + |0-0.6|*2/6 = 0.3
    probabilities = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.1 + 0.2)


def test_ece_is_computed_from_the_reliability_diagrams_bins():
    torch.manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(200, 4), dim=1)
    labels = torch.randint(0, 4, (200,))
    rows = reliability_bins(probabilities, labels, bins=10)
    # From scratch in numpy: bin b holds confidences in (b/10, (b+1)/10]
    p, y = probabilities.double().numpy(), labels.numpy()
    confidence, correct = p.max(1), (p.argmax(1) == y)
    which = np.ceil(confidence * 10).astype(int) - 1
    counts = np.bincount(which, minlength=10)
    assert [row["count"] for row in rows] == counts.tolist()
    gaps = sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * counts[b] for b in range(10)
               if counts[b]) / len(y)
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(gaps, abs=1e-6)
    assert 0.05 < gaps < 1


def test_tta_views_come_in_the_documented_order():
    image = Image.effect_mandelbrot((70, 50), (-2, -1, 1, 1), 60).convert("RGB")
    plain = create_transform(PREPROCESSING)(image)
    flip = TTAViews(PREPROCESSING, "flip")(image)
    assert flip.shape == (2, 3, 32, 32) and torch.equal(flip[0], plain) and torch.equal(flip[1], plain.flip(-1))
    both = TTAViews(PREPROCESSING, "crops,flip")(image)  # the order of the words does not matter
    assert both.shape == (10, 3, 32, 32) and torch.equal(both[0], plain)
    resized = TF.resize(image, 36, antialias=True)
    top_left = create_transform(Preprocessing((32, 32), (0.5,) * 3, (0.25,) * 3, "bilinear", 1.0))(
        TF.crop(resized, 0, 0, 32, 32))
    assert torch.allclose(both[1], top_left)
    assert all(torch.equal(both[5 + i], both[i].flip(-1)) for i in range(5))
    with pytest.raises(GraftError, match="tta 'rotate' not understood: use flip, crops or flip,crops"):
        TTAViews(PREPROCESSING, "rotate")


def test_ensembles_average_probabilities_exactly(trained_run, shapes, tmp_path):
    second = fit(tiny_config(shapes, tmp_path / "second", **{"train.strategy": "scratch", "train.epochs": 2}),
                 verbose=False).run_dir
    files = [str(shapes / "val" / "square")]
    single = [predict(run, files, top_k=3, device="cpu") for run in (trained_run, second)]
    together = predict([trained_run, second], files, top_k=3, device="cpu")
    for row, first, other in zip(together, *single):
        expected = {}
        for member in (first, other):
            for label, value in zip(member.labels, member.probabilities):
                expected[label] = expected.get(label, 0.0) + value / 2
        assert row.labels[0] == max(expected, key=expected.get)
        assert row.probabilities == pytest.approx([expected[label] for label in row.labels], abs=2e-6)
    metrics = evaluate([trained_run, second], shapes, output=tmp_path / "ensemble", device="cpu", report=False)
    assert metrics["runs"] == [str(trained_run), str(second)] and not (tmp_path / "ensemble" / "report.html").exists()


def test_predict_with_tta_gives_probabilities_that_sum_to_one(trained_run, shapes):
    rows = predict(trained_run, [str(shapes / "val" / "circle")], top_k=3, device="cpu", tta="flip,crops")
    assert len(rows) == 10 and all(sum(r.probabilities) == pytest.approx(1, abs=1e-5) for r in rows)


def test_flip_tta_is_the_mean_of_the_plain_and_the_mirrored_pass(trained_run, shapes):
    from graft.models.run_folder import load

    files = sorted(str(p) for p in (shapes / "val" / "square").iterdir())[:4]
    model = load(trained_run).eval()
    plain = torch.stack([create_transform(model.preprocessing)(load_image(f)) for f in files])
    with torch.no_grad():  # two ordinary passes, averaged by hand
        expected = (torch.softmax(model(plain), 1) + torch.softmax(model(plain.flip(-1)), 1)) / 2
        assert (expected - torch.softmax(model(plain), 1)).abs().max() > 1e-3  # the mirror view changes something
    for row, probabilities in zip(predict(trained_run, files, top_k=3, device="cpu", tta="flip"), expected):
        assert row.probabilities == pytest.approx([probabilities[model.classes.index(c)].item() for c in row.labels],
                                                  abs=2e-6)
        assert row.labels[0] == model.classes[int(probabilities.argmax())]


def test_cli_evaluate_prints_both_numbers_and_writes_the_report(trained_run, shapes, tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    result = CliRunner().invoke(app, ["evaluate", str(trained_run), str(shapes), "--tta", "flip",
                                      "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "with TTA accuracy" in result.output and "report.html" in result.output
    check_report(tmp_path / "cli" / "report.html")


def test_thumbnails_survive_a_file_deleted_after_evaluation(shapes, tmp_path):
    from graft.evaluation.report import thumbnail

    assert thumbnail(str(tmp_path / "gone.png")).size == (112, 112)
    assert max(thumbnail(str(next((shapes / "val" / "circle").iterdir()))).size) <= 112
    assert load_image(next((shapes / "val" / "circle").iterdir())).size == (48, 48)


@pytest.mark.parametrize(("rows", "labels", "verdict"), [
    ([[0.9, 0.1]] * 4, [0, 0, 1, 1], "over-confident"),  # confidence 0.9, accuracy 0.5
    ([[0.4, 0.3, 0.3]] * 4, [0, 0, 0, 0], "under-confident"),  # confidence 0.4, accuracy 1.0
    ([[0.75, 0.25]] * 4, [0, 0, 0, 1], "calibrated"),  # confidence 0.75, accuracy 0.75
])
def test_the_calibration_verdict_by_hand(rows, labels, verdict):
    from graft.evaluation.metrics import calibration, calibration_sentence

    probabilities, labels = torch.tensor(rows), torch.tensor(labels)
    found = calibration(probabilities, labels)
    assert found["calibration"] == verdict
    assert found["mean_confidence"] == pytest.approx(rows[0][0])
    accuracy = (probabilities.argmax(1) == labels).float().mean().item()
    assert found["ece"] == pytest.approx(abs(rows[0][0] - accuracy))  # one bin holds every image
    sentence = calibration_sentence({**found, "accuracy": accuracy})
    assert sentence.startswith(verdict) and f"{rows[0][0]:.1%}" in sentence


def test_fit_metrics_the_report_and_the_page_carry_the_verdict(trained_run, shapes, tmp_path):
    from graft.deploy.page import run_facts

    val = json.loads((trained_run / "metrics.json").read_text())["val"]
    assert val["calibration"] in ("over-confident", "under-confident", "calibrated") and 0 <= val["ece"] <= 1
    assert run_facts(trained_run)["calibration"].startswith(val["calibration"] + ":")
    metrics = evaluate(trained_run, shapes, output=tmp_path / "eval", device="cpu")
    text = (tmp_path / "eval" / "report.html").read_text()
    assert f"The model is {metrics['calibration']}: mean confidence" in text
