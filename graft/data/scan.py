"""The pre-training scan: every file decoded once, the unreadable ones skipped and named."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sqlite3
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from graft.data.discovery import IMBALANCE_RATIO, TINY_CLASS, DatasetSplits, Sample
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, check_image_file, decoded_image
from graft.errors import GraftError
from graft.utils.progress import Progress
from graft.utils.text import escape_field, path_key

__all__ = ["SCAN_ALL_UP_TO", "SCAN_SAMPLE", "ScanCache", "ScanReport", "check_files", "readable", "scan",
           "scan_cache_dir"]

log = logging.getLogger(__name__)

SCAN_ALL_UP_TO = 200_000  # files: above this the scan decodes a seeded sample and load-time skipping does the rest
SCAN_SAMPLE = 20_000  # files decoded from a dataset above SCAN_ALL_UP_TO (plus any the scan cache already knows)


def scan_cache_dir() -> Path:
    """``$GRAFT_SCAN_CACHE``, else ``scan/`` in ``$GRAFT_CACHE`` when that is set, else ``~/.cache/graft/scan``."""
    if os.environ.get("GRAFT_SCAN_CACHE"):
        return Path(os.environ["GRAFT_SCAN_CACHE"])
    if os.environ.get("GRAFT_CACHE"):
        return Path(os.environ["GRAFT_CACHE"]) / "scan"
    return Path.home() / ".cache" / "graft" / "scan"


class ScanCache:
    """What the scan found per file, keyed by absolute path, size, mtime, ctime and the pixel limit (as the feature
    cache keys features), in one SQLite file: a rerun on a million files stats them instead of decoding them.

    Every failure to use it (a read-only home, a damaged file) is a warning and an uncached scan, never an error:
    the cache only saves time.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.path = Path(folder or scan_cache_dir()) / "scan.sqlite"

    @contextlib.contextmanager
    def _db(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS checks (key TEXT PRIMARY KEY, digest TEXT, reason TEXT) "
                       "WITHOUT ROWID")
            yield db
        finally:
            db.close()

    def get(self, keys: list[str]) -> dict[str, tuple]:
        found = {}
        try:
            with self._db() as db:
                for start in range(0, len(keys), 900):  # under SQLite's oldest bound-parameter limit (999)
                    chunk = keys[start:start + 900]
                    query = f"SELECT key, digest, reason FROM checks WHERE key IN ({','.join('?' * len(chunk))})"
                    found.update({key: verdict for key, *row in db.execute(query, chunk)
                                  if (verdict := _verdict(*row)) is not None})
        except (sqlite3.Error, OSError) as error:
            log.warning("%s: scan cache unreadable (%s); decoding every file", self.path, error)
        return found

    def put(self, results: dict[str, tuple]) -> None:
        try:
            with self._db() as db, db:  # one transaction
                db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?)",
                               [(key, digest, _stored(reason)) for key, (digest, reason) in results.items()])
        except (sqlite3.Error, OSError, ValueError) as error:  # ValueError: text SQLite cannot encode
            log.warning("%s: scan cache not written (%s); the next scan decodes again", self.path, error)


def _stored(reason: str | None) -> bytes | None:
    """A reason as SQLite stores it: bytes, since it names the file and a name that is not UTF-8 arrives with
    surrogate escapes, which SQLite refuses to encode as text (``_verdict`` decodes it back)."""
    return None if reason is None else reason.encode("utf-8", "surrogateescape")


def _verdict(digest, reason) -> tuple[str | None, str | None] | None:
    """A cached (digest, reason) as ``_check_file`` returns it, or None for a row that is not one (the cache is data:
    a damaged or edited row means the file is decoded again). Reasons written as text by older graft are kept."""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "surrogateescape")
    good = (isinstance(digest, str) and reason is None) or (digest is None and isinstance(reason, str) and reason)
    return (digest, reason) if good else None


def _scan_key(path: str, max_pixels: int | None) -> str | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # gone: checked (and reported) without the cache
    # ctime too: a chmod or a rename-over changes it where size and mtime can stay the same
    return f"{path_key(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{max_pixels}"


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
            with decoded_image(handle, path, max_pixels, draft=(64, 64)) as image:  # JPEG at 1/8 scale: 8x faster
                image.getexif()  # parsed now, so damaged EXIF is reported by the scan with the file's name
            handle.seek(0)
            digest = hashlib.file_digest(handle, "sha1").hexdigest()  # for the leak check
    except ImageError as error:
        return None, str(error)
    except OSError as error:  # removed or made unreadable between the stat and the open
        return None, f"{path}: cannot read file ({error.strerror or error}); check it exists and is readable"
    return digest, None


