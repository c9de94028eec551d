"""Lists of files to leave out of training or to relabel (`graft fit --exclude FILE`), and the decisions CSV the review
page of `graft serve RUN --audit OUT` writes.

A list is a CSV with a ``path`` column; what happens to each listed file:

- a decisions CSV (``path,decision,label``): ``exclude`` drops the file, ``relabel`` gives it ``label`` (one of the
  dataset's classes), ``keep`` leaves it as it is; the last row for a path wins (the review page appends);
- a ``path,label`` CSV (no ``decision`` column): relabelled to ``label``, or dropped where ``label`` is empty;
- anything else with a ``path`` column (``graft audit``'s ``label_issues.csv``, a plain list): every listed file is
  dropped. A ``suggested`` label is never applied on its own: a person confirms it in a decisions CSV.

Paths are data: a relative one is read from the dataset's root (the data folder, or a CSV manifest's folder), then
from the list's own folder; one that climbs out with ``..`` is refused; an absolute one is matched as written. A
path is only ever compared with the discovered samples, never opened, so a listed file that is not in the dataset
is counted and warned about, nothing more. Decisions apply to the file in whichever split holds it (see
docs/decisions.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from graft.data.discovery import DatasetSplits
from graft.errors import GraftError
from graft.utils.files import atomic_write
from graft.utils.outputs import contained
from graft.utils.text import FORMULA_STARTS, display_name

__all__ = [
    "DECISIONS", "DECISION_COLUMNS", "EXCLUDED_COLUMNS", "Exclusions", "Listed", "append_decision", "apply_exclusions",
    "dataset_root", "excluded_text", "parse_exclude", "read_csv_rows", "read_listed", "resolve_listed"
]

DECISIONS = ("exclude", "relabel", "keep")
DECISION_COLUMNS = ("path", "decision", "label")  # what the review page writes and --exclude reads
EXCLUDED_COLUMNS = ("path", "split", "action", "given", "label", "listed_in")  # RUN/excluded.csv
MAX_LIST_BYTES = 256 * 1024 * 1024  # a list of paths this large is not a list a person reviewed


@dataclass(frozen=True)
class Listed:
    """One row of a list: the path as written, what to do (exclude, relabel, keep) and the new label."""

    path: str
    decision: str
    label: str
    source: str  # the list's file
    line: int


@dataclass
class Exclusions:
    """What ``apply_exclusions`` did: one row per changed file, and how many listed paths were not in the data."""

    files: list[str]
    rows: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # listed paths (as written) that match no discovered sample

    def count(self, action: str, split: str | None = None) -> int:
        return sum(row["action"] == action and split in (None, row["split"]) for row in self.rows)

    def summary(self) -> dict:
        """For graft.json and metrics.json."""
        splits = sorted({row["split"] for row in self.rows})
        return {"lists": list(self.files), "excluded": self.count("exclude"), "relabelled": self.count("relabel"),
                "by_split": {split: {"excluded": self.count("exclude", split),
                                     "relabelled": self.count("relabel", split)} for split in splits},
                "not_in_data": len(self.missing), "record": "excluded.csv",
                "sha256": hashlib.sha256(excluded_text(self).encode("utf-8", "surrogateescape")).hexdigest()}

    def lines(self) -> list[str]:
        """The fit's messages: what was done, then a warning for listed paths the dataset does not hold."""
        where = ", ".join(f"{split} {counts['excluded']}/{counts['relabelled']}"
                          for split, counts in self.summary()["by_split"].items())
        said = [f"excluded {self.count('exclude')} files and relabelled {self.count('relabel')} listed in "
                f"{', '.join(map(display_name, self.files))}" + (f" (excluded/relabelled by split: {where})"
                                                                   if where else "")]
        if self.missing:
            said.append(f"warning: {len(self.missing)} listed path(s) are not in the dataset and were ignored, e.g. "
                        f"{display_name(self.missing[0])!r:.200}")
        return said


def parse_exclude(spec: str) -> list[str]:
    """``a.csv,b.csv`` → the list files, each once, in order ("" → none)."""
    return list(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))


