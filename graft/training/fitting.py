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

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from graft.config import FitConfig, apply_overrides, check_ranges
from graft.data.datasets import ImageDataset, loader_options
from graft.data.discovery import DatasetSplits, discover
from graft.data.scan import scan
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.evaluation.inference import predict_logits
from graft.evaluation.metrics import classification_metrics
from graft.models.backbones.registry import create_backbone
from graft.models.grafted import GraftModel, backbone_name
from graft.models.heads import divide_logits
from graft.models.run_folder import (
    model_card,
    non_finite_tensors,
    save_model,
)
from graft.probing.cache import cache_folder
from graft.probing.extraction import FeatureSet, extract_features
from graft.probing.linear import fit_linear_probe, fit_temperature
from graft.training import auto, multilabel, recipes, selection, semi
from graft.training.arguments import config_from_arguments
from graft.training.checkpoints import (
    CHECKPOINT,
    check_same_classes,
    prepare_run_dir,
    read_checkpoint,
    resumable_config,
    run_lock,
    write_history,
)
from graft.training.excluding import exclude_listed
from graft.training.lr_find import find_lr, save_lr_finding
from graft.training.precise_bn import precise_bn_after_training
from graft.training.setup import create_loaders, create_on_device
from graft.training.stages import run_stages
from graft.training.state import FitResult, Hooks, TrainState
from graft.training.tracking import NotebookTable, Tracker, check_available, join_hooks
from graft.utils import distributed, outputs
from graft.utils.files import atomic_write, write_csv, write_json
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
        result = _finish(run_dir, model, card, splits, state, config, runtime, loaders, cached, chosen, auto_report)
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


def fit_probe_head(model: GraftModel, splits: DatasetSplits, config: FitConfig, runtime: Runtime,
                   run_dir: Path) -> FeatureSet:
    """The head on the frozen trunk, solved: cached features (under torchrun each rank extracts a share), then
    L-BFGS over an L2 path chosen by k-fold CV on the training features (on val, labelled optimistic, only when a class
    is too small for two folds); on rank 0, its head then broadcast."""
    data = config.data
    sets = extract_features(splits, model.trunk, model.preprocessing, config.model.backbone, data.cache_dir,
                            None, data.workers, runtime.device, data.augment_views, data.hflip, runtime.log,
                            config.train.compile, config.train.extract_engine)
    runtime.timings.lap("extraction")
    features = sets[model.trunk.node]
    # under torchrun every rank extracted its share above; the full-batch L-BFGS solve does not shard, so rank 0
    # solves while the others wait, then they receive its head
    distributed.main_decides(lambda: _solve_probe(model, features, config, runtime, run_dir))
    distributed.broadcast_module(model.head)
    runtime.timings.lap("solve")
    return features


def _solve_probe(model: GraftModel, features: FeatureSet, config: FitConfig, runtime: Runtime, run_dir: Path) -> None:
    train_x = np.concatenate([features.features["train"], *features.augmented])
    train_y = np.concatenate([features.labels["train"]] * (1 + len(features.augmented)))
    result = fit_linear_probe(train_x, train_y, features.features["val"], features.labels["val"], len(model.classes),
                              balanced=config.train.balance != "none", device=runtime.device, log=runtime.log,
                              seed=config.train.seed, calibrate=config.train.calibrate)
    model.head[-1].load_state_dict(result.linear.state_dict())
    if result.selection.startswith("cv-"):
        how = f"by {result.selection[3:]}-fold CV on train (cv accuracy {result.cv_accuracy:.4f})"
    else:
        how = "on val (selected on validation: optimistic)" if result.optimistic else "fixed (nothing to choose on)"
    runtime.log(f"probe: λ={result.l2:.0e} chosen {how}; val accuracy {result.val_accuracy:.4f}")
    if result.temperature != 1.0:
        runtime.log(f"probe: probabilities calibrated by temperature {result.temperature:.3g} fitted on the folds' "
                    f"held-out logits (log-loss {result.cv_loss:.4f} → {result.calibrated_cv_loss:.4f})")
    features.stats["probe_l2"] = result.l2
    features.stats["probe_l2_selection"] = result.selection
    features.stats["probe_temperature"] = round(result.temperature, 6)
    if runtime.is_main:
        columns = ["l2", "C", "train_acc", "train_loss", "cv_acc", "cv_loss", "val_acc", "val_loss", "iterations"]
        write_csv(run_dir / "probe_grid.csv", columns, result.grid)


