"""Hugging Face datasets as input (issue 28): save_to_disk folders, parquet files, hub names, columns, hostile paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graft.data.discovery import discover
from graft.errors import GraftError

datasets = pytest.importorskip("datasets")

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(autouse=True)
def images_home(tmp_path, monkeypatch):
    """graft writes the datasets' image bytes under GRAFT_HF_IMAGES: a fresh folder per test, never the user's."""
    monkeypatch.setenv("GRAFT_HF_IMAGES", str(tmp_path / "hf-images"))
    return tmp_path / "hf-images"


def rows(folder: Path, split: str, image: str = "image", label: str = "label") -> dict:
    """The folder split's images as stored bytes, in the order graft lists a folder (class, then file name)."""
    files = [(path, CLASSES.index(path.parent.name)) for path in sorted((folder / split).glob("*/*.png"))]
    return {image: [{"bytes": path.read_bytes(), "path": path.name} for path, _ in files],
            label: [index for _, index in files]}


def features(image: str = "image", label: str = "label"):
    return datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=CLASSES)})


def saved(shapes: Path, target: Path) -> Path:
    """The shapes fixture as a DatasetDict with train and validation splits, written with save_to_disk."""
    parts = {"train": datasets.Dataset.from_dict(rows(shapes, "train"), features=features()),
             "validation": datasets.Dataset.from_dict(rows(shapes, "val"), features=features())}
    datasets.DatasetDict(parts).save_to_disk(str(target))
    return target


def test_save_to_disk_trains_as_its_folder(shapes, tmp_path):
    """Same seed, same images, same splits: a fit from the saved dataset gives the folder's metrics."""
    from conftest import tiny_config

    from graft.training.fitting import fit

    folder = saved(shapes, tmp_path / "saved")
    splits = discover(folder)
    assert splits.classes == CLASSES
    assert [label for _, label in splits.train] == [label for _, label in discover(shapes).train]
    assert len(splits.val) == 30 and not splits.test
    assert Path(splits.train[0][0]).read_bytes() == sorted((shapes / "train").glob("*/*.png"))[0].read_bytes()
    overrides = {"train.strategy": "finetune", "train.epochs": 2, "train.lr": 5e-2}
    from_folder = fit(tiny_config(shapes, tmp_path / "a", **overrides), verbose=False).metrics["val"]
    from_dataset = fit(tiny_config(folder, tmp_path / "b", **overrides), verbose=False).metrics["val"]
    assert from_folder["accuracy"] > 0.4  # learnt something: equal metrics are not two chance-level runs
    assert from_dataset["accuracy"] == from_folder["accuracy"]
    assert from_dataset["confusion_matrix"] == from_folder["confusion_matrix"]
    assert from_dataset["loss"] == pytest.approx(from_folder["loss"], rel=1e-5)


def test_parquet_files_and_named_columns(shapes, tmp_path, images_home):
    """A folder of parquet files split by name, columns without Image/ClassLabel features named by the flags."""
    folder = tmp_path / "pq"
    folder.mkdir()
    for split, name in (("train", "train-00000-of-00001.parquet"), ("val", "validation-00000-of-00001.parquet")):
        data = rows(shapes, split, "picture", "kind")
        data["kind"] = [CLASSES[i] for i in data["kind"]]  # text labels, no ClassLabel
        data["picture"] = [item["bytes"] for item in data["picture"]]  # plain binary, no Image feature
        datasets.Dataset.from_dict(data).to_parquet(str(folder / name))
    with pytest.raises(GraftError, match="--image-column"):
        discover(folder)
    splits = discover(folder, image_column="picture", label_column="kind")
    assert splits.classes == CLASSES and len(splits.train) == 72 and len(splits.val) == 30
    stored = {Path(path).read_bytes() for path, _ in splits.val}
    assert stored == {path.read_bytes() for path in (shapes / "val").glob("*/*.png")}
    assert all(str(images_home) in path for path, _ in splits.train)
    with pytest.raises(GraftError, match="no column 'photo'"):
        discover(folder, image_column="photo", label_column="kind")
    with pytest.raises(GraftError, match="Hugging Face dataset"):
        discover(shapes, label_column="kind")


