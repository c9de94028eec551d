"""Images in: robust loading, dataset discovery (class folders or a CSV manifest), the pre-training scan, datasets.

Data flows ``discover`` → ``scan`` (drops unreadable files, warns about imbalance and train/val duplicates) →
``ImageDataset`` with transforms built from the backbone's preprocessing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from graft.data.manifests import discover_csv
from graft.data.shard_index import discover_shards, is_shard_source
from graft.data.splits import SPLIT_NAMES, DatasetSplits, Sample, stratified_split
from graft.errors import GraftError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMBALANCE_RATIO",
    "LABEL_MODES",
    "LITTER",
    "SPLIT_NAMES",
    "TINY_CLASS",
    "DatasetSplits",
    "Sample",
    "discover",
    "expand_inputs",
    "is_image_file",
    "stratified_split",
    "walk_images"
]

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LITTER = frozenset({"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini", "@eaDir"})  # archive and OS by-products
TINY_CLASS = 5  # fewer images than this in a class's training split earns a warning


IMBALANCE_RATIO = 3.0  # largest / smallest class above this earns a warning

# how discover reads a CSV's label column: "single" (one class a row; a row whose label holds ';' is refused: the
# command cannot handle sets), "auto" (';' in any label makes every label a set; spaces stay part of a name) or
# "multi" (--multi-label: sets split on ';' when any row has one, else on whitespace: fastai's convention)
LABEL_MODES = ("single", "auto", "multi")


def is_image_file(path: Path) -> bool:
    """A candidate image by name: a known extension in any case, or no extension at all (the scan decodes it to
    decide); hidden files and OS litter never are."""
    name = path.name
    if name.startswith(".") or name in LITTER:
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or not path.suffix


def walk_images(root: Path, notes: list[str] | None = None) -> list[str]:
    """Sorted candidate image paths under ``root``, following symbolic links once and never around a loop.

    Hidden folders and litter (``__MACOSX``, ``.DS_Store``) are skipped silently; files with a non-image extension
    and link loops are counted into ``notes``.
    """
    found, ignored, seen = [], [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:  # reached again through a link: a loop or a second path to it
            if notes is not None:
                notes.append(f"{folder}: symbolic link back to a folder already read (a loop?); skipped it")
            subfolders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in LITTER)
        for name in files:
            path = Path(folder) / name
            if is_image_file(path):
                found.append(str(path))
            elif not name.startswith(".") and name not in LITTER:
                ignored.append(str(path))
    if ignored and notes is not None:
        notes.append(f"{len(ignored)} file(s) without an image extension ignored, e.g. {ignored[0]}")
    return sorted(found)


# ------------------------------------------------------------------------------------------------------------ discovery


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _class_folders(root: Path, notes: list[str] | None = None) -> dict[str, list[str]]:
    """{class name: sorted image paths} for a root/CLASS/**/image tree; hidden folders and litter are ignored."""
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    except PermissionError:
        raise GraftError(f"{root}: permission denied listing the folder; check its permissions") from None
    folders = {}
    for class_dir in entries:
        folders[class_dir.name] = walk_images(class_dir, notes)
    return folders


def _samples(folders: dict[str, list[str]], classes: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    return [(path, index[name]) for name, paths in folders.items() for path in paths]


def discover(path: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0,
             test_fraction: float = 0.0, image_column: str | None = None,
             label_column: str | None = None, labels: str = "single") -> DatasetSplits:
    """Finds the samples of a class-per-folder tree or a CSV manifest.

    Layouts: a shard set ``graft shard`` wrote (its folder, or a brace pattern of its ``.tar`` files);
    ``root/train/CLASS/*`` with ``root/val/CLASS/*`` (and optional ``root/test/``); ``root/train`` alone
    or a plain ``root/CLASS/*`` tree, split stratified by ``val_fraction``; or ``manifest.csv`` with columns
    ``path,label`` and optionally ``split`` (train/val/test), paths relative to the CSV's folder; or a Hugging Face
    dataset (a ``save_to_disk`` folder, parquet/arrow files, ``hf:NAME[:CONFIG]``: ``graft.data.hfdatasets``).

    Args:
        labels: how a CSV's label column is read, one of ``LABEL_MODES``: "single" (a command that handles one class
            an image: a manifest of label sets is refused in one line), "auto" (sets when a label holds ';') or
            "multi" (``--multi-label``: sets separated by ';' or, failing that, whitespace).
        test_fraction: carve a stratified, seeded test split of about this fraction of the train + val images from
            train (after val is held out, so the two are disjoint); for data without a test split of its own.
        image_column, label_column: a Hugging Face dataset's columns (default: its Image and ClassLabel features);
            refused for other data.

    Raises:
        GraftError: when the path holds no recognisable dataset, with what was expected; a test_fraction for data
            that already has a test split.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if labels == "multi" and Path(path).suffix.lower() not in (".csv", ".tsv"):
        raise GraftError(f"{path}: multi-label data is read from a CSV manifest (path,label with labels separated by "
                         "spaces or ';'); write one, or drop --multi-label")
    from graft.data import hfdatasets  # imported here: it builds on this module

    if hfdatasets.is_hf_source(path):
        splits = hfdatasets.discover_hf(path, val_fraction, seed, image_column, label_column)
        return _carve_test(path, splits, test_fraction, seed)
    if image_column or label_column:
        raise GraftError(f"{path}: --image-column and --label-column name the columns of a Hugging Face dataset; "
                         "drop them for class folders, a CSV or shards")
    if is_shard_source(path):
        if test_fraction:  # the shards' splits were fixed when they were written
            raise GraftError(f"{path}: tar shards keep the splits they were written with; carve the test split "
                             "when sharding (graft shard on a folder with test/) and drop --test-fraction")
        return discover_shards(path)
    return _carve_test(path, _discover(Path(path), val_fraction, seed, labels), test_fraction, seed)


def _carve_test(path, splits: DatasetSplits, test_fraction: float, seed: int) -> DatasetSplits:
    """``discover``'s test split carved from train (``test_fraction`` of the train + val images), when asked."""
    if not test_fraction:
        return splits
    if splits.test:
        raise GraftError(f"{path}: already has a test split ({len(splits.test)} images); drop --test-fraction to "
                         "use it as it is")
    pool = len(splits.train) + len(splits.val)  # the fraction is of the train + val images, as val_fraction's is
    share = min(0.95, test_fraction * pool / max(1, len(splits.train)))
    splits.train, splits.test = stratified_split(splits.train, share, seed + 1)
    splits.source += f"; test carved stratified, test_fraction={test_fraction}"
    return splits


def _discover(root: Path, val_fraction: float, seed: int, labels: str = "single") -> DatasetSplits:
    if root.is_file() and root.suffix.lower() in (".csv", ".tsv"):
        return discover_csv(root, val_fraction, seed, labels)
    if not root.is_dir():
        raise GraftError(f"{root}: no such folder or CSV manifest; expected DATA/CLASS/*.jpg or a path,label CSV")
    train_dir = _find_split_dir(root, "train")
    base = train_dir or root
    notes: list[str] = []
    train_folders = _class_folders(base, notes)
    classes = sorted(name for name, files in train_folders.items() if files)
    if not classes:
        raise GraftError(f"{base}: no class folders with images found; expected {base}/CLASS_NAME/image.jpg")
    empty = sorted(name for name, files in train_folders.items() if not files)
    if empty:
        notes.append(f"empty class folder(s) ignored: {', '.join(empty[:10])}; add images to train them")
    train = _samples({k: v for k, v in train_folders.items() if k in classes}, classes)
    val_dir, test_dir = (_find_split_dir(root, "val"), _find_split_dir(root, "test")) if train_dir else (None, None)
    if val_dir:
        val = _split_samples(val_dir, classes, "val")
        source = f"{train_dir.name}/ and {val_dir.name}/ folders"
    else:
        train, val = stratified_split(train, val_fraction, seed)
        source = f"one tree split stratified, val_fraction={val_fraction}, seed={seed}"
    test = _split_samples(test_dir, classes, "test") if test_dir else []
    return DatasetSplits(classes, train, val, test, source, notes, str(root))


def _split_samples(split_dir: Path, classes: list[str], split: str) -> list[Sample]:
    folders = {k: v for k, v in _class_folders(split_dir).items() if v}
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise GraftError(
            f"{split_dir}: {split} has classes that train/ lacks ({', '.join(unknown[:5])}); "
            "add training images for them or remove those folders"
        )
    return _samples(folders, classes)



def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (recursively, image files only) and glob patterns → a sorted, de-duplicated list of paths."""
    import glob

    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += walk_images(path)
        elif path.exists():
            found.append(str(path))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise GraftError(f"{item}: no such file, folder or matching glob pattern")
            found += [m for m in matches if Path(m).is_file()]
    return list(dict.fromkeys(found))
