"""The one policy for folders graft writes: what it may write to, and what it may ever remove.

graft removes only files it can prove it wrote. Two marks prove it:

* temp files are named ``.graft-tmp-*`` (a name no user picks), so clean-up after a kill never globs user files;
* every output folder graft makes or claims holds ``.graft-manifest.json``, the list of entries graft wrote there
  (``atomic_write`` records each file; a sub-folder graft claims is recorded in its parent's manifest). ``--overwrite``
  removes exactly those entries and leaves anything else in the folder.

A folder is graft's (a run or output folder it may clean) when it holds the manifest, or a ``graft.json`` (runs made
before the manifest existed; their files are the fixed ``LEGACY_RUN_FILES``).

A name graft reads from a file (a manifest entry, a feature-cache index row, a CSV manifest's relative path) goes
through ``contained``: one that would leave its folder is refused before anything is opened or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from graft.errors import GraftError
from graft.utils.text import display_name

__all__ = [
    "LEGACY_RUN_FILES", "MANIFEST", "RUN_LOCK", "RUN_LOCK_OWNER", "TEMP_PREFIX", "WHOLE_FOLDERS", "check_output",
    "claim", "contained", "entries", "is_graft_folder", "numbered_folder", "output_folder", "read_manifest", "record",
    "record_whole", "remove_own_files", "remove_temp_files", "replace_own", "temp_prefix"
]

TEMP_PREFIX = ".graft-tmp-"
MANIFEST = ".graft-manifest.json"
WHOLE_FOLDERS = ("mlruns", "wandb")  # the only folders graft hands whole to a writer (record_whole) and removes whole
LEGACY_RUN_FILES = ("graft.json", "model.safetensors", "metrics.json", "history.csv", "checkpoint.safetensors",
                    "best.safetensors", "data_report.json", "skipped_files.txt", "lr_find.png", "lr_find.csv",
                    "probe_grid.csv", "model.before-precise-bn.safetensors")  # what a pre-manifest fit wrote


def temp_prefix(name: str) -> str:
    """The prefix of a temp file that will become ``name``."""
    return f"{TEMP_PREFIX}{name}."


def is_graft_folder(folder: Path) -> bool:
    """True for a folder graft made: it holds the manifest, or a graft.json (an older run)."""
    return (folder / MANIFEST).is_file() or (folder / "graft.json").is_file()


def check_output(folder: str | os.PathLike, option: str = "--output",
                 protect: tuple[tuple[str | os.PathLike | None, str], ...] = ()) -> Path:
    """Checks, before any work, that graft may write the folder ``folder``, and creates it.

    Args:
        option: the flag the user set it with, named in errors.
        protect: (path, what) pairs, e.g. the data and the feature cache: the folder may not be, contain or lie
            inside any of them (``None`` paths are skipped).

    Raises:
        GraftError: the path or one of its parents is a file, it overlaps a protected path, or it is not writable.
    """
    if not str(folder).strip():
        raise GraftError(f"{option} {str(folder)!r} is blank: name a folder")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GraftError(f"{folder}: {option} names an existing file, not a folder; choose a folder")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise GraftError(f"{folder}: {option} lies under {existing}, which is a file; choose a folder")
    target = folder.resolve()
    for path, what in protect:
        if not path:  # None or "": nothing given (Path("") would be the working folder)
            continue
        other = Path(path).resolve()
        if target == other or target in other.parents or other in target.parents:
            relation = "is" if target == other else "contains" if target in other.parents else "lies inside"
            raise GraftError(f"{folder}: {option} {relation} the {what} ({path}); graft never writes over its "
                             f"inputs: choose a folder outside it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=temp_prefix("write-check"), dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise GraftError(f"{folder}: {option} is not writable ({error.strerror or error}); choose a folder you can "
                         "write to") from None
    return folder


def claim(folder: str | os.PathLike, option: str = "--output") -> Path:
    """Makes ``folder`` graft's (writes an empty manifest) unless it already is; refuses a non-empty folder that
    is not graft's, whose files could then be overwritten. Records ``folder`` in its parent's manifest if the
    parent is graft's (e.g. ``RUN/export``), so cleaning the parent removes it too."""
    folder = Path(folder)
    if not is_graft_folder(folder):
        foreign = entries(folder)
        if foreign:
            raise GraftError(f"{folder}: {option} is a folder graft did not make and it is not empty "
                             f"({len(foreign)} entries, e.g. {foreign[0]!r}); choose a new or empty folder")
        _write_manifest(folder, [])
    elif not (folder / MANIFEST).is_file():
        _write_manifest(folder, [name for name in LEGACY_RUN_FILES if (folder / name).exists()])
    record(folder)
    return folder


