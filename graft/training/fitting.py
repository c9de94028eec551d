"""The training loop: ``fit`` → ``run_stage`` → ``train_epoch`` / ``validate``, with atomic per-epoch checkpoints.

Reproducibility: every epoch reseeds all RNGs from (seed, epoch), so an interrupted run resumed from its last
checkpoint follows exactly the path of an uninterrupted one. Distributed training (torchrun) slots in through
``Runtime``: rank-0-only logging and saving, and ``create_sampler``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from pathlib import Path

from graft.config import FitConfig, apply_overrides, check_ranges
from graft.data.discovery import DatasetSplits, discover
from graft.data.scan import scan
from graft.errors import GraftError
from graft.models.backbones.registry import create_backbone
from graft.models.grafted import GraftModel, backbone_name
from graft.models.run_folder import model_card
from graft.probing.cache import cache_folder
from graft.probing.extraction import FeatureSet
from graft.training import auto, multilabel, recipes, selection, semi
from graft.training.arguments import config_from_arguments
from graft.training.checkpoints import (
    CHECKPOINT,
    check_same_classes,
    prepare_run_dir,
    read_checkpoint,
    resumable_config,
    run_lock,
)
from graft.training.excluding import exclude_listed
from graft.training.finishing import finish_run
from graft.training.lr_find import find_lr, save_lr_finding
from graft.training.probe_head import fit_probe_head  # re-exported
from graft.training.setup import create_loaders, create_on_device
from graft.training.stages import run_stages
from graft.training.state import FitResult, Hooks, TrainState
from graft.training.tracking import NotebookTable, Tracker, check_available, join_hooks
from graft.utils import distributed, outputs
from graft.utils.files import atomic_write, write_json
from graft.utils.memory import out_of_memory_hint
from graft.utils.progress import in_notebook, progress_seconds
from graft.utils.runtime import Runtime, autocast_dtype, resolve_device, seed_everything
from graft.utils.timings import IMPORTED_AT, Timings

__all__ = ["fit", "fit_probe_head"]


def fit(config: FitConfig | dict | str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
        hooks: Hooks | None = None, verbose: bool = True, splits: DatasetSplits | None = None, **fields) -> FitResult:
    """Trains a classifier as ``config`` says and writes a run folder (see the README for its files).

    ``graft.fit("pets/", backbone="resnet50.a1_in1k", epochs=5, output="runs/pets")`` in a notebook: every config
    field by its name (or dotted, ``**{"train.lr": 0.01}``), checked as the CLI checks its flags.

    Args:
        config: a FitConfig (used as it is), a dict of dotted or nested keys, or the data folder.
        **fields: config fields by name, applied over ``config``.
        resume: continue the run in ``config.output`` from its last checkpoint (its saved config is used).
        overwrite: replace a non-empty output folder (never one another fit is writing to).
        splits: pre-discovered data (skips ``discover``); the scan still runs.

    Raises:
        KeyboardInterrupt: after Ctrl-C, with the last checkpoint on disk (``--resume`` continues from it).
    """
    # from graft's import: a command's start-up (imports, argument parsing); a notebook's would be its idle time
    timings = Timings(None if in_notebook() else IMPORTED_AT)
    config = config_from_arguments(config, fields)
    run_dir = Path(config.output)
    if resume and not (run_dir / "graft.json").is_file():
        raise GraftError(f"{run_dir}: nothing to resume (no graft.json); start the run without --resume")
    progress_seconds()  # a bad GRAFT_PROGRESS_SECONDS fails now, not after the scan
    check_available(config.log)  # a tracker's missing package fails before anything is written
    semi.check_unlabeled(config)
    if not resume:  # a resumed run's backbone is the saved config's, checked once that is read
        _check_backbone(config)
        timings.lap("model")
    outputs.check_output(run_dir, "-o", ((config.data.path, "data"), (cache_folder(config.data.cache_dir),
                                                                       "feature cache")))
    distributed.init_from_env(config.train.device)
    with _claimed(run_dir, resume, overwrite), out_of_memory_hint(config.data.batch_size):
        return _fit_locked(config, run_dir, resume, hooks or Hooks(), verbose, splits, timings)


@contextlib.contextmanager
def _claimed(run_dir: Path, resume: bool, overwrite: bool):
    """The run lock and a prepared run folder. Under torchrun only rank 0 takes the lock and writes files; the others
    wait until it holds the folder, and fail with rank 0's message when it cannot (locked, not empty...)."""
    with contextlib.ExitStack() as stack:
        def claim() -> None:
            stack.enter_context(run_lock(run_dir))
            prepare_run_dir(run_dir, resume, overwrite)

        distributed.main_decides(claim)
        yield


