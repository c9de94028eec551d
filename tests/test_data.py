import io

import numpy as np
import pytest
from PIL import Image

from graft.data.datasets import ImageDataset
from graft.data.discovery import DatasetSplits, discover, expand_inputs, stratified_split
from graft.data.images import ImageError, load_image
from graft.data.scan import scan
from graft.data.transforms import create_transform
from graft.models.backbones.base import Preprocessing


def _save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("suffix, mode", [
    ("jpg", "RGB"), ("png", "RGB"), ("webp", "RGB"), ("bmp", "RGB"), ("gif", "P"), ("tiff", "RGB"),
    ("png", "L"), ("png", "P"), ("jpg", "CMYK"), ("png", "RGBA"), ("png", "LA"), ("png", "1"),
])
def test_every_format_and_mode_loads_as_rgb(tmp_path, suffix, mode):
    image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    loaded = load_image(_save(image, tmp_path / f"x.{suffix}"))
    assert loaded.mode == "RGB" and loaded.size == (20, 10)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[:4] = 257 * 100
    loaded = np.asarray(load_image(_save(Image.fromarray(array), tmp_path / "deep.png")))
    assert loaded[0, 0].tolist() == [100, 100, 100]
    assert loaded[7, 7].tolist() == [255, 255, 255]


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(_save(image, tmp_path / "clear.png")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(_save(image, tmp_path / "rotated.jpg", exif=exif))
    assert loaded.size == (10, 30)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    red, green, _ = np.asarray(load_image(path))[0, 0]
    assert red > 200 and green < 50


@pytest.mark.parametrize("content, reason", [
    (b"", "not a readable image"),
    (b"this is text, not a picture", "not a readable image"),
    (None, "not a readable image"),  # a truncated JPEG
])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is None:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "JPEG")
        content = buffer.getvalue()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert str(path) in str(caught.value) and reason in str(caught.value) and "\n" not in str(caught.value)


def test_pixel_limit_refuses_huge_images(tmp_path):
    path = _save(Image.new("L", (300, 300)), tmp_path / "big.png")
    with pytest.raises(ImageError, match="exceeds the limit of 10000"):
        load_image(path, max_pixels=10_000)


def _tree(root, classes, per_class=4, split=""):
    for name in classes:
        for index in range(per_class):
            _save(Image.new("RGB", (8, 8), (index * 40, 0, 0)), root / split / name / f"{index}.png")


def test_discover_train_val_test_layout_with_sorted_classes(tmp_path):
    for split in ("train", "val", "test"):
        _tree(tmp_path, ["zebra", "apple", "mango"], 3, split)
    splits = discover(tmp_path)
    assert splits.classes == ["apple", "mango", "zebra"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 9, 9)
    assert splits.train[0][1] == 0 and "apple" in splits.train[0][0]


def test_single_tree_is_split_stratified_and_seeded(tmp_path):
    _tree(tmp_path, ["a", "b"], 10)
    first, second = discover(tmp_path, 0.3, seed=5), discover(tmp_path, 0.3, seed=5)
    assert first.val == second.val
    assert first.counts("val") == {"a": 3, "b": 3}
    assert discover(tmp_path, 0.3, seed=6).val != first.val


def test_stratified_split_keeps_singletons_in_train():
    train, val = stratified_split([("x", 0), ("y", 1), ("z", 1)], 0.5, 0)
    assert ("x", 0) in train and len(val) == 1


def test_csv_manifest_with_bom_semicolons_and_split_column(tmp_path):
    _tree(tmp_path / "img", ["cat", "dog"], 2)
    rows = ["path;label;split", "img/cat/0.png;cat;train", "img/cat/1.png;cat;val", "img/dog/0.png;dog;train",
            "img/dog/1.png;dog;val"]
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    splits = discover(manifest)
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 2 and len(splits.val) == 2


def test_scan_skips_and_lists_bad_files_and_warns(tmp_path):
    _tree(tmp_path, ["big"], 20, "train")
    _tree(tmp_path, ["small"], 3, "train")
    _tree(tmp_path, ["big", "small"], 2, "val")
    (tmp_path / "train" / "big" / "empty.png").write_bytes(b"")
    (tmp_path / "train" / "big" / "notes.jpg").write_text("not an image")
    splits = discover(tmp_path)
    report = scan(splits)
    skipped = {p.rsplit("/", 1)[-1] for p, _ in report.skipped}
    assert skipped == {"empty.png", "notes.jpg"}
    assert all("empty.png" not in p for p, _ in splits.train)
    text = " ".join(report.warnings)
    assert "tiny classes" in text and "small" in text
    assert "imbalance" in text
    assert len(report.duplicates) == 4  # val/*/0.png and 1.png are byte-identical to train's
    assert "leak" in text


def test_scan_refuses_a_single_class(tmp_path):
    _tree(tmp_path, ["only"], 4)
    from graft.errors import GraftError

    with pytest.raises(GraftError, match="at least two class folders"):
        scan(discover(tmp_path))


def test_val_classes_missing_from_train_are_an_error(tmp_path):
    _tree(tmp_path, ["a", "b"], 2, "train")
    _tree(tmp_path, ["a", "c"], 2, "val")
    from graft.errors import GraftError

    with pytest.raises(GraftError, match="classes that train/ lacks \\(c\\)"):
        discover(tmp_path)


def test_dataset_substitutes_a_file_broken_after_the_scan(tmp_path):
    _tree(tmp_path, ["a"], 2)
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    transform = create_transform(Preprocessing((8, 8)))
    dataset = ImageDataset([(paths[0], 0), (paths[1], 1)], transform)
    (tmp_path / "a" / "0.png").write_bytes(b"garbage")
    image, label = dataset[0]
    assert image.shape == (3, 8, 8) and label == 1


def test_transforms_follow_the_preprocessing():
    preprocessing = Preprocessing((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    tensor = create_transform(preprocessing)(white)
    assert tensor.shape == (3, 32, 32) and float(tensor.min()) == pytest.approx(1.0)
    train = create_transform(preprocessing, train=True, augment="standard")(white)
    assert train.shape == (3, 32, 32)


def test_expand_inputs_files_folders_and_globs(tmp_path):
    _tree(tmp_path, ["a", "b"], 2)
    (tmp_path / "a" / "readme.txt").write_text("ignored in folders")
    assert len(expand_inputs([str(tmp_path)])) == 4
    assert len(expand_inputs([str(tmp_path / "*" / "0.png")])) == 2
    from graft.errors import GraftError

    with pytest.raises(GraftError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.png")])


def test_dataset_splits_counts():
    splits = DatasetSplits(["a", "b"], [("x", 0), ("y", 0)], [("z", 1)])
    assert splits.counts("train") == {"a": 2, "b": 0}