def record(path: str | os.PathLike) -> None:
    """Adds ``path`` to its folder's manifest, when that folder is graft's (a no-op elsewhere: the feature cache,
    a user's folder that ``predict --output`` writes one file into)."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if path.name == MANIFEST or not manifest.is_file():
        return
    names = read_manifest(path.parent)
    if path.name not in names:
        _write_manifest(path.parent, names + [path.name])


def record_whole(folder: str | os.PathLike) -> None:
    """Records ``folder`` in its parent's manifest as ``NAME/``: a folder graft made empty and handed whole to a
    third-party writer (MLflow's file store, which reads every file in its folders, so a manifest cannot go inside);
    cleaning the parent removes it with all it holds."""
    folder = Path(folder)
    manifest = folder.parent / MANIFEST
    if folder.name not in WHOLE_FOLDERS:
        raise ValueError(f"{folder.name} is not in WHOLE_FOLDERS: --overwrite would leave it")
    if not manifest.is_file():
        return
    names = read_manifest(folder.parent)
    if folder.name + "/" not in names:
        _write_manifest(folder.parent, [name for name in names if name != folder.name] + [folder.name + "/"])


def read_manifest(folder: Path) -> list[str]:
    """The names in ``folder``'s manifest; a damaged one lists nothing (so nothing is removed)."""
    try:
        names = json.loads((folder / MANIFEST).read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and _leaves(n.removesuffix("/"), nested=False) is None] \
        if isinstance(names, list) else []


def contained(folder: str | os.PathLike, name: str, nested: bool = False, links: bool = False) -> Path:
    """``folder / name`` for a ``name`` read from a file (a cache index, a manifest), refused if it leaves ``folder``.

    Every file graft reads is data: a name in it may not climb out with ``..``, be absolute, name a drive, or hold a
    NUL byte. Checks happen before anything is opened, so a refused name is never read, written or deleted.

    Args:
        nested: ``name`` may hold separators (files in sub-folders); otherwise it must be one plain file name.
        links: symbolic links below ``folder`` are followed (a user's data laid out with links); otherwise the path
            may not be a link, and its resolved form must lie inside the resolved ``folder``.

    Raises:
        GraftError: "'NAME' REASON": the caller adds the file and line it came from.
    """
    reason = _leaves(name, nested)
    if reason is None and not links:
        reason = _escapes(Path(folder), name)
    if reason:
        raise GraftError(f"{display_name(str(name))!r:.200} {reason}")
    return Path(folder) / name


def _leaves(name, nested: bool) -> str | None:
    """Why ``name`` is not a relative path that stays in its folder, from its text alone (None: it stays)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "is not a file name"
    pure = Path(name)
    if pure.is_absolute() or pure.drive or name.startswith(("/", "\\")):
        return "is an absolute path, not a name inside the folder"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts and (not nested or os.path.normpath(name.replace("\\", "/")).split(os.sep)[0] == ".."):
        return "climbs out of the folder with '..'"
    if not nested and len(parts) > 1:
        return "holds a folder separator; expected a plain file name"
    if not pure.name:
        return "is not a file name"
    return None


def _escapes(folder: Path, name: str) -> str | None:
    """Why ``folder / name`` leaves ``folder`` on disk (a link, or a link in the way), or None."""
    path = folder / name
    try:
        if path.is_symlink():
            return "is a symbolic link"
        if not path.resolve().is_relative_to(folder.resolve()):
            return f"leads out of {folder} through a symbolic link"
    except (OSError, RuntimeError) as error:  # a link loop: RuntimeError before Python 3.13, OSError after
        return f"cannot be resolved ({error})"
    return None


def _write_manifest(folder: Path, names: list[str]) -> None:
    # not through atomic_write (it records into this very file); a temp file and a rename are atomic enough
    temp = folder / f"{TEMP_PREFIX}{MANIFEST}"
    temp.write_text(json.dumps(names, indent=0) + "\n", encoding="utf-8", errors="surrogateescape")
    os.replace(temp, folder / MANIFEST)


def remove_temp_files(folder: Path) -> None:
    """Removes the temp files a kill -9 mid-write left, only from a folder graft made."""
    if not folder.is_dir() or not is_graft_folder(folder):
        return
    for temp in folder.glob(f"{TEMP_PREFIX}*"):
        if temp.is_file() and not temp.is_symlink():
            temp.unlink()


def remove_own_files(folder: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Removes what graft wrote in ``folder`` (its manifest's entries, sub-folders it claimed recursively, temp
    files) and returns the names of what it left. ``keep``: names never removed (the run lock)."""
    remove_temp_files(folder)
    names = read_manifest(folder) if (folder / MANIFEST).is_file() else [
        n for n in LEGACY_RUN_FILES if (folder / n).exists()]
    for name in names:
        path = folder / name.removesuffix("/")
        if name in keep:
            continue
        if name.endswith("/"):  # a folder graft made and handed whole to a writer (record_whole)
            if name.removesuffix("/") in WHOLE_FOLDERS and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # only the names graft hands whole: a manifest naming another is data, not a wipe
            continue
        if path.is_dir() and not path.is_symlink():
            # a folder graft claimed: its own manifest says what is graft's; emptied, it goes too
            if (path / MANIFEST).is_file() and not remove_own_files(path):
                (path / MANIFEST).unlink()
                path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
    if (folder / MANIFEST).is_file():
        _write_manifest(folder, [])
    return sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, *keep))



