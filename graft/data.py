"""Images in: robust loading, dataset discovery (class folders or a CSV manifest), the pre-training scan, datasets.

Data flows ``discover`` → ``scan`` (drops unreadable files, warns about imbalance and train/val duplicates) →
``ImageDataset`` with transforms built from the backbone's preprocessing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import random
import re
import stat
import threading
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from graft.errors import GraftError
from graft.text import display_name, escape_field

log = logging.getLogger(__name__)

# The formats graft decodes, by Pillow's names, and nothing else whatever a file is called: Pillow's other plugins
# include EPS, which runs Ghostscript on the file. A multi-picture JPEG (MPO) is opened by JPEG's own opener.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
FORMAT_LIST = ", ".join({"WEBP": "WebP"}.get(name, name) for name in ALLOWED_FORMATS)  # as messages spell them
OTHER_SIGNATURES = {b"%PDF": "PDF", b"%!": "PostScript"}  # formats Pillow cannot open, named in refusals
# Bytes per image file, from stat before a byte is read: room for an uncompressed 8-bit RGBA TIFF or BMP at the default
# pixel limit (358 MB), while a multi-GB file that only claims to be an image is refused without being read.
MAX_FILE_BYTES = 512 * 2**20
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # Pillow names a stream by its repr
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LITTER = frozenset({"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini", "@eaDir"})  # archive and OS by-products
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
TINY_CLASS = 5  # fewer images than this in a class's training split earns a warning
MAX_ASPECT = 8  # evaluation resize: longer side at most this many times the shorter (padding beyond)
IMBALANCE_RATIO = 3.0  # largest / smallest class above this earns a warning

Sample = tuple[str, int]  # (path, class index)


class ImageError(GraftError):
    """An image file that cannot be decoded; the message names the file."""


class PixelLimitError(ImageError):
    """An image with more pixels than allowed (a decompression bomb, or simply too large)."""


# --------------------------------------------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, max_pixels: int | None = 89_478_485) -> Image.Image:
    """Opens a JPEG, PNG, WebP, BMP, GIF or TIFF file and returns it as 8-bit RGB with EXIF orientation applied.

    Animated GIF/WebP give their first frame; grayscale, palette, RGBA (composited on white), CMYK, 16-bit and
    float images are converted. Any other format is refused, whatever the file's name (see ``ALLOWED_FORMATS``).

    Raises:
        ImageError: naming the file and why it could not be used.
    """
    check_image_file(path)
    return _decode(path, str(path), max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int | None = 89_478_485) -> Image.Image:
    """``load_image`` for bytes already in memory (an upload); errors name ``name``."""
    if not data:
        raise ImageError(_empty(name))
    return _decode(io.BytesIO(data), name, max_pixels)


def check_image_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> int:
    """Checks from ``stat`` alone, before reading a byte, that ``path`` is a regular file of 1 byte to ``max_bytes``;
    returns its size.

    Raises:
        ImageError: a missing, unreadable, empty or oversized file, or a pipe or device (whose read would block).
    """
    try:
        info = os.stat(path)
    except OSError as error:
        raise ImageError(f"{path}: cannot read file ({error.strerror or error}); check it exists and is readable") \
            from None
    except ValueError:  # os.stat's answer to a NUL byte in the name
        shown = display_name(os.fsdecode(path)).replace("\0", "\\0")
        raise ImageError(f"{shown}: the name holds a NUL byte, which no file name can; fix the path") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file (pipe, socket or device); remove it from the dataset")
    if info.st_size == 0:
        raise ImageError(_empty(path))
    if info.st_size > max_bytes:
        raise ImageError(f"{path}: {info.st_size / 2**20:,.0f} MB is more than graft reads from one image file "
                         f"({max_bytes // 2**20} MB); remove it or make it smaller")
    return info.st_size


def _empty(name) -> str:
    return f"{name}: empty file (0 bytes), not a readable image; remove or replace it"


def _decode(source, name: str, max_pixels: int | None) -> Image.Image:
    with _decoded(source, name, max_pixels) as image:
        return to_rgb(ImageOps.exif_transpose(_to_srgb(image)))


@contextlib.contextmanager
def _decoded(source, name: str, max_pixels: int | None, draft: tuple[int, int] | None = None):
    """Opens and fully decodes an image (first frame) of an allowed format, refusing more than ``max_pixels`` before
    decoding; Pillow's many error types (OSError, SyntaxError, ValueError, struct.error, ...) become one
    ``ImageError`` naming ``name``, and its warnings (corrupt EXIF data) are logged with ``name``. ``draft`` lets
    JPEG decode at reduced scale (the whole stream is still read).

    This is graft's only call of ``Image.open``: every reader (training, the scan, predict, evaluate, serve,
    precise-bn, diagnose, report thumbnails) comes through here, so the allow-list holds everywhere.
    """
    try:
        with _DECODER_WARNINGS.collect(name):
            with Image.open(source, formats=ALLOWED_FORMATS) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise PixelLimitError(
                        f"{name}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels}; "
                        "raise data.max_image_pixels if the image is genuine"
                    )
                if draft:
                    image.draft("RGB", draft)
                image.seek(0)
                image.load()
                yield image
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(_unidentified(source, name)) from None
    except Image.DecompressionBombError as error:  # Pillow's own hard limit (twice its default), before ours
        raise PixelLimitError(f"{name}: refused as a possible decompression bomb ({error}); remove the file") from None
    except Exception as error:
        raise ImageError(f"{name}: not a readable image ({_reason(error, name)}); remove or replace the file") from None


def _reason(error: Exception, name: str) -> str:
    """The first line of ``error``, with Pillow's ``<_io.BytesIO object at 0x...>`` replaced by the file's name."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _OBJECT_REPR.sub(name, text)[:300]