def check_files(paths, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 4,
                cache: ScanCache | None = None, log=None) -> dict[str, tuple]:
    """{path: (sha1 or None, reason or None)} for each path, decoded in a thread pool (Pillow releases the GIL);
    with a ``cache``, only files it does not know (new, resized or touched since) are decoded. ``log``: where the
    progress lines go (none without it)."""
    unique = sorted(set(paths))
    keys = {path: _scan_key(path, max_pixels) for path in unique} if cache else {}
    known = cache.get([key for key in keys.values() if key]) if cache else {}
    results = {path: known[keys[path]] for path in unique if keys.get(path) in known}
    todo = [path for path in unique if path not in results]
    fresh = {}
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            Progress("scan: decoding", len(todo), "files", log, log is not None and bool(todo)) as progress:
        for path, result in zip(todo, pool.map(lambda p: _check_file(p, max_pixels), todo)):
            fresh[path] = result
            progress.update(len(fresh))
    if cache and fresh:
        cache.put({keys[path]: result for path, result in fresh.items() if keys.get(path)})
    results.update(fresh)
    return {path: results[path] for path in unique}


def readable(samples: list[Sample], max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 4) -> list[Sample]:
    """The samples whose files decode."""
    checked = check_files([path for path, _ in samples], max_pixels, workers)
    return [sample for sample in samples if checked[sample[0]][1] is None]


def _sampled(paths: list[str], limit: int, cache: ScanCache | None, max_pixels: int | None, seed: int):
    """The paths to check and a note: all of them up to ``limit``; above it, those the cache knows plus a seeded
    sample of ``SCAN_SAMPLE`` others (the rest are checked as they load, which skips and logs a bad one)."""
    if len(paths) <= limit:
        return paths, None
    keys = {path: _scan_key(path, max_pixels) for path in paths} if cache else {}
    known = set(cache.get([k for k in keys.values() if k])) if cache else set()
    cached = [path for path in paths if keys.get(path) in known]
    others = [path for path in paths if keys.get(path) not in known]
    sample = random.Random(seed).sample(others, min(len(others), SCAN_SAMPLE))
    note = (f"{len(paths):,} files is more than the scan decodes in full (--scan-all-up-to {limit:,}): checked "
            f"{len(cached):,} known to the scan cache and a seeded sample of {len(sample):,}; the rest are checked as "
            "they load (an unreadable one is skipped and logged) and the train/val duplicate check covers the sample")
    return cached + sample, note


def scan(splits: DatasetSplits, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int = 4,
         limit: int = SCAN_ALL_UP_TO, cache: ScanCache | str | os.PathLike | bool | None = None,
         seed: int = 0, log=None) -> ScanReport:
    """Decodes every file once (threads), drops unreadable ones from ``splits`` in place, and reports.

    Warns on class imbalance, tiny classes (< 5 training images), empty val classes and identical files in
    train and val (a leak that inflates validation accuracy).

    Args:
        limit: above this many files, a seeded sample is decoded instead (``_sampled``), and the report says so.
        cache: the scan cache (``ScanCache``, its folder, or None for ``scan_cache_dir()``); False: decode all.
        log: where progress lines go (``graft.utils.progress``); None: quiet.
    """
    if splits.shards is not None:  # streamed: nothing to decode up front (a bad sample is skipped as it loads)
        counts = {split: splits.counts(split) for split in ("train", "val") if getattr(splits, split)}
        return ScanReport(counts, [], [], list(splits.notes) + [
            "tar shards are decoded as they stream: a bad sample is skipped and logged then"])
    if cache is not False and not isinstance(cache, ScanCache):
        cache = ScanCache(cache)
    cache = cache or None
    paths, sample_note = _sampled([p for split in ("train", "val", "test") for p, _ in getattr(splits, split)],
                                  limit, cache, max_pixels, seed)
    checked = check_files(paths, max_pixels, workers, cache, log)
    skipped = sorted((path, reason) for path, (_, reason) in checked.items() if reason)
    bad = {path for path, _ in skipped}
    for split in ("train", "val", "test"):
        listed = getattr(splits, split)
        setattr(splits, split, [s for s in listed if s[0] not in bad])
        if listed and not getattr(splits, split):
            _refuse_unreadable_split(split, listed, checked)
    train_digests = defaultdict(list)
    for path, _ in splits.train:
        if path in checked:
            train_digests[checked[path][0]].append(path)
    duplicates = [(train_digests[checked[p][0]][0], p) for p, _ in splits.val
                  if p in checked and checked[p][0] in train_digests]
    counts = {split: splits.counts(split) for split in ("train", "val", "test") if getattr(splits, split)}
    notes = list(splits.notes) + ([sample_note] if sample_note else [])
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


def _refuse_unreadable_split(split: str, listed: list[Sample], checked: dict[str, tuple]) -> None:
    """A split that had files and kept none: training, choosing or testing on nothing is never a result."""
    reason = checked[listed[0][0]][1]
    raise GraftError(f"{split}: none of its {len(listed)} image file(s) could be read (e.g. {reason}); replace the "
                     "damaged files, or remove the split's folder")
