"""``graft shard``: a folder or CSV manifest discovered, scanned and written as WebDataset tar shards.

Above discovery, the scan and ``graft.data.shards`` (which only reads and writes shard sets), so the imports run
one way: discovery reads a shard set through ``shards``; this module builds one from what discovery found.
"""

from __future__ import annotations

import logging
import os

from graft.data.discovery import discover
from graft.data.scan import scan
from graft.data.shards import parse_size, write_shards
from graft.errors import GraftError
from graft.utils.outputs import output_folder

__all__ = ["shard_dataset"]

log = logging.getLogger(__name__)


def shard_dataset(data: str | os.PathLike, output: str | os.PathLike, shard_size: str | int = "512MB",
                  val_fraction: float = 0.2, seed: int = 0, overwrite: bool | None = None, progress_log=None) -> dict:
    """``graft shard``: discovers and scans ``data`` (unreadable files are left out and listed in the sidecar),
    then writes its splits as tar shards into ``output``; a plain folder's seeded val split is computed here once
    and recorded, so every later fit sees the same split. Returns the sidecar. ``progress_log``: where the scan's
    and the writing's progress lines go (none without it)."""
    parse_size(shard_size)  # a bad size is refused before any work
    folder = output_folder(output, "--output", ((data, "data"),), overwrite)
    splits = discover(data, val_fraction, seed)
    if splits.shards is not None:
        raise GraftError(f"{data}: is already a shard set; graft shard reads class folders or a CSV manifest")
    report = scan(splits, log=progress_log)
    sidecar = write_shards(splits, folder, shard_size, progress_log)
    if report.skipped:
        log.warning("%d unreadable file(s) left out, e.g. %s", len(report.skipped), report.skipped[0][1])
    return sidecar
