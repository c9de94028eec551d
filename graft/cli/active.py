"""`graft suggest`: which unlabelled images to label next (label them with `graft serve RUN --label POOL`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.shared import WORKERS, CacheOpt, DeviceOpt, WorkersOpt, app, check_options, err, friendly_errors, out

__all__ = ["suggest"]


@app.command()
@friendly_errors
def suggest(
    run: Annotated[str, typer.Argument(help="a trained run folder")],
    pool: Annotated[str, typer.Argument(help="unlabelled images: a folder, a glob pattern or a CSV (path column)")],
    n: Annotated[int, typer.Option("-n", help="how many images to suggest")] = 20,
    output: Annotated[Path, typer.Option("--output", "-o", help="suggestions.csv + suggestions.html")] =
    Path("suggestions"),
    by: Annotated[str, typer.Option(help="uncertainty: margin (between the two likeliest classes) or entropy")] =
    "margin",
    candidates: Annotated[float, typer.Option(help="choose for diversity among this many times N of the most "
                                              "uncertain")] = 5.0,
    device: DeviceOpt = "auto",
    cache: CacheOpt = None,
    workers: WorkersOpt = 0,
):
    """Suggest the N unlabelled images whose labels would help the run most: uncertain, and far apart.

    Example: graft suggest runs/pets ./unlabelled -n 50 -o next/   then   graft serve runs/pets --label ./unlabelled
    --suggestions next/suggestions.csv
    """
    from graft.analysis.suggest import suggest as run_suggest

    check_options(("-n", n, 1, 1_000_000), ("--candidates", candidates, 1, 1000), ("--workers", workers, *WORKERS))
    result = run_suggest(run, pool, n, output, by, candidates, device, cache, workers, log=err.print)
    for note in result.notes:
        err.print(f"note: {note}")
    out.print(f"{len(result.rows)} suggestions from {result.pool_size} pool images: {', '.join(result.files)}")
