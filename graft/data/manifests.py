"""CSV manifests: a labelled ``path,label[,split]`` file read into splits, and the rows of any CSV graft reads (a
pool's ``path`` column too), each malformed line one error naming the file and the line.

A manifest is data: its relative paths are read from its folder and never climb out of it.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from graft.data.splits import SPLIT_NAMES, DatasetSplits, Sample, stratified_split
from graft.errors import GraftError
from graft.utils.outputs import contained

__all__ = ["discover_csv", "read_csv_rows", "split_label_set"]


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
    is data: its relative paths stay in its folder). An absolute path is taken as written (``discover_csv``)."""
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


def read_csv_rows(manifest: Path) -> list[dict]:
    """A CSV file's rows as dicts (UTF-8, a byte-order mark tolerated; delimiter sniffed among , ; and tab)."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError:
        raise GraftError(f"{manifest}: not UTF-8 text; save the CSV as UTF-8") from None
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else "", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return _manifest_rows(manifest, text, dialect)


def discover_csv(manifest: Path, val_fraction: float, seed: int, labels: str = "single") -> DatasetSplits:
    """The splits a ``path,label[,split]`` manifest lists (``discover`` on a CSV); ``labels`` as ``discover``'s."""
    rows = read_csv_rows(manifest)
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

