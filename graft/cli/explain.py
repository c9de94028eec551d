"""`graft explain`: Grad-CAM overlays showing where a trained run looked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graft.cli.shared import BATCH_SIZES, TOP_K, DeviceOpt, app, check_options, err, friendly_errors, out
from graft.errors import GraftError

__all__ = ["explain"]


@app.command()
@friendly_errors
def explain(
    paths: Annotated[list[str], typer.Argument(help="RUN then images, folders or glob patterns")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the overlay PNGs and explanations.json")],
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 3,
    target: Annotated[Optional[str], typer.Option("--class", help="explain this class (default: each top-1)")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    device: DeviceOpt = "auto",
):
    """Grad-CAM overlays: a heat map over each image of where the model looked for its top-1 class (or --class),
    and explanations.json with the top-k labels. Needs the explain extra (Captum), see README "Explanations".

    Example: graft explain runs/pets img.jpg more_images/ -o runs/pets/explained
    """
    from graft.evaluation.explain import explain as explain_files
    from graft.evaluation.explain import write_explanations
    from graft.utils.outputs import output_folder

    check_options(("--top-k", top_k, *TOP_K), ("--batch-size", batch_size, *BATCH_SIZES))
    if not paths or not (Path(paths[0]) / "graft.json").is_file():
        raise GraftError(f"{paths[0] if paths else 'RUN'}: not a run folder (no graft.json); give the folder fit wrote")
    run, inputs = paths[0], paths[1:]
    if not inputs:
        raise GraftError("no images given: graft explain RUN IMAGE_OR_FOLDER [...] -o DIR")
    folders = tuple((item, "image folder") for item in inputs if Path(item).is_dir())
    out_dir = output_folder(output, "--output", folders)
    rows = explain_files(run, inputs, top_k=top_k, target=target, device=device, batch_size=batch_size)
    failed = [row for row in rows if row.error]
    if len(failed) == len(rows):
        raise GraftError(failed[0].error if len(rows) == 1 else f"none of the {len(rows)} images could be read; "
                         f"the first: {failed[0].error}")
    summary = write_explanations(rows, out_dir)
    for row in failed:
        err.print(f"skipped: {row.error}")
    for row in rows:
        if not row.error:
            top = ", ".join(f"{label} {p:.3f}" for label, p in zip(row.labels, row.probabilities))
            out.print(f"{row.path}: {top}" + (f" ({row.note})" if row.note else ""))
    err.print(f"wrote {len(rows) - len(failed)} overlays and {summary}")
