"""`graft shard`: a dataset as WebDataset tar shards, for data past the folder-scan model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.shared import app, err, friendly_errors, out

__all__ = ["shard"]


@app.command()
@friendly_errors
def shard(
    data: Annotated[str, typer.Argument(help="class folders (optionally train/val/test) or a CSV manifest")],
    output: Annotated[Path, typer.Option("--output", "-o",
                                         help="the shard folder: SPLIT-NNNNNN.tar + graft-shards.json")],
    shard_size: Annotated[str, typer.Option(help="bytes per shard, e.g. 512MB, 1GB, 64MiB")] = "512MB",
    val_fraction: Annotated[float, typer.Option(help="held out for val when the data has no val/ split")] = 0.2,
    seed: Annotated[int, typer.Option(help="seeds that val split (recorded: every fit from the shards sees it)")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace graft's own files in a shard folder written before")] = False,
):
    """Writes a dataset as WebDataset tar shards that `graft fit SHARDS/` streams (images as stored, splits kept).

    Example: graft shard ./pets -o pets-shards/ --shard-size 512MB
    """
    from graft.data.sharding import shard_dataset

    sidecar = shard_dataset(data, output, shard_size, val_fraction, seed, overwrite or None, err.print)
    parts = ", ".join(f"{split}: {part['count']} images in {len(part['shards'])} shard(s)"
                      for split, part in sidecar["splits"].items())
    out.print(f"wrote {output}/ ({parts}) and graft-shards.json")