def _fit_locked(config: FitConfig, run_dir: Path, resume: bool, hooks: Hooks, verbose: bool,
                splits: DatasetSplits | None, timings: Timings) -> FitResult:
    if resume:
        config = resumable_config(run_dir, config, verbose)
        check_available(config.log)
        _check_backbone(config)
    auto_report = None
    if config.train.strategy == "auto":  # label sets first: advise ranks single-label probes
        splits = splits or _discovered(config)
        if splits.multi_label:
            config = apply_overrides(copy.deepcopy(config), {"train.strategy": "probe"}, "multi-label data")
    if config.train.strategy == "auto":
        config, auto_report = auto.resolve(config, (lambda message: print(message, file=sys.stderr)) if verbose
                                           else None)
        timings.lap("advise")
    device = resolve_device(config.train.device)
    runtime = Runtime(device, autocast_dtype(device, config.train.precision), config.train.channels_last,
                      rank=distributed.rank(), world_size=distributed.world_size(), verbose=verbose, timings=timings)
    seed_everything(config.train.seed)
    splits = splits or _discovered(config)
    if splits.multi_label:
        multilabel.check_supported(config, splits, resume, runtime)
    elif config.train.loss != "bce":
        raise GraftError(f"--loss {config.train.loss} is for multi-label data (label sets; single labels train with "
                         "cross-entropy); drop it, or pass --multi-label with a CSV of label sets")
    splits, exclusions = exclude_listed(config, splits, run_dir, resume, runtime)
    if splits.shards is not None:
        config = _fit_for_shards(config, runtime)
    if resume:
        check_same_classes(run_dir, splits, config.data.path)
    report = scan(splits, config.data.max_image_pixels, workers=4, limit=config.data.scan_all_up_to,
                  seed=config.train.seed, log=runtime.log if runtime.verbose and runtime.is_main else None)
    _write_data_report(run_dir, splits, report, runtime)
    pool = semi.pool_paths(config, splits, runtime) if config.data.unlabeled else None
    timings.lap("scan")
    if splits.multi_label:
        return multilabel.fit_label_sets(config, splits, runtime, run_dir)
    if config.train.lr == "auto":
        config = _with_found_lr(config, splits, runtime, run_dir)
        timings.lap("lr-find")
    seed_everything(config.train.seed)  # the head's initialisation depends on the seed alone
    model, card = _prepare_model(config, splits, runtime, run_dir, exclusions)
    state, resume_from = TrainState(), None
    if resume:
        model_state, optimizer_state, scheduler_state, state = read_checkpoint(run_dir)
        try:
            model.load_state_dict(model_state)
        except RuntimeError as error:  # a checkpoint from another run copied in, or an edited graft.json
            reason = str(error).splitlines()[0][:150]
            raise GraftError(f"{run_dir / CHECKPOINT}: does not match the run's model ({reason}); restart with "
                             "--overwrite") from None
        resume_from = (optimizer_state, scheduler_state)
        _check_world_size(run_dir, state, runtime)
        where = f" step {state.epoch_progress['step']} of epoch {state.epoch + 1}" if state.epoch_progress else \
            f" epoch {state.epoch}"
        runtime.log(f"resuming after{where} (stage {state.stage}, epoch {state.stage_epoch})")
    state.world_size = runtime.world_size
    if not resume:
        state.micro_batches = config.train.accumulate
        state.overhead = auto.overhead(auto_report, config)
    _log_global_batch(config, runtime)
    cached = None
    loaders = create_loaders(splits, model, config, runtime)
    timings.lap("model")
    if recipes.solves_head(config) and state.epoch == 0 and not state.epoch_progress:
        start = time.perf_counter()
        cached = fit_probe_head(model, splits, config, runtime, run_dir)
        if pool is not None:
            cached.stats["semi_supervised"] = semi.self_train_probe(model, cached, pool, config, runtime)
        if config.train.strategy == "finetune":
            state.probe = selection.probe_candidate(model, loaders[1], runtime, run_dir, config)
            timings.lap("evaluation")
        state.elapsed += time.perf_counter() - start
        if state.probe:
            state.probe["seconds"] = round(time.perf_counter() - start, 2)
    return _train_tracked(model, card, splits, state, resume_from, loaders, config, runtime, run_dir, hooks, cached,
                          auto_report)


def _train_tracked(model: GraftModel, card: dict, splits: DatasetSplits, state: TrainState, resume_from, loaders,
                   config: FitConfig, runtime: Runtime, run_dir: Path, hooks: Hooks, cached: FeatureSet | None,
                   auto_report: dict | None) -> FitResult:
    """The stages, the probe-vs-fine-tune choice and the final evaluation, with the --log trackers (rank 0 only) fed
    from the hooks; a tracker is closed however the run ends (MLflow's status FAILED or KILLED when it did not
    finish)."""
    names = check_available(config.log) if runtime.is_main else ()
    tracker = Tracker(names, run_dir, config, state.history, runtime.log) if names else None
    if tracker:
        hooks = join_hooks(hooks, tracker.hooks())
    if runtime.verbose and runtime.is_main and in_notebook():
        hooks = join_hooks(hooks, NotebookTable().hooks())
    try:
        state = run_stages(model, state, resume_from, loaders, config, runtime, run_dir, hooks)
        if recipes.plan(config):  # a solved probe has no epochs: its time is extraction and solve
            runtime.timings.lap("training")
        chosen = selection.keep_better(model, state, loaders[1], runtime, run_dir, config)
        result = finish_run(run_dir, model, card, splits, state, config, runtime, loaders, cached, chosen, auto_report)
        if hooks.on_fit_end:
            hooks.on_fit_end(result)
    except BaseException as error:
        if tracker:
            tracker.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if tracker:
        tracker.close()
    return result


