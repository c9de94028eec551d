"""The pre-training scan: every file decoded once, the unreadable ones skipped and named."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from graft.data.discovery import IMBALANCE_RATIO, TINY_CLASS, DatasetSplits, Sample
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, _decoded, check_image_file
from graft.errors import GraftError
from graft.utils.text import escape_field

__all__ = ["ScanReport", "check_files", "readable", "scan"]

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """What the pre-training scan found; ``warnings`` are one-line, human-readable."""

    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]]  # (path, reason)
    duplicates: list[tuple[str, str]]  # (train path, val path) with identical bytes
    warnings: list[str]

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "duplicates_train_val": [{"train": a, "val": b} for a, b in self.duplicates],
            "warnings": self.warnings,
        }

    def skipped_text(self) -> str:
        """``skipped_files.txt``: one ``PATH<TAB>REASON`` record per line; a backslash, tab, newline or CR inside
        either field is written ``\\\\``, ``\\t``, ``\\n``, ``\\r`` (``graft.utils.text.unescape_field`` reads it back)."""
        return "".join(f"{escape_field(path)}\t{escape_field(reason)}\n" for path, reason in self.skipped)


def _check_file(path: str, max_pixels: int | None) -> tuple[str | None, str | None]:
    """Returns (sha1 of the bytes, None) for a decodable image or (None, reason) for a bad one.

    The size comes from ``stat`` before a byte is read and the digest is streamed, so a multi-GB file never enters
    memory; the decode reads the same open file.
    """
    try:
        check_image_file(path)
        with open(path, "rb") as handle:
            with _decoded(handle, path, max_pixels, draft=(64, 64)) as image:  # JPEG at 1/8 scale: 8x faster
                image.getexif()  # parsed now, so damaged EXIF is reported by the scan with the file's name
            handle.seek(0)
            digest = hashlib.file_digest(handle, "sha1").hexdigest()  # for the leak check
    except ImageError as error:
        return None, str(error)
    except OSError as error:  # removed or made unreadable between the stat and the open
        return None, f"{path}: cannot read file ({error.strerror or error}); check it exists and is readable"
    return digest, None


def check_files(paths, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 4) -> dict[str, tuple]:
    """{path: (sha1 or None, reason or None)} for each path, decoded in a thread pool (Pillow releases the GIL)."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(unique, pool.map(lambda p: _check_file(p, max_pixels), unique)))


def readable(samples: list[Sample], max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 4) -> list[Sample]:
    """The samples whose files decode."""
    checked = check_files([path for path, _ in samples], max_pixels, workers)
    return [sample for sample in samples if checked[sample[0]][1] is None]


def scan(splits: DatasetSplits, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 4) -> ScanReport:
    """Decodes every file once (threads), drops unreadable ones from ``splits`` in place, and reports.

    Warns on class imbalance, tiny classes (< 5 training images), empty val classes and identical files in
    train and val (a leak that inflates validation accuracy).
    """
    checked = check_files([path for split in ("train", "val", "test") for path, _ in getattr(splits, split)],
                          max_pixels, workers)
    skipped = sorted((path, reason) for path, (_, reason) in checked.items() if reason)
    bad = {path for path, _ in skipped}
    for split in ("train", "val", "test"):
        setattr(splits, split, [s for s in getattr(splits, split) if s[0] not in bad])
    train_digests = defaultdict(list)
    for path, _ in splits.train:
        train_digests[checked[path][0]].append(path)
    duplicates = [(train_digests[checked[p][0]][0], p) for p, _ in splits.val if checked[p][0] in train_digests]
    counts = {split: splits.counts(split) for split in ("train", "val", "test") if getattr(splits, split)}
    notes = list(splits.notes)
    if skipped:
        notes.append(f"{len(skipped)} unreadable file(s) skipped, e.g. {skipped[0][1]}")
    train_counts = counts.get("train", {})
    tiny = [name for name, n in train_counts.items() if n < TINY_CLASS]
    if tiny:
        notes.append(f"tiny classes (< {TINY_CLASS} training images): {', '.join(tiny[:10])}; add images or merge them")
    nonzero = [n for n in train_counts.values() if n]
    if nonzero and max(nonzero) > IMBALANCE_RATIO * min(nonzero):
        notes.append(f"class imbalance: largest class has {max(nonzero)} images, smallest {min(nonzero)}")
    empty_val = [name for name, n in counts.get("val", {}).items() if n == 0]
    if empty_val and counts.get("val"):
        notes.append(f"no validation images for: {', '.join(empty_val[:10])}")
    if duplicates:
        notes.append(f"{len(duplicates)} val image(s) identical to a train image (leak), e.g. {duplicates[0][1]}")
    if len(splits.classes) < 2:
        raise GraftError(f"only one class found ({splits.classes[0]}): a classifier needs at least two class folders")
    if not splits.train:
        raise GraftError("no readable training images left after the scan; see the skipped files")
    return ScanReport(counts, skipped, duplicates, notes)
