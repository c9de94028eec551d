"""`graft fit`, `graft lr-find`, `graft compare` and `graft demo`: training runs."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from graft.cli.options import config_option, field_parameters, given_fields, parse_set
from graft.cli.shared import (
    BATCH_SIZES,
    IMAGE_SIZES,
    ActivationOpt,
    BackboneOpt,
    BatchSizeOpt,
    DeviceOpt,
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
    print_label_set_classes,
    print_table,
)
from graft.config import MAX_EPOCHS, MAX_LR
from graft.errors import GraftError

__all__ = ["compare", "demo", "fit", "lr_find", "lab_overrides"]


@friendly_errors
def fit(
    data: Annotated[Optional[str], typer.Argument(help="class folders (optionally train/val/test) or a CSV")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file with data/model/train sections",
                                                   rich_help_panel="Run")] = None,
    set_values: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", rich_help_panel="Run",
        help="any config key, dotted (repeatable): --set train.momentum=0.8; after --config, before the flags")] = None,
    resume: Annotated[bool, typer.Option(help="continue the interrupted run in --output", rich_help_panel="Run")] =
    False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --output", rich_help_panel="Run")] = False,
    devices: Annotated[int, typer.Option(help="train on N processes: runs `python -m torch.distributed.run "
                                         "--nproc-per-node N -m graft fit ...` with the other arguments (one node)",
                                         min=1, max=1024, rich_help_panel="Runtime")] = 1,
    **fields,
):
    """Train a classifier on DATA and write a run folder. Every option below is a config key (YAML: data/model/train
    sections); the defaults shown apply unless --config or --set says otherwise.

    Example: graft fit ./pets --backbone resnet50.a1_in1k --strategy finetune --epochs 10 -o runs/pets
    """
    from graft.config import load_config
    from graft.training.fitting import fit as fit_run
    from graft.utils import distributed

    if devices > 1:
        _exec_torchrun(devices)
    overrides = {"data.path": data, **parse_set(set_values), **given_fields(fields)}
    settings = load_config(config, overrides)
    if not resume and not settings.data.path:
        raise GraftError("no data given: graft fit DATA (a class-per-folder tree or a path,label CSV)")
    auto = "output" not in overrides and not _yaml_sets_output(config)
    distributed.init_from_env(settings.train.device)
    if auto:  # under torchrun rank 0 picks the numbered folder for every process
        settings.output = distributed.main_decides(lambda: _auto_output(settings.output, resume))
    try:
        result = fit_run(settings, resume=resume, overwrite=overwrite)
    except BaseException:
        # a numbered folder nothing was written to would only push the retry to the next N
        if auto and distributed.is_main():
            _remove_if_unused(Path(settings.output))
        raise
    metrics = result.metrics.get("val", {})
    if result.metrics.get("multi_label"):
        print_table(f"run {result.run_dir} (multi-label)", ["split", "mAP", "micro F1", "macro F1", "exact match",
                                                            "images"],
                    [[split, result.metrics[split]["mAP"], result.metrics[split]["micro_f1"],
                      result.metrics[split]["macro_f1"], result.metrics[split]["exact_match"],
                      result.metrics[split]["images"]] for split in ("val", "test") if split in result.metrics])
        headline = result.metrics.get("headline", {}).get("split")
        if headline:
            print_label_set_classes(f"per class ({headline})", result.metrics[headline]["per_class"])
        return
    print_table(f"run {result.run_dir}", ["split", "accuracy", "macro F1", "images"],
                [[split, result.metrics[split]["accuracy"], result.metrics[split]["macro_f1"],
                  result.metrics[split]["images"]] for split in ("val", "test") if split in result.metrics])
    if not metrics:
        out.print("no validation images: metrics.json has training history only")


def _exec_torchrun(devices: int) -> None:
    """``--devices N``: replaces this process by torchrun's launcher with the same arguments minus --devices; graft
    starts no workers of its own (torchrun does, and handles a failed rank by ending the job)."""
    import os
    import sys

    from graft.utils.distributed import launched

    if launched():
        raise GraftError("--devices is for a plain `graft fit`; under torchrun set --nproc-per-node instead")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}", "-m",
               "graft", *argv]
    err.print(f"--devices {devices}: {' '.join(command[1:])}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def _yaml_sets_output(config: Path | None) -> bool:
    """Whether the --config file names the run folder (load_config has read and checked it already)."""
    if config is None:
        return False
    import yaml

    raw = yaml.safe_load(Path(config).read_text()) or {}
    return "output" in raw


def _auto_output(base: str, resume: bool) -> str:
    """The run folder when none is given: ``BASE-N``, the first free N (runs/graft-1, -2, ...), so that a second
    `graft fit` starts a new run instead of stopping at "output folder is not empty"."""
    from graft.utils.outputs import numbered_folder

    if resume:  # a new numbered folder holds nothing to continue
        raise GraftError("--resume needs the run to continue: graft fit --resume -o RUN")
    folder = numbered_folder(base)
    err.print(f"run folder: {folder} (-o not given)")
    return str(folder)


def _remove_if_unused(folder: Path) -> None:
    from graft.utils.outputs import entries

    if folder.is_dir() and not entries(folder):  # graft's bookkeeping only (manifest, lock, temp files)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _with_field_options(command):
    """Replaces ``**fields`` in the command's signature by one option per config field, which typer then reads
    (after the argument, before the command's own options: the order of the panels in --help)."""
    signature = inspect.signature(command, eval_str=True)
    data, *own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[data, *field_parameters(), *own])
    return command


