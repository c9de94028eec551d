"""Images in: robust loading, dataset discovery (class folders or a CSV manifest), the pre-training scan, datasets.

Data flows ``discover`` → ``scan`` (drops unreadable files, warns about imbalance and train/val duplicates) →
``ImageDataset`` with transforms built from the backbone's preprocessing.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import defaultdict
from pathlib import Path

from graft.data.shard_index import discover_shards, is_shard_source
from graft.data.splits import SPLIT_NAMES, DatasetSplits, Sample, stratified_split
from graft.errors import GraftError
from graft.utils.outputs import contained

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
    "discover_pool",
    "expand_inputs",
    "is_image_file",
    "split_label_set",
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
        return _discover_csv(root, val_fraction, seed, labels)
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


def _manifest_rows(manifest: Path, text: str, dialect) -> list[dict]:
    """The manifest's rows as dicts; a malformed line (a field over csv's 128 KiB limit, usually an unclosed quote
    swallowing the rest of the file) is a GraftError naming the CSV and the line."""
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    rows = []
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as error:
        line = reader.line_num + 1  # where the failing record starts: DictReader counts only finished rows
        if "field larger than field limit" in str(error):
            raise GraftError(f"{manifest}, line {line}: a field longer than {csv.field_size_limit():,} characters "
                             "(an unclosed quote?); close the quote or shorten the field") from None
        raise GraftError(f"{manifest}, line {line}: not a readable CSV row ({error}); fix the row") from None
    return rows


def _beside(manifest: Path, line: int, raw_path: str) -> Path:
    """A relative manifest path, read from the CSV's folder; one that climbs out of it with ``..`` is refused (the CSV
    is data: its relative paths stay in its folder). An absolute path is taken as written (``_discover_csv``)."""
    try:
        return contained(manifest.parent, raw_path, nested=True, links=True)  # links: a user's data may use them
    except GraftError as error:
        raise GraftError(f"{manifest}, line {line}: the path {error}; list files inside the CSV's folder, or by "
                         "absolute path") from None


def split_label_set(label: str, separator: str | None) -> tuple[str, ...]:
    """A label cell as its sorted, de-duplicated class names: split on ``separator`` (None: any whitespace)."""
    return tuple(sorted({name.strip() for name in label.split(separator) if name.strip()}))


def _label_reader(manifest: Path, rows: list[dict], labels: str, notes: list[str]):
    """How this manifest's label cells become keys: ``(multi_label, read)``, ``read(label, line)`` giving the cell's
    canonical text (sets joined by ';'). Refuses sets for a command that takes single labels ("single")."""
    cells = [(line, (row.get("label") or "").strip()) for line, row in enumerate(rows, start=2)]
    with_semicolon = next(((line, label) for line, label in cells if ";" in label), None)
    with_space = next(((line, label) for line, label in cells if len(label.split()) > 1), None)
    if labels == "single" and with_semicolon:
        line, label = with_semicolon
        raise GraftError(f"{manifest}, line {line}: the label '{label}' is a set of classes (multi-label), which this "
                         "command does not handle; multi-label data trains with graft fit and predicts with graft "
                         "predict")
    multi = labels == "multi" or with_semicolon is not None
    if not multi:
        if with_space and labels == "auto":
            notes.append(f"{manifest}, line {with_space[0]}: the label '{with_space[1]}' is read as one class name; "
                         "pass --multi-label to read space-separated labels as sets (fastai's convention)")
        return False, lambda label, line: label
    separator = ";" if with_semicolon else None

    def read(label: str, line: int) -> str:
        names = split_label_set(label, separator)
        if not names:
            raise GraftError(f"{manifest}, line {line}: the label '{label}' names no class; fill it in or delete the "
                             "row")
        return ";".join(names)

    return True, read


def _read_manifest(manifest: Path) -> list[dict]:
    """A CSV manifest's rows (UTF-8, a byte-order mark tolerated; delimiter sniffed among , ; and tab)."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError:
        raise GraftError(f"{manifest}: not UTF-8 text; save the CSV as UTF-8") from None
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else "", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return _manifest_rows(manifest, text, dialect)


