"""graft explain: Grad-CAM overlays from trained runs (CNN and ViT trunks), the report's overlays and curves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from graft.cli import app
from graft.errors import GraftError

pytest.importorskip("captum", reason="graft[explain] (captum) is not installed")

SIZE = 64  # the focus images: a bright square in the top-left quarter marks the class "corner"
BOX = (4, 4, 28, 28)  # left, top, right, bottom of the square
runner = CliRunner()


def corner_image(corner: bool, rng: random.Random, size: int = SIZE) -> Image.Image:
    pixels = np.asarray([[rng.randint(0, 70) for _ in range(size * size * 3)]], dtype=np.uint8).reshape(size, size, 3)
    image = Image.fromarray(pixels)
    if corner:
        image.paste((250, 250, 250), BOX)
    return image


def make_corners(root: Path, per_class: int, seed: int, size: int = SIZE) -> Path:
    rng = random.Random(seed)
    for name in ("corner", "plain"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            corner_image(name == "corner", rng, size).save(root / name / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def corners(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corners")
    make_corners(root / "train", 16, seed=3)
    make_corners(root / "val", 6, seed=4)
    return root


@pytest.fixture(scope="module")
def corner_run(corners, tmp_path_factory) -> Path:
    """test_resnet at 64 px cut at layer3 (a 4 x 4 map): where the square is, the CAM can say."""
    from graft.training.fitting import fit

    config = tiny_config(corners, tmp_path_factory.mktemp("runs") / "corners", **{
        "data.image_size": SIZE, "model.cut_at": "layer3", "train.strategy": "finetune", "train.epochs": 4})
    return fit(config, verbose=False).run_dir


def test_explain_writes_overlays_of_the_image_size_and_a_summary(trained_run, shapes, tmp_path):
    from graft.evaluation.explain import explain, write_explanations

    image = shapes / "val" / "circle" / "000.png"
    wide = tmp_path / "wide.png"
    Image.open(image).resize((72, 40)).save(wide)  # not square: the map goes back through resize and centre crop
    rows = explain(trained_run, [image, wide], top_k=2)
    assert [row.error for row in rows] == ["", ""]
    assert rows[0].labels[0] == "circle" and rows[0].target == "circle" and len(rows[0].labels) == 2
    assert rows[1].cam.shape == (40, 72) and rows[1].overlay.size == (72, 40)
    assert 0 <= rows[0].cam.min() and 0.95 < rows[0].cam.max() <= 1  # peak 1 at the input size, then resampled
    summary = json.loads(write_explanations(rows, tmp_path / "out").read_text())
    assert [r["overlay"] for r in summary["images"]] == ["000.cam.png", "wide.cam.png"]
    assert summary["images"][0]["labels"][0] == "circle"
    written = Image.open(tmp_path / "out" / "000.cam.png")
    assert written.size == Image.open(image).size
    assert written.text["graft.explained"] == "circle"
    difference = np.abs(np.asarray(written, dtype=int) - np.asarray(Image.open(image).convert("RGB"), dtype=int))
    assert difference.mean() > 5  # the heat map is really drawn over the image


def test_cam_mass_lies_on_the_square_that_defines_the_class(corner_run, corners):
    from graft.evaluation.explain import explain

    files = sorted((corners / "val" / "corner").glob("*.png"))
    rows = explain(corner_run, files, target="corner")
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    ratios = [row.cam[inside].mean() / max(row.cam[~inside].mean(), 1e-6) for row in rows]
    # the map is for "corner" whatever the short run predicts: the square is the only evidence for it
    assert np.median(ratios) > 2, ratios
    assert sum(ratio > 1 for ratio in ratios) >= len(rows) - 1, ratios


def test_a_vit_trunk_gets_its_token_grid(tmp_path):
    from graft.evaluation.explain import explain_images
    from graft.models.grafted import create_model

    torch.manual_seed(0)  # an untrained head: the same map on every run
    config = tiny_config(tmp_path, tmp_path / "run", **{"model.backbone": "test_vit", "data.image_size": 64})
    model, _ = create_model(config, ["a", "b"])
    rng = random.Random(0)
    images = [corner_image(True, rng), corner_image(False, rng).resize((80, 64))]
    rows = explain_images(model, images, top_k=2, target="a")
    assert [row.cam.shape for row in rows] == [(64, 64), (64, 80)]
    assert all(row.target == "a" and sorted(row.labels) == ["a", "b"] for row in rows)
    assert 0.95 < rows[0].cam.max() <= 1 and rows[0].cam.std() > 0.05  # a real 4 x 4 map, not flat


def test_a_trunk_without_a_spatial_map_is_refused_in_one_line(tmp_path):
    from graft.evaluation.explain import explain_images
    from graft.models.grafted import create_model

    config = tiny_config(tmp_path, tmp_path / "run", **{"model.cut_at": "global_pool"})
    model, _ = create_model(config, ["a", "b"])
    with pytest.raises(GraftError, match="spatial feature map") as caught:
        explain_images(model, [Image.new("RGB", (32, 32))])
    assert "\n" not in str(caught.value)


def test_cli_explain_and_its_one_line_errors(trained_run, shapes, tmp_path):
    image = shapes / "val" / "square" / "001.png"
    result = runner.invoke(app, ["explain", str(trained_run), str(image), "-o", str(tmp_path / "out"), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "001.cam.png").is_file() and (tmp_path / "out" / "explanations.json").is_file()
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image")
    for args, message in (([str(trained_run), str(fake)], "notes.jpg"),
                          ([str(tmp_path / "missing"), str(image)], "not a run folder"),
                          ([str(trained_run), str(image), "--class", "hexagon"], "hexagon"),
                          ([str(trained_run), str(image)], None)):
        output = ["-o", str(tmp_path / "bad")] if message else ["-o", str(shapes / "val")]
        result = runner.invoke(app, ["explain", *args, *output])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert (message or "never writes over its inputs") in lines[0] or message is None
    assert not (tmp_path / "bad" / "notes.cam.png").exists()


def test_missing_captum_names_the_extra(monkeypatch):
    import sys

    from graft.evaluation.gradcam import layer_grad_cam

    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(GraftError, match=r"pip install 'graft\[explain\]'"):
        layer_grad_cam()


def _report(model, shapes: Path, out: Path) -> str:
    import torch

    from graft.evaluation.metrics import classification_metrics
    from graft.evaluation.report import write_report

    classes = ["circle", "square", "triangle"]
    samples = [(str(shapes / "val" / "circle" / "000.png"), 0), (str(shapes / "val" / "square" / "001.png"), 1),
               (str(shapes / "val" / "triangle" / "002.png"), 2)]
    probabilities = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # two confident mistakes
    metrics = classification_metrics(probabilities.log(), torch.tensor([0, 1, 2]), classes, top_k=2)
    metrics.update({"data": str(shapes / "val"), "classes": classes, "ece": 0.0})
    return write_report(out, metrics, samples, probabilities, None, [], model=model).read_text()


def test_report_mistakes_show_their_path_and_overlay(trained_run, shapes, tmp_path):
    from graft.models.run_folder import load

    page = _report(load(trained_run), shapes, tmp_path / "with")
    mistakes = page[page.index("id=\"mistakes\""):]
    assert "<span class='path'>circle/000.png</span>" in mistakes and "square/001.png</span>" in mistakes
    assert "triangle/002.png" not in mistakes  # right, so not a mistake
    assert mistakes.count("alt='Grad-CAM of circle/000.png for square'") == 1
    assert mistakes.count("<img src='data:image/jpeg;base64,") == 4  # thumbnail and overlay for each mistake
    plain = _report(None, shapes, tmp_path / "without")
    plain = plain[plain.index("id=\"mistakes\""):]
    assert "Grad-CAM" not in plain.replace("pip install 'graft[explain]'", "").split("</p>", 1)[1]
    assert plain.count("<img src='data:image/jpeg;base64,") == 2 and "circle/000.png</span>" in plain


def test_missing_extra_leaves_the_thumbnails_and_a_note(trained_run, shapes, tmp_path, monkeypatch):
    import sys

    from graft.models.run_folder import load

    monkeypatch.setitem(sys.modules, "captum.attr", None)
    page = _report(load(trained_run), shapes, tmp_path)
    assert "pip install 'graft[explain]'" in page and page.count("<img src='data:image/jpeg;base64,") == 2


def test_a_one_epoch_runs_curves_have_a_marker_and_whole_epochs(tmp_path):
    from graft.evaluation.report import training_curves_figure

    run = tmp_path / "one-epoch"
    run.mkdir()
    (run / "history.csv").write_text("epoch,stage,train_loss,val_loss,train_acc,val_acc,lr,seconds\n"
                                     "1,finetune,1.05,0.98,0.41,0.47,0.01,2.0\n")
    figure = training_curves_figure([run])
    for axis in figure.axes:
        low, high = axis.get_xlim()
        assert low <= 0 and high >= 2  # a lone point at epoch 1, with room either side
        ticks = [t for t in axis.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert all(line.get_marker() in ("o", "s") and line.get_markersize() >= 6 for line in axis.get_lines()
                   if len(line.get_xdata()) == 1)
    assert figure.axes[1].get_ylim() == pytest.approx((-0.02, 1.02))


def test_a_zero_map_is_said_not_passed_off_as_an_explanation(tmp_path):
    """A map that is zero everywhere (nothing raises the target's score) gets a note in the summary; a real one none."""
    import json

    import numpy as np
    from PIL import Image

    from graft.evaluation.explain import Explanation, write_explanations

    image = Image.new("RGB", (8, 8), (120, 30, 200))
    zero = Explanation("a.png", ["cat", "dog"], [0.6, 0.4], "cat", np.zeros((8, 8)), image, image)
    real = Explanation("b.png", ["dog", "cat"], [0.9, 0.1], "dog", np.eye(8), image, image)
    assert "zero everywhere" in zero.note and "cat" in zero.note and real.note == ""
    rows = json.loads(write_explanations([zero, real], tmp_path).read_text())["images"]
    assert [row["note"] for row in rows] == [zero.note, ""]


def test_a_small_images_map_is_the_input_size_map_placed_where_the_crop_took_it(trained_run, shapes):
    """Regression: at or below the overlay size nothing is shrunk; the map is grad_cam's, put back by hand."""
    from matplotlib import colormaps

    from graft.evaluation.explain import explain_images, grad_cam
    from graft.models.run_folder import load

    model = load(trained_run)
    crop = model.preprocessing.input_size[0]
    side = int(crop / model.preprocessing.crop_pct)  # resized to itself, then centre-cropped: the crop is the box
    offset = round((side - crop) / 2)
    image = Image.open(shapes / "val" / "circle" / "000.png").convert("RGB").resize((side, side))
    (row,) = explain_images(model, [image], target="circle")
    cam = grad_cam(model, model.transform(image)[None], [model.classes.index("circle")])[0].numpy()
    expected = np.zeros((side, side), dtype=np.float32)
    expected[offset:offset + crop, offset:offset + crop] = cam
    assert row.cam.shape == (side, side) and expected.max() > 0.99
    np.testing.assert_allclose(row.cam, expected, atol=1e-6)
    weight = 0.5 * np.sqrt(expected)[..., None]  # README: the jet heat map, half opaque at the hottest pixel
    drawn = (1 - weight) * np.asarray(image) / 255 + weight * colormaps["jet"](expected)[..., :3]
    assert np.abs(np.asarray(row.overlay, dtype=float) - drawn * 255).max() <= 1
    assert row.overlay.size == row.image.size == image.size


def test_a_large_image_is_explained_at_most_512_px_with_the_map_of_its_small_copy(corner_run):
    """The map is taken on the network's input, so a 20x copy of an image gets the small image's map, shrunk."""
    from graft.evaluation.explain import explain_images
    from graft.models.run_folder import load

    model = load(corner_run)
    rng = random.Random(7)
    small = [corner_image(True, rng), corner_image(True, rng).resize((80, 64), Image.Resampling.NEAREST)]
    large = [image.resize((image.width * 20, image.height * 20), Image.Resampling.NEAREST) for image in small]
    rows = explain_images(model, small + large, target="corner")
    assert [row.overlay.size for row in rows] == [(64, 64), (80, 64), (512, 512), (512, 410)]
    assert [row.cam.shape for row in rows[2:]] == [(512, 512), (410, 512)]
    for little, big in zip(rows[:2], rows[2:]):
        assert big.labels == little.labels and big.probabilities == pytest.approx(little.probabilities, abs=0.02)
        expected = np.asarray(Image.fromarray(little.cam).resize(big.overlay.size, Image.Resampling.BILINEAR))
        assert np.corrcoef(expected.ravel(), big.cam.ravel())[0, 1] > 0.95
        assert np.abs(expected - big.cam).mean() < 0.05


def test_explaining_a_large_image_allocates_no_full_size_float_array(trained_run):
    """numpy reports its buffers to tracemalloc: explaining 3000 x 3000 pixels (36 MB as float32, 288 MB as the RGBA
    float64 colour map the overlay once was) must stay at overlay-size arrays (~30 MB in all at 512 x 512)."""
    import tracemalloc

    from graft.evaluation.explain import explain_images
    from graft.models.run_folder import load

    model = load(trained_run)
    image = Image.new("RGB", (3000, 3000), (200, 40, 40))
    explain_images(model, [Image.new("RGB", (40, 40))])  # imports and first-call caches outside the measurement
    tracemalloc.start()
    try:
        (row,) = explain_images(model, [image])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert row.overlay.size == (512, 512)
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB of Python/numpy memory at the peak"
