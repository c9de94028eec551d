"""The one reader of ``.safetensors`` files: a damaged file becomes one GraftError naming it and what to do.

Every ``.safetensors`` graft reads (``--weights FILE``, a run folder's ``model.safetensors``, ``checkpoint.safetensors``
on ``--resume``, ``best.safetensors``) goes through ``read_safetensors``. The 8-byte header length and every tensor's
offsets are checked against the file's size from ``stat`` before the safetensors library sees the file, so a header
that claims terabytes is refused without allocating anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from graft.errors import GraftError

__all__ = ["DTYPE_BYTES", "MAX_HEADER_BYTES", "check_safetensors", "read_safetensors"]

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: Path) -> None:
    """Raises ValueError with the reason if ``path`` is not a whole safetensors file (header and offsets)."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{size} bytes, too short for a safetensors header" if size else "the file is empty")
    with open(path, "rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"its header claims {header_bytes:,} bytes, the file has {size:,}: truncated, or not a "
                             "safetensors file")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("its header is not JSON: truncated, or not a safetensors file") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")  # noqa: TRY004 - a reason, caught below
    data_bytes = size - 8 - header_bytes
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(name, entry, data_bytes)


def _check_entry(name: str, entry, data_bytes: int) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or not isinstance(
            entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2:
        raise ValueError(f"tensor {name!r:.60} has no valid shape/data_offsets")
    begin, end = entry["data_offsets"]
    if not all(isinstance(v, int) and v >= 0 for v in (begin, end, *entry["shape"])):
        raise ValueError(f"tensor {name!r:.60} has a negative or non-integer offset or shape")
    if not begin <= end <= data_bytes:
        raise ValueError(f"tensor {name!r:.60} lies at bytes {begin}-{end}, beyond the {data_bytes:,} bytes of "
                         "data: truncated")
    width = DTYPE_BYTES.get(entry.get("dtype"))
    if width is not None and math.prod(entry["shape"]) * width != end - begin:
        raise ValueError(f"tensor {name!r:.60}: its shape needs {math.prod(entry['shape']) * width:,} bytes, its "
                         f"offsets give {end - begin:,}")


def read_safetensors(path: str | os.PathLike, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, checked first.

    Args:
        fix: what the user should do about a damaged file, the end of the error message.

    Raises:
        GraftError: "PATH: damaged or not a safetensors file (REASON); FIX", for any defect.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - ValueError (ours), SafetensorError, OSError: all mean "unreadable"
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise GraftError(f"{path}: damaged or not a safetensors file ({reason}); {fix}") from None
