"""A Hugging Face dataset's images as files graft reads like a folder's: the stored bytes of each image written once,
as they are, into a graft-owned folder named by the dataset's fingerprint; path-typed images read in place, only inside
the dataset's folder. ``graft.data.hfdatasets`` loads the dataset and hands its splits here.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from graft.data.images import MAX_FILE_BYTES, sniff_format
from graft.data.splits import Sample
from graft.errors import GraftError
from graft.utils.outputs import contained

__all__ = ["DATASETS_INSTALL", "datasets_module", "hf_images_folder", "materialise"]

_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif",
               "TIFF": ".tif"}
_BATCH = 256  # rows read per step when writing the images: bounded memory whatever the dataset's size
DATASETS_INSTALL = "Hugging Face datasets need the datasets package: pip install 'graft[datasets]'"


def datasets_module():
    """The ``datasets`` package, or one line naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise GraftError(DATASETS_INSTALL) from None
    return datasets


def hf_images_folder() -> Path:
    """Where graft writes the stored bytes of datasets' images: ``$GRAFT_HF_IMAGES`` or ``~/.cache/graft/hf-images``."""
    return Path(os.environ.get("GRAFT_HF_IMAGES") or Path.home() / ".cache" / "graft" / "hf-images")



def _inside(folder: Path, raw, where: str, row: int) -> str:
    """A path-typed image's file, which must lie inside the dataset's folder (the dataset is data: its paths too)."""
    text = raw if isinstance(raw, str) else ""
    if os.path.isabs(text) and os.path.realpath(text).startswith(os.path.realpath(folder) + os.sep):
        text = os.path.relpath(os.path.realpath(text), os.path.realpath(folder))
    try:
        return str(contained(folder, text, nested=True))
    except GraftError as error:
        raise GraftError(f"{where}, row {row}: the image path {error}; keep the image files inside {folder} or store "
                         "the images' bytes in the dataset (datasets' Image feature embeds them from loaded files)") \
            from None


def _image_rows(part, image: str):
    """(row, stored bytes or None, path or None) per row, the column read undecoded."""
    datasets = datasets_module()
    column = part.select_columns([image]).cast_column(image, datasets.Image(decode=False))
    row = 0
    for batch in column.iter(batch_size=_BATCH):
        for value in batch[image]:
            value = value if isinstance(value, dict) else {}
            data = value.get("bytes")
            yield row, data if isinstance(data, bytes) else None, value.get("path")
            row += 1


def _write_split(part, image: str, labels: list, target: Path, folder: Path, where: str,
                 notes: list[str]) -> list[Sample]:
    """The split's samples: stored bytes written as ``INDEX.EXT`` under ``target`` (when given: a folder being
    filled), path-typed images read in place inside ``folder``; unlabelled and oversized rows are left out."""
    samples, unlabelled, oversized = [], 0, []
    for row, data, path in _image_rows(part, image):
        if labels[row] is None:
            unlabelled += 1
            continue
        if data is None:
            if not path:
                raise GraftError(f"{where}, row {row}: no image (neither bytes nor a path); drop the row")
            samples.append((_inside(folder, path, where, row), labels[row]))
            continue
        if len(data) > MAX_FILE_BYTES:
            oversized.append(row)
            continue
        file = f"{row:09d}{_EXTENSIONS.get(sniff_format(data[:16]) or '', '')}"  # no extension: the scan decides
        if target is not None:
            (target / file).write_bytes(data)
        samples.append((file, labels[row]))
    if unlabelled:
        notes.append(f"{where}: {unlabelled} row(s) without a label left out")
    if oversized:
        notes.append(f"{where}: {len(oversized)} image(s) over {MAX_FILE_BYTES // 2**20} MB left out, e.g. row "
                     f"{oversized[0]}")
    return samples


def materialise(parts: dict, image: str, labels: dict, fingerprint: str, folder: Path,
                notes: list[str]) -> dict[str, list[Sample]]:
    """{split: samples}, the stored bytes written once into ``hf_images_folder() / fingerprint`` (a temporary folder
    renamed into place, so a killed run never leaves half a set under the real name; an existing set is reused)."""
    home = hf_images_folder() / fingerprint
    temp = None if home.is_dir() else hf_images_folder() / f".{fingerprint}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    samples = {}
    try:
        for split, (part, _) in parts.items():
            if temp is not None:
                (temp / split).mkdir(parents=True, exist_ok=True)
            written = _write_split(part, image, labels[split], temp / split if temp else None, folder,
                                   f"{folder} split {split}", notes)
            samples[split] = sorted((p if os.path.isabs(p) else str(home / split / p), label) for p, label in written)
        if temp is not None:
            try:
                temp.rename(home)
            except OSError:  # another process finished the same set first: its copy is the same bytes
                if not home.is_dir():
                    raise
    except OSError as error:
        raise GraftError(f"{hf_images_folder()}: cannot write the dataset's images ({error.strerror or error}); "
                         "free space or set GRAFT_HF_IMAGES to a writable folder") from None
    finally:
        if temp is not None and temp.exists():
            shutil.rmtree(temp, ignore_errors=True)  # graft's own temporary folder, never the user's
    return samples