RUN_LOCK = ".graft.lock"  # the run lock (graft.training.checkpoints.LOCK): graft's own, never a user's entry
RUN_LOCK_OWNER = ".graft.lock.pid"  # the lock holder's pid, for the refusal message (filelock truncates the lock)


def entries(folder: Path) -> list[str]:
    """A folder's names, less graft's bookkeeping (manifest, lock, temp files)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in (MANIFEST, RUN_LOCK, RUN_LOCK_OWNER) and not p.name.startswith(TEMP_PREFIX))


def replace_own(folder: Path, option: str = "--output") -> list[str]:
    """``--overwrite``: refuses a non-empty folder graft did not make, else removes graft's files from it; returns
    the names left (a user's own files, kept)."""
    if entries(folder) and not is_graft_folder(folder):
        raise GraftError(f"{folder}: {option} is not a folder graft wrote (no graft.json or {MANIFEST}); --overwrite "
                         "only replaces graft's own output: choose a new or empty folder")
    return remove_own_files(folder, keep=(RUN_LOCK, RUN_LOCK_OWNER))


def output_folder(folder: str | os.PathLike, option: str = "--output",
                  protect: tuple[tuple[str | os.PathLike | None, str], ...] = (),
                  overwrite: bool | None = None) -> Path:
    """Every command that writes a folder calls this first, before any work: ``check_output``, then

    * ``overwrite=None`` (commands without --overwrite): a new, empty or graft-made folder is written in place
      (graft's files replaced, others kept); a non-empty folder graft did not make is refused;
    * ``overwrite=False``: a non-empty folder is refused; ``True``: see ``replace_own``.
    """
    folder = check_output(folder, option, protect)
    if overwrite is False and entries(folder):
        raise GraftError(f"{folder}: {option} folder is not empty; pass --overwrite (graft's own files only are "
                         "replaced) or choose another folder")
    if overwrite:
        replace_own(folder, option)
    return claim(folder, option)


def numbered_folder(base: str | os.PathLike) -> Path:
    """Creates and returns ``BASE-N`` for the first N from 1 with no such entry (``runs/graft-1``, ``-2``, ...).

    Creating it is the claim (``mkdir`` fails if it exists), so two runs started at once never share a folder.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        folder = base.with_name(f"{base.name}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1
        except OSError as error:
            raise GraftError(f"{folder}: cannot create the run folder ({error.strerror or error}); choose one with "
                             "-o") from None
