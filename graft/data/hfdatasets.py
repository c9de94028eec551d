"""Hugging Face ``datasets`` as input: a ``save_to_disk`` folder, parquet or arrow files, or ``hf:NAME[:CONFIG]``.

``discover`` hands such a source here (``is_hf_source``) and gets ordinary ``DatasetSplits`` back, so every command
that takes DATA (fit, features, probe, advise, evaluate, ...) reads it like a folder. Each split's image column is read
with ``Image(decode=False)``: ``datasets`` never decodes an image with PIL. The stored bytes of each image are written
once, as they are (never re-encoded), to a graft-owned folder named by the dataset's fingerprint
(``$GRAFT_HF_IMAGES``, default ``~/.cache/graft/hf-images``: ``FINGERPRINT/SPLIT/INDEX.EXT``), where graft's own
guarded decoder reads them like any file: the same formats, pixel limits and skip list. Every reader of samples (the
scan, training, the feature cache keyed by path, size and mtime, report thumbnails) works unchanged, and the features
of a dataset stay cached while its fingerprint does. A path-typed image column (paths instead of bytes) is read in
place, and only inside the dataset's folder.

The dataset's JSON files (``dataset_dict.json``, ``state.json``, ``dataset_info.json``) are data: the names they give
are checked to be plain names inside the folder before ``datasets`` opens anything, and any failure to load is one
``GraftError`` line naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from graft.data.hf_images import datasets_module, hf_images_folder, materialise
from graft.data.splits import SPLIT_NAMES, DatasetSplits, stratified_split
from graft.errors import GraftError
from graft.utils.outputs import contained
from graft.utils.text import display_name

__all__ = ["HF_PREFIX", "TABLE_SUFFIXES", "discover_hf", "is_hf_source"]

HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".parquet", ".arrow")


def _tables(folder: Path) -> list[Path]:
    """The parquet/arrow files directly in ``folder`` or in its ``data/`` (a hub snapshot's layout), sorted."""
    found = []
    for where in (folder, folder / "data"):
        try:
            found += sorted(p for p in where.iterdir() if p.suffix.lower() in TABLE_SUFFIXES and p.is_file()
                            and not p.name.startswith("."))
        except OSError:  # no such folder, or unreadable: discovery's own checks say so for folders of images
            continue
    return found


def is_hf_source(path: str | os.PathLike) -> bool:
    """``hf:NAME``, a parquet or arrow file, a ``save_to_disk`` folder, or a folder of parquet/arrow files."""
    text = str(path)
    if text.startswith(HF_PREFIX):
        return True
    place = Path(text)
    if place.is_file():
        return place.suffix.lower() in TABLE_SUFFIXES
    if not place.is_dir():
        return False
    return ((place / "dataset_dict.json").is_file() or (place / "state.json").is_file()
            or bool(_tables(place)))


# ------------------------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0][:150] if str(error) else type(error).__name__
        raise GraftError(f"{path}: not a readable datasets file ({reason}); write the dataset again with "
                         "save_to_disk") from None
    if not isinstance(data, dict):
        raise GraftError(f"{path}: not a JSON object; write the dataset again with save_to_disk")
    return data


def _plain(path: Path, field: str, name) -> str:
    """``name`` read from ``path``'s ``field``, refused unless it is a plain name inside the file's folder."""
    try:
        contained(path.parent, name)
    except GraftError as error:
        raise GraftError(f"{path}: {field} {error}; write the dataset again with save_to_disk") from None
    return name


def _check_saved(folder: Path) -> None:
    """The names a ``save_to_disk`` folder's JSON gives (split folders, arrow files) are plain names inside it:
    checked before ``datasets`` opens any of them."""
    parts = [folder]
    if (folder / "dataset_dict.json").is_file():
        index = folder / "dataset_dict.json"
        splits = _read_json(index).get("splits")
        if not isinstance(splits, list) or not splits:
            raise GraftError(f"{index}: splits is {display_name(repr(splits))[:60]}: expected a list of split names; "
                             "write the dataset again with save_to_disk")
        parts = [folder / _plain(index, "splits", name) for name in splits]
    for part in parts:
        state = part / "state.json"
        files = _read_json(state).get("_data_files")
        if not isinstance(files, list) or not files or not all(isinstance(f, dict) for f in files):
            raise GraftError(f"{state}: _data_files is not a list of files; write the dataset again with save_to_disk")
        for entry in files:
            _plain(state, "_data_files", entry.get("filename"))
        _read_json(part / "dataset_info.json")


def _loading(where: str, action):
    """``action()``, any failure inside ``datasets`` (malformed JSON, a damaged arrow file, no network) as one line."""
    try:
        return action()
    except GraftError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets/pyarrow raise many types; the user needs one line
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise GraftError(f"{where}: not a readable Hugging Face dataset ({type(error).__name__}: {reason}); check "
                         "it was written by datasets (save_to_disk, to_parquet)") from None


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("GRAFT_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _file_fingerprint(files: list[Path]) -> str:
    """In-memory tables get random fingerprints from ``datasets``: parquet/arrow files are named by their paths, sizes
    and modification times instead (as the feature cache names files)."""
    digest = hashlib.sha256()
    for file in files:
        info = os.stat(file)
        digest.update(f"{os.path.abspath(file)}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _split_of(name: str) -> str:
    """A split name (``validation``, ``train-00000-of-00002.parquet``) → train, val, test, or itself when unknown."""
    head = name.split("-")[0].split(".")[0].lower()
    return next((split for split, names in SPLIT_NAMES.items() if head in names), head)


def _load(path: str) -> tuple[dict, Path, str]:
    """({graft split or other name: (Dataset, fingerprint)}, the folder image paths must stay in, the source)."""
    datasets = datasets_module()
    if path.startswith(HF_PREFIX):
        name, _, config = path[len(HF_PREFIX):].partition(":")
        if not name:
            raise GraftError(f"{path}: expected hf:NAME or hf:NAME:CONFIG (a dataset on the Hugging Face hub)")
        if _offline():
            raise GraftError(f"{path}: a hub dataset needs the network and graft is offline (GRAFT_OFFLINE or "
                             f"HF_HUB_OFFLINE); on a connected machine run datasets.load_dataset({name!r}"
                             f"{', ' + repr(config) if config else ''}).save_to_disk('FOLDER') and pass FOLDER")
        loaded = _loading(path, lambda: datasets.load_dataset(name, config or None))
        folder, source = Path(datasets.config.HF_DATASETS_CACHE), f"Hugging Face hub dataset {name}"
    else:
        place = Path(path)
        if place.is_dir() and ((place / "dataset_dict.json").is_file() or (place / "state.json").is_file()):
            _check_saved(place)
            loaded = _loading(path, lambda: datasets.load_from_disk(str(place)))
            folder, source = place, f"Hugging Face dataset {place} (save_to_disk)"
        else:
            return _load_tables(place)
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("train", loaded)]
    found: dict = {}
    for split, part in parts:
        if _split_of(str(split)) in found:
            raise GraftError(f"{path}: two splits map to {_split_of(str(split))} ({split} and another); keep one")
        found[_split_of(str(split))] = (part, part._fingerprint)
    return found, folder, source


def _load_tables(place: Path) -> tuple[dict, Path, str]:
    """Parquet or arrow files: one file is the train split; a folder's files go to the split their name starts with
    (``train-00000-of-00001.parquet``, ``validation.arrow``), any other name to train."""
    datasets = datasets_module()
    files = [place] if place.is_file() else _tables(place)
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of(file.name) if place.is_dir() else "train", []).append(file)
    parts = {}
    for split, members in by_split.items():
        if len({f.suffix.lower() for f in members}) > 1:
            raise GraftError(f"{place}: split {split} mixes parquet and arrow files; keep one kind per split")
        if members[0].suffix.lower() == ".parquet":
            part = _loading(str(members[0]), lambda m=members: datasets.Dataset.from_parquet(
                [str(f) for f in m], keep_in_memory=True))
        else:
            part = _loading(str(members[0]), lambda m=members: datasets.concatenate_datasets(
                [datasets.Dataset.from_file(str(f)) for f in m]))
        parts[split] = (part, _file_fingerprint(members))
    folder = place.parent if place.is_file() else place
    return parts, folder, f"{'parquet/arrow files in ' if place.is_dir() else ''}{place}"


# ------------------------------------------------------------------------------------------------------------- columns


def _column(part, kind: str, named: str | None, where: str, flag: str) -> str:
    """The column named by ``flag``, else the one column whose feature is ``kind`` (``Image`` or ``ClassLabel``)."""
    columns = list(part.features)
    if named:
        if named not in part.features:
            raise GraftError(f"{where}: no column {named!r} ({flag}); the columns are {', '.join(columns)}")
        return named
    found = [name for name, feature in part.features.items() if type(feature).__name__ == kind]
    if len(found) == 1:
        return found[0]
    what = "several" if found else "no"
    raise GraftError(f"{where}: {what} {kind} column{'s' if found else ''} ({', '.join(found or columns)}); name the "
                     f"one to use with {flag}")


def _classes(part, label: str, where: str) -> list[str]:
    """Class names: a ClassLabel's own (in its order: the dataset's label ids), else the sorted distinct values."""
    feature = part.features[label]
    if type(feature).__name__ == "ClassLabel":
        return [str(name) for name in feature.names]
    values = {value for value in part[label] if value is not None}
    if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise GraftError(f"{where}: column {label!r} holds no class labels (text or integers); name the label column "
                         "with --label-column")
    return [str(value) for value in sorted(values, key=lambda v: (isinstance(v, str), v))]


def _labels(part, label: str, classes: list[str], where: str) -> list[int | None]:
    """Each row's class index, None for an unlabelled row (no value, or a ClassLabel's -1)."""
    if type(part.features[label]).__name__ == "ClassLabel":
        names = [str(name) for name in part.features[label].names]
        if names != classes:
            raise GraftError(f"{where}: column {label!r} has classes {names[:5]} where train has {classes[:5]}; give "
                             "every split the same ClassLabel")
        return [None if value is None or value < 0 else int(value) for value in part[label]]
    index = {name: i for i, name in enumerate(classes)}
    labels = [None if value is None else index.get(str(value), -1) for value in part[label]]
    unknown = next((value for value, i in zip(part[label], labels) if i == -1), None)
    if unknown is not None:
        raise GraftError(f"{where}: label {display_name(str(unknown))!r} has no training rows; add training rows for "
                         "it or remove those rows")
    return labels



# ------------------------------------------------------------------------------------------------------------ discover


def discover_hf(path: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, image_column: str | None = None,
                label_column: str | None = None) -> DatasetSplits:
    """Splits of a Hugging Face dataset (see the module's docstring): train, validation/valid/val → val, test; without
    a val split, graft's seeded stratified split of train. Samples are image files graft reads like a folder's.

    Args:
        image_column: the image column (default: the one ``Image`` feature).
        label_column: the label column (default: the one ``ClassLabel`` feature).

    Raises:
        GraftError: the package missing, an unreadable or malformed dataset, no train split, columns not found,
            an image path leaving the dataset's folder, offline with a hub name: one line each.
    """
    text = str(path)
    parts, folder, source = _load(text)
    folder = Path(os.path.abspath(folder))  # path-typed images are checked, and named, inside it
    notes = [f"{text}: split {name!r} ignored (graft reads train, validation and test)"
             for name in sorted(set(parts) - set(SPLIT_NAMES))]
    parts = {split: parts[split] for split in SPLIT_NAMES if split in parts}
    if "train" not in parts:
        raise GraftError(f"{text}: no train split; graft needs one (a split named train, or a single Dataset)")
    train = parts["train"][0]
    where = f"{text} split train"
    image = _column(train, "Image", image_column, where, "--image-column")
    label = _column(train, "ClassLabel", label_column, where, "--label-column")
    classes = _classes(train, label, where)
    for split, (part, _) in parts.items():
        for column in (image, label):
            if column not in part.features:
                raise GraftError(f"{text} split {split}: no column {column!r}; give every split the same columns")
    labels = {split: _labels(part, label, classes, f"{text} split {split}") for split, (part, _) in parts.items()}
    identity = json.dumps([[split, print_] for split, (_, print_) in parts.items()] + [image, label])
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
    samples = materialise(parts, image, labels, fingerprint, folder, notes)
    train_samples, val = samples["train"], samples.get("val", [])
    how = "train and validation splits"
    if not val:
        train_samples, val = stratified_split(train_samples, val_fraction, seed)
        how = f"train split stratified, val_fraction={val_fraction}, seed={seed}"
    root = os.path.abspath(text) if not text.startswith(HF_PREFIX) else str(hf_images_folder() / fingerprint)
    return DatasetSplits(classes, train_samples, val, samples.get("test", []), f"{source}, {how}, fingerprint "
                         f"{fingerprint}", notes, root)