def _features_logits(model: GraftModel, features: FeatureSet, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.head.parameters()).device
    with torch.no_grad():
        logits = model.head(torch.as_tensor(features.features[split], dtype=torch.float32, device=device))
    return logits.cpu(), torch.as_tensor(features.labels[split])


def _finish(run_dir: Path, model: GraftModel, card: dict, splits: DatasetSplits, state: TrainState,
            config: FitConfig, runtime: Runtime, loaders, cached: FeatureSet | None = None, chosen: dict | None = None,
            auto_report: dict | None = None) -> FitResult:
    """Saves the final model, evaluates it on val (and test) with full metrics, removes the checkpoint.

    With ``cached`` features (the solved probe's), a probe's metrics come from them instead of another forward pass:
    its trunk never changed. ``chosen``: the probe-vs-fine-tune selection; ``auto_report``: what auto tried.
    """
    _refuse_non_finite(run_dir, model)  # before metrics: NaN logits have no meaningful ones
    card["status"] = "complete"
    metrics: dict = {"strategy": config.train.strategy, "epochs": state.epoch,
                     "train_seconds": round(state.elapsed, 2)}
    # early stopping restores the stage's best-val-loss epoch: a choice made on val
    metrics["selected_on_validation"] = ["epoch (best val loss)"] if config.train.patience and state.history else []
    if chosen:
        metrics["selection"] = chosen
        card["kept"] = metrics["kept"] = chosen["kept"]  # the page, report and card say what was saved, not asked
    if auto_report is not None:
        metrics["auto"] = auto.finish_report(auto_report, chosen, state, runtime.log)
    if config.train.precise_bn:
        metrics["precise_bn"] = precise_bn_after_training(model, splits, config, runtime, card)
        _refuse_non_finite(run_dir, model)  # the recomputed statistics too (checked once, not again when saving)
    if cached is not None and "semi_supervised" in cached.stats:  # its own block: what the unlabelled pool did
        card["semi_supervised"] = metrics["semi_supervised"] = cached.stats.pop("semi_supervised")
        if "with_pool_val_acc" in metrics["semi_supervised"]:
            metrics["selected_on_validation"].append("semi-supervised or labelled-only probe (higher val accuracy)")
    if cached is not None:
        metrics["features"] = cached.stats
    if "exclusions" in card:
        metrics["exclusions"] = card["exclusions"]
    if distributed.broadcast_object(cached is not None) and config.train.strategy == "probe":
        for split in ("val", "test"):  # rank 0 holds the features; the others only wait for its files
            if cached is not None and len(cached.labels[split]):
                metrics[split] = classification_metrics(*_features_logits(model, cached, split), model.classes)
        return _save_final(run_dir, model, card, metrics, state, runtime, config.train.timings)
    logits, labels = _gathered_logits(model, loaders[1], runtime)
    if len(labels):
        logits = _calibrate_on_validation(model, logits, labels, metrics, config, runtime)
        metrics["val"] = classification_metrics(logits, labels, model.classes)
    if splits.test:
        test_set = ImageDataset(splits.test, create_transform(model.preprocessing), config.data.max_image_pixels)
        if runtime.distributed:
            test_set = Subset(test_set, runtime.shard_indices(len(test_set)))
        test_loader = DataLoader(test_set, batch_size=config.data.batch_size * 2, shuffle=False,
                                 **loader_options(runtime.device, config.data.workers))
        metrics["test"] = classification_metrics(*_gathered_logits(model, test_loader, runtime), model.classes)
    return _save_final(run_dir, model, card, metrics, state, runtime, config.train.timings)