app.command()(_with_field_options(fit))


@app.command()
@friendly_errors
def demo(
    data: Annotated[Optional[str], typer.Option(help="your class folders instead of scikit-learn's digits")] = None,
    shots: Annotated[int, typer.Option(help="training images per class (digits)")] = 10,
    epochs: Annotated[int, typer.Option()] = 12,
    image_size: Annotated[int, typer.Option()] = 64,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="keep the run folders here")] = None,
    write_data: Annotated[Optional[Path], typer.Option(help="only write the digits as class folders (train/, val/, "
                                                            "test/) into this new folder, then stop")] = None,
):
    """Scratch vs probe vs finetune vs auto with a real ImageNet backbone (EfficientNet-Lite0), offline.

    Example: graft demo            (digits, about a minute on two CPU cores)
             graft demo --data ./pets;  graft demo --write-data digits   (data for the README's tour)
    """
    from graft.analysis.demo import DEMO_BACKBONE, run_demo, write_digits

    check_options(("--shots", shots, 1, 10_000), ("--epochs", epochs, 1, MAX_EPOCHS),
                  ("--image-size", image_size, *IMAGE_SIZES))
    if write_data is not None:
        from graft.utils.outputs import output_folder

        output_folder(write_data, "--write-data")  # a new or empty folder only: never over the user's files
        write_digits(write_data, shots)
        out.print(f"wrote scikit-learn's digits to {write_data}/ (train: {shots} a class, val: 5 a class, test: the "
                  "rest)")
        return
    what = data or f"scikit-learn digits, {shots} training images per class"
    err.print(f"graft demo: {DEMO_BACKBONE} (ImageNet) on {what}; scratch is the same network, randomly initialised")
    rows = run_demo(data=data, shots=shots, epochs=epochs, image_size=image_size, output=output, log=err.print)
    print_table("transfer learning vs training from scratch", ["strategy", "held-out accuracy", "split",
                                                                "wall time (s)", "images/s", "kept"],
                [[r.strategy, r.accuracy, r.split, f"{r.seconds:.1f}", _speed(r.images_per_s), r.chose] for r in rows])
    best = max(rows, key=lambda r: r.accuracy)
    scratch = next((r for r in rows if r.strategy == "scratch"), None)
    if scratch and best.strategy != "scratch":
        out.print(f"{best.strategy} beats scratch by {100 * (best.accuracy - scratch.accuracy):.1f} points")


def lab_overrides(activation, norm, init, vgg_stages) -> dict:
    """The scratch-architecture options of `fit` and `lab` as dotted config overrides (None: not given)."""
    return {"model.activation": activation, "model.norm": norm, "model.init": init, "model.vgg_stages": vgg_stages}