def read_csv_rows(source: str | os.PathLike, required: tuple[str, ...], expected: str) -> list[dict]:
    """The rows of a CSV graft reads as data (a list to exclude, an audit's CSVs), names as on disk; a missing file,
    a malformed row or a header without the ``required`` columns is one GraftError naming the file (and line).

    Args:
        expected: what the file should be, said when its header lacks a required column.
    """
    source = Path(source)
    try:
        if source.stat().st_size > MAX_LIST_BYTES:
            raise GraftError(f"{source}: larger than {MAX_LIST_BYTES >> 20} MiB; not a list a person reviews")
        text = source.read_bytes().decode("utf-8-sig", "surrogateescape")  # names as they are on disk
    except FileNotFoundError:
        raise GraftError(f"{source}: no such file; expected {expected}") from None
    except OSError as error:
        raise GraftError(f"{source}: cannot read it ({error.strerror or error})") from None
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        for row in reader:
            if None in row:  # more cells than the header names: a shifted row
                raise GraftError(f"{source}, line {reader.line_num}: more cells than the header has columns; fix "
                                 "the row (quote a path holding a comma)")
            rows.append(row)
    except csv.Error as error:
        raise GraftError(f"{source}, line {reader.line_num + 1}: not a readable CSV row ({error}); fix the "
                         "row") from None
    missing = [column for column in required if column not in (reader.fieldnames or ())]
    if missing:
        raise GraftError(f"{source}: no {', '.join(missing)} column in the header; expected {expected}")
    return rows


def read_listed(source: str | os.PathLike) -> list[Listed]:
    """The rows of one list as decisions, checked (GraftError naming the file and line)."""
    source = Path(source)
    rows = read_csv_rows(source, ("path",), "a CSV with a path column (a decisions CSV path,decision,label, graft "
                         "audit's label_issues.csv or a list of paths; duplicates.csv pairs are reviewed with graft "
                         "serve RUN --audit OUT)")
    columns = set(rows[0]) if rows else set()
    listed = []
    for line, row in enumerate(rows, start=2):
        path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not path or "\0" in path:
            raise GraftError(f"{source}, line {line}: {'empty' if not path else 'a NUL byte in the'} path; fill it "
                             "in or delete the row")
        if "decision" in columns:
            decision = (row.get("decision") or "").strip().lower()
            if decision not in DECISIONS:
                raise GraftError(f"{source}, line {line}: decision {decision!r:.40} is not one of "
                                 f"{', '.join(DECISIONS)}; fix the row")
            if decision == "relabel" and not label:
                raise GraftError(f"{source}, line {line}: relabel without a label; fill in the label column")
        else:  # path,label: relabel (an empty label drops it); no label column (label_issues.csv): drop
            decision = "relabel" if "label" in columns and label else "exclude"
        listed.append(Listed(path, decision, label, str(source), line))
    return listed


def dataset_root(splits: DatasetSplits) -> Path:
    """The folder a listed relative path is read from: the data folder, or the folder of a CSV manifest."""
    root = Path(splits.root)
    return root.parent if root.is_file() or root.suffix.lower() in (".csv", ".tsv") else root


def _key(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(path))


def resolve_listed(item: Listed, root: Path) -> list[str]:
    """The candidate files a listed path may name, as keys comparable with the samples' (``_key``): an absolute path
    as written; a relative one in the dataset root, then beside its list. ``..`` out of them is refused."""
    raw = item.path
    candidates = [raw]
    if raw.startswith("'") and raw[1:].startswith(FORMULA_STARTS):  # a spreadsheet-safe cell: '=name.png
        candidates.append(raw[1:])
    keys = []
    for text in candidates:
        if Path(text).is_absolute():
            keys.append(_key(text))
            continue
        for folder in (root, Path(item.source).parent):
            try:
                keys.append(_key(contained(folder, text, nested=True, links=True)))
            except GraftError as error:
                raise GraftError(f"{item.source}, line {item.line}: the path {error}; list files inside the dataset "
                                 "(relative to its folder) or by absolute path") from None
    return keys


