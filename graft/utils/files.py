"""Writing files so nothing is ever half-written: atomic writes, JSON, CSV, weights (figures: utils.plotting)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from graft.errors import GraftError
from graft.utils.outputs import record, temp_prefix

__all__ = ["atomic_write", "file_sha256", "read_json_object", "save_weights", "write_json", "write_csv"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write) -> None:
    """Writes through ``write(temp_path)`` to a temp file beside ``path``, fsyncs and renames: never half a file.

    The temp file is ``.graft-tmp-NAME.*`` (see ``graft.utils.outputs``): the only names a clean-up may remove.
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


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Writes ``rows`` (only their ``columns``) as a UTF-8 CSV file, atomically; a file name that is not UTF-8 keeps
    its bytes (``surrogateescape``), so the path can be found again. Rows with names in them: ``safe_record`` each
    first (``graft.utils.text``), so a spreadsheet shows them as text."""
    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes as hex, read in 1 MiB chunks (weights files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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