def _discover_csv(manifest: Path, val_fraction: float, seed: int, labels: str = "single") -> DatasetSplits:
    rows = _read_manifest(manifest)
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise GraftError(f"{manifest}: expected a header with columns path,label (and optionally split)")
    by_split: dict[str, dict[str, str]] = defaultdict(dict)  # split → {file: label}
    where: dict[str, tuple[str, str]] = {}  # file → (split, label) of its first row
    notes: list[str] = []
    multi, read = _label_reader(manifest, rows, labels, notes)
    for line, row in enumerate(rows, start=2):
        raw_path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not raw_path or not label:
            raise GraftError(f"{manifest}, line {line}: empty path or label; fill it in or delete the row")
        label = read(label, line)
        if "\0" in raw_path:
            raise GraftError(f"{manifest}, line {line}: the path holds a NUL byte, which no file name can; fix the row")
        file = str(Path(raw_path) if Path(raw_path).is_absolute() else _beside(manifest, line, raw_path))
        split = (row.get("split") or "train").strip().lower() or "train"
        if split not in SPLIT_NAMES:
            raise GraftError(f"{manifest}, line {line}: split '{split}' for {raw_path} is not one of train, val, test")
        if file in where:
            if where[file] != (split, label):
                raise GraftError(f"{manifest}, line {line}: {raw_path} is listed twice with different labels or "
                                 f"splits ({'/'.join(where[file])} and {split}/{label}); keep one row")
            notes.append(f"{manifest}, line {line}: duplicate row for {raw_path} ignored")
            continue
        where[file] = (split, label)
        by_split[split][file] = label

    def names(split: str) -> set[str]:
        return {name for label in by_split[split].values() for name in (label.split(";") if multi else [label])}

    classes = sorted(names("train"))
    unknown = sorted((names("val") | names("test")) - set(classes))
    if unknown:
        raise GraftError(f"{manifest}: val/test rows have labels with no training rows ({', '.join(unknown[:5])}); "
                         "add training rows for them or remove those rows")
    index = {name: i for i, name in enumerate(classes)}
    label_sets = {file: tuple(index[name] for name in label.split(";")) for split in by_split
                  for file, label in by_split[split].items()} if multi else None

    def samples(split: str) -> list[Sample]:
        if multi:
            return sorted((file, label_sets[file][0]) for file in by_split[split])
        return sorted((file, index[label]) for file, label in by_split[split].items())

    train, val = samples("train"), samples("val")
    if not val:  # multi-label: stratified on each image's first class, which keeps every class in train
        train, val = stratified_split(train, val_fraction, seed)
    if len(notes) > 3:
        notes = notes[:3] + [f"... {len(notes) - 3} more duplicate rows"]
    source = f"CSV manifest {manifest}" + (" (multi-label)" if multi else "")
    return DatasetSplits(classes, train, val, samples("test"), source, notes, str(manifest), label_sets=label_sets)


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


def discover_pool(source: str | os.PathLike) -> list[str]:
    """Unlabelled images (``fit --unlabeled``): a folder (images anywhere below it), a CSV with a ``path`` column
    (other columns ignored; relative paths stay inside the CSV's folder), a glob pattern or one image file. Sorted,
    de-duplicated; tar shards are refused (their samples are no files the feature cache can key).

    Raises:
        GraftError: when the source holds no images, or is a shard set.
    """
    if is_shard_source(source):
        raise GraftError(f"{source}: --unlabeled reads image files and tar shards hold none; pass the folder (or "
                         "CSV) the shards were written from")
    path = Path(source)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        found = _pool_csv(path)
    else:
        found = expand_inputs([str(source)])
    if not found:
        raise GraftError(f"{source}: no images found for --unlabeled; expected a folder of images, a glob or a CSV "
                         "with a path column")
    return sorted(dict.fromkeys(found))


def _pool_csv(manifest: Path) -> list[str]:
    rows = _read_manifest(manifest)
    if not rows or "path" not in rows[0]:
        raise GraftError(f"{manifest}: expected a header with a path column (a label column is not needed)")
    found = []
    for line, row in enumerate(rows, start=2):
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise GraftError(f"{manifest}, line {line}: empty path; fill it in or delete the row")
        if "\0" in raw_path:
            raise GraftError(f"{manifest}, line {line}: the path holds a NUL byte, which no file name can; fix the row")
        found.append(str(Path(raw_path) if Path(raw_path).is_absolute() else _beside(manifest, line, raw_path)))
    return found