def _decisions(lists: list[str], root: Path) -> tuple[dict[str, Listed], dict[str, list[str]]]:
    """Every list's rows, the last one for a file winning, keyed by candidate file; and each row's candidates."""
    chosen: dict[tuple[str, int], Listed] = {}
    candidates: dict[tuple[str, int], list[str]] = {}
    for source in lists:
        for item in read_listed(source):
            where = (item.source, item.line)
            chosen[where], candidates[where] = item, resolve_listed(item, root)
    return chosen, candidates


def apply_exclusions(splits: DatasetSplits, lists: list[str]) -> tuple[DatasetSplits, Exclusions]:
    """``splits`` without the listed files to exclude and with the relabelled ones' new labels, in every split, and
    the record of it. A label that is not one of ``splits.classes`` is refused (a head has one output per class).

    Raises:
        GraftError: for a malformed list (file and line), a relabel to an unknown class, or tar shards.
    """
    if splits.shards is not None:
        raise GraftError("--exclude: tar shards hold no file paths to match; exclude the files before sharding (graft "
                         "shard on the folder or CSV with them removed)")
    record = Exclusions(list(lists))
    root = dataset_root(splits)
    index = {_key(path): (split, position) for split in ("train", "val", "test")
             for position, (path, _) in enumerate(getattr(splits, split))}
    chosen, candidates = _decisions(lists, root)
    final: dict[tuple[str, int], Listed] = {}  # (split, position) → the last decision for that sample
    for where, item in chosen.items():
        hit = next((index[key] for key in candidates[where] if key in index), None)
        if hit is None:
            record.missing.append(item.path)
            continue
        if item.decision == "relabel" and item.label not in splits.classes:
            raise GraftError(f"{item.source}, line {item.line}: label {display_name(item.label)!r:.80} is not one of "
                             f"the dataset's classes ({', '.join(map(display_name, splits.classes[:10]))}); fix the "
                             "row")
        final.pop(hit, None)  # re-inserted: the order of the record follows the last decision's
        final[hit] = item
    return _applied(splits, final, record), record


def _applied(splits: DatasetSplits, final: dict[tuple[str, int], Listed], record: Exclusions) -> DatasetSplits:
    changed = {}
    for split in ("train", "val", "test"):
        kept = []
        for position, (path, label) in enumerate(getattr(splits, split)):
            item = final.get((split, position))
            action = item.decision if item else "keep"
            if action == "relabel" and splits.classes.index(item.label) == label:
                action = "keep"  # already that label: nothing changes
            if action != "keep":
                record.rows.append({"path": path, "split": split, "action": action, "given": splits.classes[label],
                                    "label": item.label if action == "relabel" else "", "listed_in": item.source})
            if action == "exclude":
                continue
            kept.append((path, splits.classes.index(item.label)) if action == "relabel" else (path, label))
        changed[split] = kept
    return replace(splits, **changed)


def excluded_text(record: Exclusions) -> str:
    """RUN/excluded.csv: one row per excluded or relabelled file (paths as discovered, names as on disk)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, EXCLUDED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(record.rows)
    return buffer.getvalue()


def append_decision(decisions: str | os.PathLike, path: str, decision: str, label: str = "") -> None:
    """Appends one row to a decisions CSV (``path,decision,label``), rewriting it atomically: a crash leaves the old
    file or the new one, never half a row. The last row for a path is the one ``--exclude`` applies."""
    if decision not in DECISIONS:
        raise GraftError(f"decision {decision!r:.40} is not one of {', '.join(DECISIONS)}")
    target = Path(decisions)
    old = target.read_bytes().decode("utf-8", "surrogateescape") if target.is_file() else ""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not old:
        writer.writerow(DECISION_COLUMNS)
    elif not old.endswith("\n"):
        buffer.write("\n")
    writer.writerow([path, decision, label if decision == "relabel" else ""])
    content = (old + buffer.getvalue()).encode("utf-8", "surrogateescape")
    atomic_write(target, lambda temp: Path(temp).write_bytes(content))