@app.command("lr-find")
@friendly_errors
def lr_find(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: BackboneOpt = None,
    strategy: Annotated[str, typer.Option(help="finetune or scratch: the stage whose rate is found")] = "finetune",
    output: Annotated[Path, typer.Option("--output", "-o", help="lr_find.png and lr_find.csv go here")] =
    Path("lr-find"),
    steps: Annotated[int, typer.Option(help="rates tried, one training step each")] = 200,
    start_lr: Annotated[float, typer.Option()] = 1e-7,
    end_lr: Annotated[float, typer.Option()] = 10.0,
    image_size: ImageSizeOpt = None,
    batch_size: BatchSizeOpt = 32,
    pretrained: PretrainedOpt = True,
    device: DeviceOpt = "auto",
    activation: ActivationOpt = None, norm: NormOpt = None, init: InitOpt = None, vgg_stages: VggStagesOpt = None,
):
    """Sweep the learning rate exponentially for a few hundred steps and suggest one (`graft fit --lr auto` does
    this first).

    Example: graft lr-find ./pets -b resnet50.a1_in1k --strategy finetune
    """
    from graft.config import load_config
    from graft.data.discovery import discover
    from graft.data.scan import scan
    from graft.training.lr_find import find_lr, save_lr_finding
    from graft.utils.outputs import output_folder
    from graft.utils.runtime import Runtime, autocast_dtype, resolve_device

    check_options(("--steps", steps, 2, 100_000), ("--start-lr", start_lr, 0, MAX_LR, True),
                  ("--end-lr", end_lr, start_lr if start_lr > 0 else 0, MAX_LR, True))
    output_folder(output, "-o", ((data, "data"),))  # before the sweep: an unwritable folder wastes nothing
    values = {"data.path": data, "model.backbone": backbone, "train.strategy": strategy, "data.image_size": image_size,
              "data.batch_size": batch_size, "model.pretrained": pretrained, "train.device": device,
              **lab_overrides(activation, norm, init, vgg_stages)}
    config = load_config(None, values)
    target = resolve_device(config.train.device)
    runtime = Runtime(target, autocast_dtype(target, config.train.precision), config.train.channels_last)
    splits = discover(data, config.data.val_fraction, config.train.seed)
    scan(splits, config.data.max_image_pixels, log=runtime.log)
    finding = find_lr(config, splits, runtime, steps, start_lr, end_lr)
    save_lr_finding(finding, output)
    from graft.utils.plotting import can_plot

    out.print(f"suggested --lr {finding.suggestion:.2e} ({finding.reason}); curve in "
              + (f"{output}/lr_find.png and lr_find.csv" if can_plot() else f"{output}/lr_find.csv"))
    if finding.warning:
        err.print(f"warning: {finding.warning}")


@app.command()
@friendly_errors
def compare(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: Annotated[str, config_option("model.backbone", help="the pretrained backbone (probe, finetune)")] =
    "tf_efficientnet_lite0",
    scratch_backbone: Annotated[Optional[str], typer.Option(help="train this from scratch instead (e.g. "
                                                                 "small-cnn-cifar); default: the backbone")] = None,
    strategies: Annotated[str, typer.Option(help="comma-separated")] = "scratch,probe,finetune",
    epochs: Annotated[int, typer.Option(help="scratch and fine-tuning epochs (an upper bound with --budget)")] = 12,
    budget: Annotated[float, typer.Option(help="seconds of training per strategy: an equal wall-clock budget")] = 0,
    image_size: ImageSizeOpt = None,
    batch_size: BatchSizeOpt = 32,
    output: Annotated[Path, typer.Option("--output", "-o", help="run folders, comparison.csv and .png")] =
    Path("compare"),
    activation: ActivationOpt = None, norm: NormOpt = None, init: InitOpt = None, vgg_stages: VggStagesOpt = None,
):
    """Scratch vs probe vs finetune on the same split and budget: the lecture's table (accuracy, wall time, img/s).

    Example: graft compare ./flowers --scratch-backbone small-cnn-cifar --budget 300
    """
    from graft.analysis.comparison import compare_strategies

    check_options(("--epochs", epochs, 1, MAX_EPOCHS), ("--budget", budget, 0, 1e9, False, "0: no limit"),
                  ("--image-size", image_size, *IMAGE_SIZES), ("--batch-size", batch_size, *BATCH_SIZES))
    overrides = {"data.image_size": image_size, "data.batch_size": batch_size}
    lab_options = {k: v for k, v in lab_overrides(activation, norm, init, vgg_stages).items() if v is not None}
    rows = compare_strategies(data, backbone, output, tuple(s.strip() for s in strategies.split(",")),
                              scratch_backbone, epochs, budget, overrides, lab_options, verbose=True, log=err.print)
    print_table("scratch vs transfer", ["strategy", "backbone", "accuracy", "split", "wall time (s)", "images/s",
                                        "epochs"],
                [[r.strategy, r.backbone, r.accuracy, r.split, f"{r.seconds:.1f}", _speed(r.images_per_s), r.epochs]
                 for r in rows])
    from graft.utils.plotting import can_plot

    out.print(f"wrote {output}/comparison.csv" + (" and comparison.png" if can_plot() else ""))


def _speed(images_per_s: float) -> str:
    """A row's images/s; "-" when the run measured none (every feature came from the cache): never a false 0."""
    return f"{images_per_s:.0f}" if images_per_s else "-"
