"""Writing files so that nothing is ever half-written: atomic writes, JSON, CSV, weights, figures."""

from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from graft.errors import GraftError
from graft.utils.outputs import record, temp_prefix
from graft.utils.text import display_name

__all__ = ["atomic_write", "contained", "read_json_object", "save_weights", "write_json"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write) -> None:
    """Writes through ``write(temp_path)`` to a temp file beside ``path``, fsyncs and renames: never half a file.

    The temp file is ``.graft-tmp-NAME.*`` (see ``graft.outputs``): the only names a clean-up may remove.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)  # a name no user picks
    os.close(handle)
    os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run folder is shared like any other file (chmod, not
    # fchmod: os.fchmod does not exist on Windows)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_UMASK)  # again: writers such as safetensors replace the temp file with a 0600 one
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
        _fsync_folder(path.parent)
        record(path)  # into the folder's manifest if graft made the folder: what --overwrite may remove
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":  # safetensors wraps io errors
            raise GraftError(_write_error(path, error)) from None
        raise


def _write_error(path: Path, error: BaseException) -> str:
    text = str(error)
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
    hint = "the disk is full: free space, then continue with --resume" if full else "check the folder is writable"
    reason = getattr(error, "strerror", None) or text.splitlines()[0][:200]
    return f"{path}: could not be written ({reason}); the previous version is intact; {hint}"


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable (POSIX); a power cut after it then cannot bring back the old file."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its rename is durable enough
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_json(path: str | os.PathLike, data) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=2) + "\n"))


def save_weights(path: str | os.PathLike, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda temp: save_file(state, temp, metadata=metadata or {}))


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _save(figure, path) -> None:
    import matplotlib.pyplot as plt



    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))  # recorded in graft's manifest
    plt.close(figure)


def read_json_object(path: str | os.PathLike, max_bytes: int | None = None) -> dict:
    """A JSON object from ``path``, or {} when it is missing, unreadable, larger than ``max_bytes`` or not an object:
    for records that are shown (a page's facts, a model card, a report line), never relied on."""
    try:
        if max_bytes is not None and os.stat(path).st_size > max_bytes:
            return {}
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
