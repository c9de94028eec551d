"""`graft diagnose` and `graft stats`: looking inside a network and a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graft.cli.shared import (
    BATCH_SIZES,
    IMAGE_SIZES,
    ActivationOpt,
    BatchSizeOpt,
    ImageSizeOpt,
    InitOpt,
    NormOpt,
    PretrainedOpt,
    VggStagesOpt,
    app,
    check_options,
    err,
    friendly_errors,
    out,
    print_table,
)
from graft.cli.train import lab_overrides
from graft.config import MAX_LR

__all__ = ["diagnose", "stats"]


@app.command()
@friendly_errors
def diagnose(
    target: Annotated[str, typer.Argument(help="a run folder, or a backbone name (randomly initialised)")],
    data: Annotated[str, typer.Argument(help="class folders or a CSV: one batch of training images is used")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="diagnosis.json + activations.png")] =
    None,
    batch_size: BatchSizeOpt = 64,
    lr: Annotated[Optional[float], typer.Option(help="for the update/weight ratios (default: the run's, or 1e-3)")]
    = None,
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = False,
    activation: ActivationOpt = None, norm: NormOpt = None, init: InitOpt = None, vgg_stages: VggStagesOpt = None,
):
    """Why does it train badly? Activation statistics (dead ReLUs, saturation, collapse), gradient flow
    (update/weight ratios) and receptive fields, on one batch.

    Example: graft diagnose vgg-like ./pets --activation tanh --init normal:0.05 -o diag/
    """
    from graft.analysis.diagnose import diagnose as run_diagnosis

    check_options(("--batch-size", batch_size, *BATCH_SIZES), ("--lr", lr, 0, MAX_LR, True),
                  ("--image-size", image_size, *IMAGE_SIZES))
    options = {k: v for k, v in lab_overrides(activation, norm, init, vgg_stages).items() if v is not None}
    result = run_diagnosis(target, data, str(output) if output else None, batch_size, lr, image_size, pretrained,
                           options)
    print_table("activations (one batch, forward order)", ["layer", "type", "mean", "std", "dead", "saturated",
                                                           "flag"],
                [[r.name, r.kind, r.mean, r.std, "" if r.dead is None else f"{r.dead:.0%}",
                  "" if r.saturated is None else f"{r.saturated:.0%}", "; ".join(r.flags)] for r in result.activations])
    print_table("gradient flow (one step)", ["weights", "grad norm", "update/weight", "flag"],
                [[g.name, f"{g.grad_norm:.2e}", f"{g.update_ratio:.1e}", "; ".join(g.flags)] for g in result.gradients])
    print_table("stage nodes", ["node", "output", "receptive field"],
                [[n.name, "x".join(map(str, n.shape)), n.receptive_field] for n in result.nodes])
    from graft.utils.plotting import can_plot

    wrote = f"; wrote {output}/diagnosis.json" + (" and activations.png" if can_plot() else "") if output else ""
    out.print(f"{len(result.flags)} flag(s){wrote}")


@app.command()
@friendly_errors
def stats(
    data: Annotated[str, typer.Argument(help="class folders, a CSV or tar shards")],
    size: Annotated[int, typer.Option(help="images are resized to this square first")] = 64,
    max_images: Annotated[int, typer.Option(help="a random sample of at most this many training images")] = 5000,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="stats.json + mean_image.png")] = None,
):
    """Per-channel mean and std and the mean image of a dataset (what scratch training normalises with).

    Example: graft stats ./pets -o pets-stats/
    """
    from graft.data.discovery import discover
    from graft.data.statistics import training_statistics
    from graft.utils.outputs import output_folder

    check_options(("--size", size, *IMAGE_SIZES), ("--max-images", max_images, 1, 1_000_000_000))
    if output:  # before the work: an unwritable or clashing folder wastes nothing
        output_folder(output, "-o", ((data, "data"),))
    splits = discover(data)
    result = training_statistics(splits, size, max_images, log=err.print)
    print_table(f"{result.images} training images at {size}x{size}", ["channel", "mean", "std"],
                [[c, m, s] for c, m, s in zip("RGB", result.mean, result.std)])
    if output:
        from PIL import Image

        from graft.utils.files import atomic_write, write_json

        write_json(output / "stats.json", result.to_dict())
        mean_image = Image.fromarray((result.mean_image * 255).round().astype("uint8"))
        atomic_write(output / "mean_image.png", lambda temp: mean_image.save(temp, format="PNG"))
        out.print(f"wrote {output}/stats.json and mean_image.png")