def _discovered(config: FitConfig) -> DatasetSplits:
    """The run's data; a CSV's label sets (``--multi-label``, or ';' in a label) make it multi-label."""
    return discover(config.data.path, config.data.val_fraction, config.train.seed, config.data.test_fraction,
                    config.data.image_column, config.data.label_column,
                    labels="multi" if config.data.multi_label else "auto")


def _fit_for_shards(config: FitConfig, runtime: Runtime) -> FitConfig:
    """Tar shards stream: the head is trained by epochs over the stream (the cached L-BFGS probe reads image files by
    path, which shards do not have; scratch's normalisation statistics come from a sample of the stream)."""
    if recipes.solves_head(config):
        runtime.log("tar shards: the head trains by epochs over the stream (--head-fit epochs; the cached probe "
                    "reads image files)")
        config = apply_overrides(copy.deepcopy(config), {"train.head_fit": "epochs"})
    return config


def _check_world_size(run_dir: Path, state: TrainState, runtime: Runtime) -> None:
    """A resumed run keeps its global batch, and so its processes: the learning rate was chosen for that batch and the
    sampler's shares (and a mid-epoch position) depend on the count."""
    if state.world_size != runtime.world_size:
        raise GraftError(f"{run_dir}: the run trained on {state.world_size} process(es) and this resume has "
                         f"{runtime.world_size}; resume it with torchrun --nproc-per-node (x --nnodes) = "
                         f"{state.world_size} processes, or start again with --overwrite")


def _log_global_batch(config: FitConfig, runtime: Runtime) -> None:
    """graft applies --lr as given (no linear scaling rule): the global batch is said, so a change is visible."""
    if runtime.world_size > 1 or config.train.accumulate > 1:
        runtime.log(f"global batch {config.data.batch_size * config.train.accumulate * runtime.world_size} = "
                    f"--batch-size {config.data.batch_size} x --accumulate {config.train.accumulate} x "
                    f"{runtime.world_size} process(es); --lr applies to it as given")


def _check_backbone(config: FitConfig) -> None:
    """Builds the backbone once, before anything is scanned or written: an unknown name, weights missing offline or a
    weights file that does not fit fail in a second, leaving nothing behind that blocks the retry.

    The network is built again after the scan (that one is seeded); building it twice costs far less than a scan.
    """
    pretrained = recipes.starts_pretrained(config)
    create_backbone(backbone_name(config.model), pretrained=pretrained,
                    weights_file=config.model.weights if pretrained else None)


def _prepare_model(config: FitConfig, splits: DatasetSplits, runtime: Runtime, run_dir: Path,
                   exclusions: dict | None = None):
    """Builds the model on its device and writes graft.json (status: training, and what --exclude changed); returns
    (model, card).

    A network trained from scratch is normalised with the training data's own per-channel statistics (there are no
    pretrained ones to match).
    """
    model, info = create_on_device(config, splits, runtime)
    card = model_card(model, config, info)
    card["status"] = "training"
    if exclusions is not None:
        card["exclusions"] = exclusions
    if runtime.is_main:
        write_json(run_dir / "graft.json", card)
    runtime.log(f"{config.model.backbone} ({info['weights']}) cut at {info['cut_at']}: {info['feature_dim']} features"
                f" → {len(splits.classes)} classes; {len(splits.train)} train / {len(splits.val)} val images on "
                f"{runtime.device}; batch-norm statistics {'frozen' if model.freeze_bn_stats else 'updated'} when "
                "unfrozen")
    return model, card


def _with_found_lr(config: FitConfig, splits: DatasetSplits, runtime: Runtime, run_dir: Path) -> FitConfig:
    """``--lr auto``: runs the finder, saves its curve (lr_find.png/.csv) and returns the config with that rate."""
    finding = find_lr(config, splits, runtime)
    if runtime.is_main:
        save_lr_finding(finding, run_dir)
    runtime.log(f"lr-find: --lr {finding.suggestion:.2e} ({finding.reason})")
    if finding.warning:
        runtime.log(f"warning: lr-find: {finding.warning}")
    found = apply_overrides(copy.deepcopy(config), {"train.lr": float(f"{finding.suggestion:.3g}")})
    check_ranges(found)  # a finder that only saw the loss explode must not start a run at an absurd rate
    return found


def _write_data_report(run_dir: Path, splits: DatasetSplits, report, runtime: Runtime) -> None:
    if not runtime.is_main:
        return
    write_json(run_dir / "data_report.json", {"classes": splits.classes, "source": splits.source, **report.to_dict()})
    # surrogateescape: a file name that is not UTF-8 is written back as the bytes it has on disk
    atomic_write(run_dir / "skipped_files.txt", lambda temp: Path(temp).write_text(
        report.skipped_text(), encoding="utf-8", errors="surrogateescape"))
    for warning in report.warnings:
        runtime.log(f"warning: {warning}")
