"""A pool of unlabelled images: a folder, a glob pattern, one file, or a CSV listing them (a ``path`` column).

The pool is read, never written: graft lists it, extracts features from it and shows thumbnails of it, and nothing
moves, renames or writes inside it. A CSV is data: its relative paths are read from the CSV's folder and may not climb
out of it, and an absolute path must lie inside that folder too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from graft.data.discovery import expand_inputs, walk_images
from graft.data.manifests import read_csv_rows
from graft.data.shard_index import is_shard_source
from graft.errors import GraftError
from graft.utils.outputs import contained

__all__ = ["Pool", "inside", "read_pool"]


@dataclass
class Pool:
    """The pool's images (absolute paths, sorted, distinct) and the folder they lie in (``root``)."""

    source: str
    root: Path
    paths: list[str]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.listed = frozenset(self.paths)


def read_pool(source: str | os.PathLike) -> Pool:
    """The images of a folder, glob pattern, file or CSV (a header with a ``path`` column; other columns ignored).

    Raises:
        GraftError: nothing found, tar shards (features need image files), or a CSV row leaving its folder.
    """
    text = os.fspath(source)
    if not text.strip():
        raise GraftError(f"pool {text!r} is blank: name a folder, a glob pattern or a CSV of images")
    if is_shard_source(text):
        raise GraftError(f"{text}: a pool is image files and tar shards hold none; pass the folder (or CSV) the "
                         "shards were written from")
    path, notes = Path(text), []
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        root, paths = path.parent, _csv_paths(path)
    elif path.is_dir():
        root, paths = path, walk_images(path, notes)
    else:
        paths = expand_inputs([text])
        root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])) if paths else path
    paths = sorted(dict.fromkeys(os.path.abspath(p) for p in paths))
    if not paths:
        raise GraftError(f"{text}: no images found in the pool; expected image files in the folder, the pattern "
                         "or the CSV's path column")
    return Pool(text, Path(os.path.abspath(root)), paths, notes)


def _csv_paths(manifest: Path) -> list[str]:
    rows = read_csv_rows(manifest)  # the one CSV reader: encoding, delimiter and malformed lines as for a manifest
    if rows and "path" not in rows[0]:
        raise GraftError(f"{manifest}: expected a header with a 'path' column listing the pool's images")
    return [_listed(manifest, line, (row.get("path") or "").strip()) for line, row in enumerate(rows, start=2)]


def _listed(manifest: Path, line: int, raw: str) -> str:
    """A CSV row's path, kept inside the CSV's folder (a relative path) or refused (one that leaves it)."""
    if not raw:
        raise GraftError(f"{manifest}, line {line}: empty path; fill it in or delete the row")
    folder = Path(os.path.abspath(manifest.parent))
    if os.path.isabs(raw) and "\0" not in raw:
        if not Path(os.path.abspath(raw)).is_relative_to(folder):
            raise GraftError(f"{manifest}, line {line}: {raw!r:.200} lies outside the CSV's folder; list the pool's "
                             "images inside it")
        return raw
    try:
        return str(contained(folder, raw, nested=True, links=True))
    except GraftError as error:
        raise GraftError(f"{manifest}, line {line}: the path {error}; list files inside the CSV's folder") from None


def inside(pool: Pool, path: str) -> bool:
    """True when ``path`` is one of the pool's images and, links followed, a regular file inside the pool's folder:
    what may be shown from it (a link out of the pool, or a name not listed, never is)."""
    if path not in pool.listed:
        return False
    real = Path(os.path.realpath(path))
    return real.is_file() and real.is_relative_to(os.path.realpath(pool.root))