def _calibrate_on_validation(model: GraftModel, logits: torch.Tensor, labels: torch.Tensor, metrics: dict,
                             config: FitConfig, runtime: Runtime) -> torch.Tensor:
    """An epoch-trained model's temperature, fitted on the validation logits and folded into its head (a kept probe
    was calibrated on its CV folds already). Returns the logits the calibrated model gives."""
    if not config.train.calibrate or metrics.get("kept") == "probe":
        return logits
    temperature = fit_temperature(logits, labels)
    if temperature is None:
        runtime.log("calibration: none (every validation image is right, or none is: a temperature fitted there would "
                    "only claim certainty)")
        return logits
    divide_logits(model.head, temperature)
    metrics["temperature"] = round(temperature, 6)
    metrics["selected_on_validation"].append("temperature (calibration; accuracy unchanged)")
    before, after = (F.cross_entropy(values, labels).item() for values in (logits, logits / temperature))
    runtime.log(f"calibration: temperature {temperature:.3g} fitted on val (val log-loss {before:.4f} → {after:.4f})")
    return logits / temperature


def _label_selections(metrics: dict) -> None:
    """Names everything chosen on validation (which makes the val number optimistic) and the headline: the test
    split's accuracy when there is one, an unbiased estimate; otherwise val's, labelled."""
    chosen = metrics.setdefault("selected_on_validation", [])
    if metrics.get("features", {}).get("probe_l2_selection") == "validation":
        chosen.append("probe L2 (too few images a class for CV)")
    if "selection" in metrics:
        chosen.append("probe or fine-tune (" + metrics["selection"]["rule"].split(";")[0] + ")")
    if "auto" in metrics:
        cut = (metrics["auto"].get("overrides") or {}).get("model.cut_at")
        chosen.append(f"strategy and cut at {cut} (auto)" if cut else "strategy (auto)")
    if "test" in metrics:
        metrics["headline"] = {"split": "test", "accuracy": metrics["test"]["accuracy"],
                               "note": "held out from every choice"}
    elif "val" in metrics:
        note = "selected on validation: optimistic" if chosen else "nothing selected on val"
        metrics["headline"] = {"split": "val", "accuracy": metrics["val"]["accuracy"], "note": note}


def _gathered_logits(model: GraftModel, loader, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``loader``; under torchrun of every process's unpadded share, gathered (each image once;
    the order differs from one process's, which the metrics do not depend on)."""
    logits, labels = predict_logits(model, loader, runtime.device, runtime.dtype, runtime.channels_last)
    if not runtime.distributed:
        return logits, labels
    shares = distributed.all_gather_object((logits, labels))
    return torch.cat([share[0] for share in shares]), torch.cat([share[1] for share in shares])


def _refuse_non_finite(run_dir: Path, model: GraftModel) -> None:
    """Never saves a run as complete with NaN or infinite weights: predict would print blank labels, no error."""
    if non_finite_tensors(model.state_dict()):
        raise GraftError(f"{run_dir}: the trained weights hold NaN or infinite values, so the run is not marked "
                         "complete; train again with a lower --lr (--overwrite)")


def _save_final(run_dir: Path, model: GraftModel, card: dict, metrics: dict, state: TrainState,
                runtime: Runtime, timings: bool = False) -> FitResult:
    """Writes the run's final files (metrics.json last: with ``timings``, the phases' seconds up to it)."""
    _label_selections(metrics)
    runtime.timings.lap("evaluation")
    if runtime.is_main:
        write_history(run_dir, state.history)
        save_model(run_dir, model, card)
        runtime.timings.lap("outputs")
        if timings:
            metrics["timings"] = runtime.timings.to_dict()
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    distributed.barrier()  # every process returns once the run folder is complete
    distributed.write_rank_digest(model)
    if "headline" in metrics:
        headline = metrics["headline"]
        val = (f"; val accuracy {metrics['val']['accuracy']:.4f}" if headline["split"] == "test" and "val" in metrics
               else "")
        runtime.log(f"done: {headline['split']} accuracy {headline['accuracy']:.4f} ({headline['note']}){val} in "
                    f"{state.elapsed:.1f}s → {run_dir}")
    if timings:
        runtime.log(runtime.timings.line())
    return FitResult(run_dir, model.eval(), metrics, list(state.history))