def test_one_parquet_file_gets_a_seeded_val_split(shapes, tmp_path):
    file = tmp_path / "shapes.parquet"
    datasets.Dataset.from_dict(rows(shapes, "train"), features=features()).to_parquet(str(file))
    splits = discover(file, val_fraction=0.25, seed=3)
    assert len(splits.train) + len(splits.val) == 72 and len(splits.val) == 18
    assert splits.counts("val") == {name: 6 for name in CLASSES}
    stamps = {path: os.stat(path).st_mtime_ns for path, _ in splits.train + splits.val}
    # the same fingerprint: the images written the first time are reused untouched, so their feature-cache keys
    # (path, size, mtime) hold; another file's images go to another folder
    again = discover(file, val_fraction=0.25, seed=3)
    assert again.train == splits.train and again.val == splits.val
    assert {path: os.stat(path).st_mtime_ns for path, _ in again.train + again.val} == stamps
    datasets.Dataset.from_dict(rows(shapes, "val"), features=features()).to_parquet(str(file))
    assert {Path(p).parents[1] for p, _ in discover(file).train}.isdisjoint({Path(p).parents[1] for p in stamps})


def test_path_column_stays_inside_the_dataset_folder(shapes, tmp_path):
    """Paths instead of bytes are read in place inside the folder; one that climbs out is refused, naming the row."""
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "paths"
    (folder / "images").mkdir(parents=True)
    source = sorted((shapes / "train").glob("*/*.png"))[:6]
    for path in source:
        (folder / "images" / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    names = [f"images/{path.parent.name}-{path.name}" for path in source]
    labels = [CLASSES.index(path.parent.name) for path in source]
    plain = datasets.Features({"file": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSES)})

    def write(paths):
        table = datasets.Dataset.from_dict({"file": paths, "label": labels}, features=plain)
        table = table.cast_column("file", datasets.Image(decode=False)).rename_column("file", "image")
        pyarrow_parquet.write_table(table.data.table, str(folder / "train.parquet"))  # to_parquet would embed them

    write(names)
    splits = discover(folder / "train.parquet", val_fraction=0.5)
    assert sorted(path for path, _ in splits.train + splits.val) == sorted(str(folder / name) for name in names)
    secret = tmp_path / "secret.png"
    secret.write_bytes(source[0].read_bytes())
    for hostile in ("../secret.png", str(secret)):
        write(names[:-1] + [hostile])
        with pytest.raises(GraftError, match="row 5: the image path .* keep the image files inside"):
            discover(folder / "train.parquet", val_fraction=0.5)


def test_malformed_state_json_is_one_line(shapes, tmp_path):
    folder = saved(shapes, tmp_path / "saved")
    state = folder / "train" / "state.json"
    state.write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "graft", "fit", str(folder), "-o", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "state.json" in lines[0] and "Traceback" not in result.stderr, result.stderr
    state.write_text(json.dumps({"_data_files": [{"filename": "../../validation/data-00000-of-00001.arrow"}]}))
    with pytest.raises(GraftError, match="_data_files .* climbs out"):
        discover(folder)


def test_hub_name_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GraftError, match=r"offline .*load_dataset\('beans'\)\.save_to_disk\('FOLDER'\)"):
        discover("hf:beans")


def test_missing_datasets_package_is_one_line(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    script = ("import sys; sys.modules['datasets'] = None\n"
              "from graft.data.discovery import discover\n"
              "from graft.errors import GraftError\n"
              f"try:\n    discover({str(tmp_path / 'x.parquet')!r})\n"
              "except GraftError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "Hugging Face datasets need the datasets package: pip install 'graft[datasets]'"