def _unidentified(source, name: str) -> str:
    """Why Pillow found no allowed format: the format the first bytes announce, if Pillow knows one, else unknown."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
            prefix = source.read(16)
        else:
            with open(source, "rb") as handle:
                prefix = handle.read(16)
    except (OSError, ValueError):
        prefix = b""
    if not prefix:
        return _empty(name)
    found = sniff_format(prefix)
    if found in ALLOWED_FORMATS:  # its signature is right, its header is not
        return f"{name}: not a readable image (damaged {found} header); remove or replace the file"
    if found:
        return f"{name}: not an allowed image format ({found}); graft reads {FORMAT_LIST}"
    return f"{name}: not a readable image (no known image format); graft reads {FORMAT_LIST}; remove or replace it"


def sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature ``prefix`` (a file's first 16 bytes) carries, or None.

    Only each plugin's signature test runs, never its parser, so naming a format costs nothing in safety.
    """
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):  # a signature test that fails on odd bytes simply did not match
            if accept is not None and accept(prefix):
                return name
    return next((name for signature, name in OTHER_SIGNATURES.items() if prefix.startswith(signature)), None)


class _DecoderWarnings:
    """Logs the warnings Pillow raises while decoding (``Corrupt EXIF data``, ...) with the name of the file at fault,
    each (file, message) once per process, not once per epoch.

    ``warnings.catch_warnings`` swaps process-wide state, so scan threads entering and leaving it at once would see
    each other's warnings and restore each other's filters. Here one catch is entered by the first decoding thread and
    left by the last, and each warning is routed to the thread that raised it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._catch: warnings.catch_warnings | None = None
        self._local = threading.local()
        self._logged: set[tuple[str, str]] = set()
        self._previous_show = warnings.showwarning

    @contextlib.contextmanager
    def collect(self, name: str):
        caught: list[str] = []
        self._local.caught = caught
        with self._lock:
            if self._users == 0:
                self._catch = warnings.catch_warnings()
                self._catch.__enter__()
                warnings.filterwarnings("always", module=r"PIL\.")  # every file's warning, not only the first one
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # graft enforces its own limit
                self._previous_show = warnings.showwarning
                warnings.showwarning = self._show  # restored by the catch's exit
            self._users += 1
        try:
            yield
        finally:
            self._local.caught = None
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._catch.__exit__(None, None, None)
        self._log(name, caught)  # reached only when the decode succeeded: a failure's reason says enough

    def _show(self, message, category, filename, lineno, file=None, line=None):
        caught = getattr(self._local, "caught", None)
        if caught is None:  # another thread's warning while a decode runs: shown as it would have been
            self._previous_show(message, category, filename, lineno, file, line)
        else:
            caught.append(" ".join(str(message).split()))

    def _log(self, name: str, caught: list[str]) -> None:
        for message in dict.fromkeys(caught):
            if (name, message) in self._logged:
                continue
            if len(self._logged) < 100_000:  # bounded: a server decodes strangers' files for weeks
                self._logged.add((name, message))
            log.warning("%s: %s (the image is still used)", name, message)


_DECODER_WARNINGS = _DecoderWarnings()


def _to_srgb(image: Image.Image) -> Image.Image:
    """Applies an embedded ICC profile (Adobe RGB, Display P3, CMYK press profiles) so colours match what a viewer
    shows; pretrained networks saw sRGB. A broken profile is ignored rather than failing the image."""
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output_mode)
        converted.info = {k: v for k, v in image.info.items() if k != "icc_profile"}  # keeps EXIF orientation
        return converted
    except Exception:  # noqa: BLE001 - a damaged profile must not cost the image; fall back to plain conversion
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB, scaling 16-bit and float data instead of clipping them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) <= 65535 and array.min() >= 0):
            array = array / 257.0  # 16-bit → 8-bit keeps the full range (65535 → 255)
        else:  # float or out-of-range integers: stretch to the observed range
            low, high = float(array.min()), float(array.max())
            array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


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


@dataclass
class DatasetSplits:
    """Samples per split with a stable (sorted) class order."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    source: str = ""  # how the splits were found, for the report
    notes: list[str] = field(default_factory=list)  # what discovery ignored (empty classes, loops, non-images)
    root: str = ""  # the folder or CSV manifest discovered: graft never writes inside it

    def counts(self, split: str) -> dict[str, int]:
        counter = Counter(label for _, label in getattr(self, split))
        return {name: counter.get(index, 0) for index, name in enumerate(self.classes)}


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


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Splits each class separately (seeded), so val keeps the class proportions; classes of 1 stay in train."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction))) if len(members) > 1 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def discover(path: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Finds the samples of a class-per-folder tree or a CSV manifest.

    Layouts: ``root/train/CLASS/*`` with ``root/val/CLASS/*`` (and optional ``root/test/``); ``root/train`` alone
    or a plain ``root/CLASS/*`` tree, split stratified by ``val_fraction``; or ``manifest.csv`` with columns
    ``path,label`` and optionally ``split`` (train/val/test), paths relative to the CSV's folder.

    Raises:
        GraftError: when the path holds no recognisable dataset, with what was expected.
    """
    root = Path(path)
    if root.is_file() and root.suffix.lower() in (".csv", ".tsv"):
        return _discover_csv(root, val_fraction, seed)
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


def _discover_csv(manifest: Path, val_fraction: float, seed: int) -> DatasetSplits:
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError:
        raise GraftError(f"{manifest}: not UTF-8 text; save the CSV as UTF-8") from None
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else "", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = _manifest_rows(manifest, text, dialect)
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise GraftError(f"{manifest}: expected a header with columns path,label (and optionally split)")
    by_split: dict[str, dict[str, str]] = defaultdict(dict)  # split → {file: label}
    where: dict[str, tuple[str, str]] = {}  # file → (split, label) of its first row
    notes: list[str] = []
    for line, row in enumerate(rows, start=2):
        raw_path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not raw_path or not label:
            raise GraftError(f"{manifest}, line {line}: empty path or label; fill it in or delete the row")
        if "\0" in raw_path:
            raise GraftError(f"{manifest}, line {line}: the path holds a NUL byte, which no file name can; fix the row")
        file = Path(raw_path)
        file = str(file if file.is_absolute() else manifest.parent / file)
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
    classes = sorted(set(by_split["train"].values()))
    unknown = sorted({label for split in ("val", "test") for label in by_split[split].values()} - set(classes))
    if unknown:
        raise GraftError(f"{manifest}: val/test rows have labels with no training rows ({', '.join(unknown[:5])}); "
                         "add training rows for them or remove those rows")
    index = {name: i for i, name in enumerate(classes)}

    def samples(split: str) -> list[Sample]:
        return sorted((file, index[label]) for file, label in by_split[split].items())

    train, val = samples("train"), samples("val")
    if not val:
        train, val = stratified_split(train, val_fraction, seed)
    if len(notes) > 3:
        notes = notes[:3] + [f"... {len(notes) - 3} more duplicate rows"]
    return DatasetSplits(classes, train, val, samples("test"), f"CSV manifest {manifest}", notes, str(manifest))


# ------------------------------------------------------------------------------------------------------------- the scan


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
        either field is written ``\\\\``, ``\\t``, ``\\n``, ``\\r`` (``graft.text.unescape_field`` reads it back)."""
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


def check_files(paths, max_pixels: int | None = 89_478_485, workers: int = 4) -> dict[str, tuple]:
    """{path: (sha1 or None, reason or None)} for each path, decoded in a thread pool (Pillow releases the GIL)."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(unique, pool.map(lambda p: _check_file(p, max_pixels), unique)))


def readable(samples: list[Sample], max_pixels: int | None = 89_478_485, workers: int = 4) -> list[Sample]:
    """The samples whose files decode."""
    checked = check_files([path for path, _ in samples], max_pixels, workers)
    return [sample for sample in samples if checked[sample[0]][1] is None]


def scan(splits: DatasetSplits, max_pixels: int | None = 89_478_485, workers: int = 4) -> ScanReport:
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


# ------------------------------------------------------------------------------------------------------------- datasets


class ImageDataset(Dataset):
    """(image tensor, class index) pairs; a file that fails mid-training is replaced by the next one, never a crash."""

    def __init__(self, samples: list[Sample], transform, max_pixels: int | None = 89_478_485,
                 with_index: bool = False):
        self.samples = samples
        self.transform = transform
        self.max_pixels = max_pixels
        self.with_index = with_index  # also yield the sample's index, so a blown-up batch can name its files

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        for offset in range(len(self.samples)):
            used = (index + offset) % len(self.samples)
            path, label = self.samples[used]
            try:
                image = self.transform(load_image(path, self.max_pixels))
                return (image, label, used) if self.with_index else (image, label)
            except ImageError as error:  # changed since the scan (deleted, overwritten): log and move on
                log.warning("%s (substituted the next image)", error)
        raise GraftError("no readable image left in the dataset")


class FileDataset(Dataset):
    """Images for prediction: (tensor, ok flag, error); an unreadable file gives zeros of ``shape`` and ok=False."""

    def __init__(self, paths: list[str], transform, shape: tuple[int, ...], max_pixels: int | None = 89_478_485):
        self.paths, self.transform, self.shape, self.max_pixels = paths, transform, tuple(shape), max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        try:
            return self.transform(load_image(self.paths[index], self.max_pixels)), True, ""
        except ImageError as error:
            return torch.zeros(self.shape), False, str(error)


def resolve_workers(workers: int, device: torch.device) -> int:
    """DataLoader workers for ``-1`` (auto): none on the CPU, up to 8 for an accelerator.

    On the CPU, loader workers compete with torch's intra-op threads for the same cores, and a parallel kernel runs
    at the pace of its slowest thread: measured on 2 cores, extraction with 2 workers ran at 0.84x the bare forward
    pass, while decoding in the main process costs only the decode time itself (about 1/20 of the forward pass).
    """
    if workers >= 0:
        return workers
    return 0 if torch.device(device).type == "cpu" else min(8, os.cpu_count() or 1)


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


# ----------------------------------------------------------------------------------------------------------- transforms

_INTERPOLATION = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


class CapAspect:
    """Centre-crops the longer side to at most ``MAX_ASPECT`` times the shorter one.

    Lossless before resize-then-centre-crop (the crop keeps only the centre anyway), and it keeps a 1x10000 strip from
    becoming a 36x360000 intermediate image.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short = min(width, height)
        if max(width, height) <= MAX_ASPECT * short:
            return image
        keep_w, keep_h = min(width, MAX_ASPECT * short), min(height, MAX_ASPECT * short)
        left, top = (width - keep_w) // 2, (height - keep_h) // 2
        return image.crop((left, top, left + keep_w, top + keep_h))


def build_transform(preprocessing, train: bool = False, augment: str = "standard", hflip: bool = True):
    """The torchvision transform for a backbone's preprocessing (see ``graft.backbones.Preprocessing``).

    Training: random-resized-crop (scale 0.08-1 for ``standard``, 0.6-1 for ``light``) and optional horizontal
    flip. Evaluation (and ``augment='none'``): resize to size / crop_pct, then centre crop, as the weights expect.
    """
    size = tuple(preprocessing.input_size)
    interpolation = _INTERPOLATION.get(preprocessing.interpolation, transforms.InterpolationMode.BILINEAR)
    normalize = [transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std)]
    if train and augment != "none":
        scale = (0.08, 1.0) if augment == "standard" else (0.6, 1.0)
        ops = [transforms.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
        if hflip:
            ops.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(ops + normalize)
    resize = tuple(int(s / preprocessing.crop_pct) for s in size)
    resize_op = transforms.Resize(resize if size[0] != size[1] else resize[0], interpolation, antialias=True)
    ops = [CapAspect(), resize_op, transforms.CenterCrop(size)]
    if train and hflip:
        ops.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(ops + normalize)


TTA_VIEWS = ("flip", "crops")


def parse_tta(spec: str | None) -> tuple[str, ...]:
    """``flip`` / ``crops`` / ``flip,crops`` → the chosen views; empty or None → none."""
    chosen = tuple(part.strip() for part in (spec or "").split(",") if part.strip())
    unknown = [part for part in chosen if part not in TTA_VIEWS]
    if unknown:
        raise GraftError(f"tta '{spec}' not understood: use flip, crops or flip,crops")
    return tuple(view for view in TTA_VIEWS if view in chosen)


class TTAViews:
    """Test-time augmentation: one image → a (views, 3, H, W) tensor; view 0 is always the plain evaluation view.

    Order: centre crop, then with ``crops`` the four corner crops (top-left, top-right, bottom-left, bottom-right) of
    the same resized image, then with ``flip`` the mirror image of each view before it, in the same order.
    """

    def __init__(self, preprocessing, spec: str | None):
        self.views = parse_tta(spec)
        size = tuple(preprocessing.input_size)
        interpolation = _INTERPOLATION.get(preprocessing.interpolation, transforms.InterpolationMode.BILINEAR)
        resize = tuple(int(s / preprocessing.crop_pct) for s in size)
        self.resize = transforms.Compose([CapAspect(), transforms.Resize(
            resize if size[0] != size[1] else resize[0], interpolation, antialias=True)])
        self.size = size
        self.normalize = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize(preprocessing.mean, preprocessing.std)])

    def __len__(self) -> int:
        return (5 if "crops" in self.views else 1) * (2 if "flip" in self.views else 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = self.resize(image)
        if "crops" in self.views:
            top_left, top_right, bottom_left, bottom_right, centre = transforms.functional.five_crop(resized, self.size)
            crops = [centre, top_left, top_right, bottom_left, bottom_right]
        else:
            crops = [transforms.functional.center_crop(resized, list(self.size))]
        if "flip" in self.views:
            crops += [crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for crop in crops]
        return torch.stack([self.normalize(crop) for crop in crops])
