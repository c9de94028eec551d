"""Running a recipe's stages: epochs, early stopping, time budgets, best-epoch restore, NaN roll-back."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from graft.config import FitConfig
from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.models.run_folder import (
    non_finite_tensors,
)
from graft.training import recipes
from graft.training.checkpoints import BEST, read_checkpoint, save_checkpoint, write_history
from graft.training.loop import NonFiniteLoss, create_mixup, epoch_line, train_epoch, validate
from graft.training.optim import create_optimizer, create_scheduler
from graft.training.resume import MidEpochCheckpoints, restore_rng
from graft.training.setup import loss_class_weights, wrap_for_training
from graft.training.state import Hooks, TrainState
from graft.utils import distributed
from graft.utils.files import save_weights
from graft.utils.progress import Progress
from graft.utils.runtime import Runtime, epoch_seed, seed_everything
from graft.utils.safefiles import read_safetensors

__all__ = ["beats_probe", "run_stage", "stage_length", "run_stages"]


def run_stage(model, stage: recipes.Stage, state: TrainState, loaders, config: FitConfig, runtime: Runtime,
              run_dir: Path, hooks: Hooks, resume_from: tuple | None = None) -> None:
    """Trains one stage epoch by epoch, checkpointing before the first and after each; stops early when val loss
    stalls; a non-finite loss rolls back to the last checkpoint and retries once at half the learning rate."""
    train_loader, val_loader, generator = loaders
    groups = recipes.configure(model, stage, config.train)
    optimizer = create_optimizer(groups, config)
    steps_per_epoch = min(len(train_loader), config.train.limit_batches or len(train_loader))
    scheduler = create_scheduler(optimizer, stage_length(stage, state) * steps_per_epoch,
                               config.train.warmup_fraction, state)
    if resume_from is not None:
        optimizer.load_state_dict(resume_from[0])
        scheduler.load_state_dict(resume_from[1])
    if hooks.on_stage_start and state.stage_epoch == 0 and not state.epoch_progress:
        hooks.on_stage_start(stage, model)
    trained = wrap_for_training(model, runtime, config.train.compile)  # after configure: DDP syncs what it trains
    mid_epoch = MidEpochCheckpoints(config.train, run_dir, model, optimizer, scheduler, state, runtime)
    if state.stage_epoch == 0 and runtime.is_main:  # Ctrl-C or a blow-up in the first epoch can return here
        save_checkpoint(run_dir, model, optimizer, scheduler, state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runtime.log(f"stage {stage.name}: {stage.epochs} epochs, lr {stage.lr:.2e}, {trainable:,} trainable parameters")
    class_weights = loss_class_weights(train_loader.dataset, len(model.classes), config, runtime.device)
    mixup = create_mixup(config.train.mixup, config.train.cutmix, len(model.classes), config.train.label_smoothing)
    while state.stage_epoch < stage_length(stage, state) and not state.stage_done:
        seed = epoch_seed(config.train.seed, state.epoch)
        seed_everything(seed)
        generator.manual_seed(seed)
        resume_at = state.epoch_progress or None
        if resume_at:  # a mid-epoch checkpoint: the RNGs and the sampler continue where it was written
            restore_rng(resume_at["rng"], runtime.rank)
        if hasattr(train_loader.sampler, "set_epoch"):
            skip = resume_at["step"] * train_loader.batch_size if resume_at else 0
            train_loader.sampler.set_epoch(state.epoch, skip)
        start = time.perf_counter()
        try:
            with Progress(f"{stage.name} {state.stage_epoch + 1}/{stage_length(stage, state)}",
                          len(train_loader.dataset), "images", runtime.log, runtime.verbose and runtime.is_main,
                          " in the epoch") as progress:
                row = train_epoch(trained, train_loader, optimizer, scheduler, runtime, config.train.label_smoothing,
                                  config.train.limit_batches, hooks, progress, class_weights, state.micro_batches,
                                  mixup, resume_at, mid_epoch.after_step if mid_epoch.enabled else None)
            distributed.broadcast_buffers(model)  # one set of BN statistics to validate and save
            row.update(validate(model, val_loader, runtime, config.train.limit_batches))
            _check_epoch_finite(model, row, len(val_loader.dataset), optimizer)
        except NonFiniteLoss as blowup:
            _roll_back_after_blowup(blowup, model, optimizer, scheduler, state, run_dir, runtime)
            continue
        state.micro_batches = row["micro_batches"]
        state.epoch_progress = {}
        state.stage_epoch += 1
        state.epoch += 1
        state.elapsed += time.perf_counter() - start
        row = {"epoch": state.epoch, "stage": stage.name, "stage_epoch": state.stage_epoch,
               "lr": optimizer.param_groups[0]["lr"], **row, "seconds": round(time.perf_counter() - start, 3)}
        _track_best(model, state, row, config.train.patience, run_dir, runtime)
        _stop_below_probe(state, row, config.train.probe_patience, runtime)
        state.history.append(row)
        if config.train.time_budget or state.overhead:
            seconds = statistics.median(r["seconds"] for r in state.history if r["stage"] == stage.name)
            _fit_to_budget(stage, state, seconds, _budget(stage, state, seconds, config), scheduler, steps_per_epoch,
                           runtime)
        if runtime.is_main:
            write_history(run_dir, state.history)
            save_checkpoint(run_dir, model, optimizer, scheduler, state)
        runtime.log(epoch_line(row))
        if hooks.on_learning_rates:
            hooks.on_learning_rates(state.epoch, {group.get("name", str(index)): group["lr"] for index, group
                                                  in enumerate(optimizer.param_groups)
                                                  if not str(group.get("name", "")).endswith(".no_decay")})
        if hooks.on_epoch_end:
            hooks.on_epoch_end(row)
    _restore_best(model, state, run_dir, runtime)


def stage_length(stage: recipes.Stage, state: TrainState) -> int:
    """The stage's epochs: as configured, or as a time-budget re-plan shortened them."""
    return state.planned_epochs or stage.epochs


def _budget(stage: recipes.Stage, state: TrainState, epoch_seconds: float, config: FitConfig) -> float:
    """``--time-budget``; for auto's fine-tune without one, what the default fine-tune would spend (the probe, then
    every planned epoch at this epoch time) less what advise spent first: auto never costs more than not using it."""
    if config.train.time_budget or not state.overhead:
        return config.train.time_budget
    return (state.probe or {}).get("seconds", 0.0) + stage.epochs * epoch_seconds - state.overhead


def _fit_to_budget(stage: recipes.Stage, state: TrainState, epoch_seconds: float, budget: float, scheduler,
                   steps_per_epoch: int, runtime: Runtime) -> None:
    """After each epoch: how many of this stage's epochs still fit in the run's time budget at the median epoch time
    so far (one slow epoch does not cut the run short); the cosine schedule is re-planned to end there (annealed,
    not cut off mid-way)."""
    left = budget - state.elapsed
    fits = state.stage_epoch + max(0, int(left // max(epoch_seconds, 1e-6)))
    current = stage_length(stage, state)
    if state.stage_epoch >= current:
        return  # the plan is complete and the rate has annealed to zero: extending now would raise it again
    planned = max(state.stage_epoch, min(stage.epochs, fits))
    if planned != current:
        state.planned_epochs = planned
        scheduler.horizon["steps"] = planned * steps_per_epoch
        runtime.log(f"time budget: {left:.0f}s left at {epoch_seconds:.1f}s an epoch → stage {stage.name} ends "
                    f"after epoch {planned}")


def _check_epoch_finite(model: GraftModel, row: dict, val_images: int, optimizer) -> None:
    """The last step of an epoch can leave NaN weights with no loss computed after it: checked before the epoch's
    checkpoint is written, so every checkpoint a roll-back returns to is finite.

    Raises:
        NonFiniteLoss: for non-finite weights, or a non-finite validation loss (with validation images).
    """
    lr = optimizer.param_groups[0]["lr"]
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise NonFiniteLoss(math.nan, -1, lr, [], what=f"weights ({', '.join(bad[:3])})")
    if val_images and not math.isfinite(row["val_loss"]):
        raise NonFiniteLoss(row["val_loss"], -1, lr, [], what="validation loss")


def _roll_back_after_blowup(blowup: NonFiniteLoss, model, optimizer, scheduler, state: TrainState, run_dir: Path,
                            runtime: Runtime) -> None:
    """Restores the last checkpoint (model, optimiser, schedule, state) and halves the learning rate, once a stage."""
    files = ", ".join(blowup.files[:4]) + (f" (+{len(blowup.files) - 4} more)" if len(blowup.files) > 4 else "")
    where = f"epoch {state.epoch + 1}, step {blowup.step}, lr {blowup.lr:.2e}; batch: {files or 'unknown files'}"
    if blowup.step < 0:  # found after the epoch: no one batch to blame
        where = f"after epoch {state.epoch + 1}, lr {blowup.lr:.2e}"
    if state.lr_scale < 1.0:
        raise GraftError(f"the {blowup.what} became {blowup.value} again at half the learning rate ({where}); the run "
                         "is not complete: lower --lr, check those images, or train in --precision fp32")
    runtime.log(f"warning: the {blowup.what} became {blowup.value} ({where}); restoring the last checkpoint and "
                "retrying at half the learning rate")
    model_state, optimizer_state, scheduler_state, saved = read_checkpoint(run_dir)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    vars(state).update(vars(saved))  # the scheduler's factor reads state.lr_scale
    state.lr_scale = 0.5
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # the next step already runs at the halved rate


def _track_best(model, state: TrainState, row: dict, patience: int, run_dir: Path, runtime: Runtime) -> None:
    loss = row["val_loss"]
    if not math.isnan(loss) and loss < state.best_val_loss:
        state.best_val_loss, state.bad_epochs = loss, 0
        row["best"] = True
        if patience and runtime.is_main:
            save_weights(run_dir / BEST, model)
    else:
        state.bad_epochs += 1
        row["best"] = False
        if patience and state.bad_epochs >= patience:
            state.stage_done = True  # early stop


def beats_probe(row: dict, probe: dict) -> bool:
    """Whether an epoch's validation score beats the probe's: higher accuracy, or equal accuracy and lower loss."""
    return (row["val_acc"], -row["val_loss"]) > (probe["val_acc"], -probe["val_loss"])


def _stop_below_probe(state: TrainState, row: dict, patience: int, runtime: Runtime) -> None:
    """``probe_patience``: fine-tuning continues while it beats the probe (candidate epoch 0) on val or is still
    climbing toward it (a val accuracy above every earlier epoch of the stage); ``patience`` epochs in a row that do
    neither end the stage (the probe is kept unless an epoch won). The first epochs after the warm-up often dip below
    the probe they started from and then pass it (flowers5: 0.720, then 0.749 against 0.737): a rule that looked
    only at the probe stopped there and gave up a 4-point win."""
    row["beats_probe"] = bool(state.probe) and beats_probe(row, state.probe)
    if not patience or not state.probe:
        return
    rows = [r for r in state.history if r["stage"] == row["stage"]] + [row]
    progress = [r.get("beats_probe") or (i > 0 and r["val_acc"] > max(e["val_acc"] for e in rows[:i]))
                for i, r in enumerate(rows)]
    if len(progress) >= patience and not any(progress[-patience:]):
        state.stage_done = True
        runtime.log(f"fine-tuning has neither beaten the probe's val accuracy {state.probe['val_acc']:.4f} nor "
                    f"improved on its own best for {patience} epoch(s): stopping")


def _restore_best(model, state: TrainState, run_dir: Path, runtime: Runtime) -> None:
    """With early stopping on, the stage ends on its best-val-loss weights (Keras' restore_best_weights)."""
    best = run_dir / BEST
    last_was_best = state.history and state.history[-1].get("best")
    if best.is_file() and not last_was_best:
        model.load_state_dict(read_safetensors(best, "delete it and train the run again (--overwrite)")[0])
        runtime.log(f"restored the weights of the stage's best epoch (val loss {state.best_val_loss:.4f})")
    best.unlink(missing_ok=True)


def run_stages(model, state: TrainState, resume_from, loaders, config: FitConfig, runtime: Runtime, run_dir: Path,
               hooks: Hooks) -> TrainState:
    """Runs the recipe's remaining stages from ``state``; Ctrl-C leaves the last finished epoch's checkpoint."""
    stages = recipes.plan(config)
    try:
        while state.stage < len(stages):
            stage = stages[state.stage]
            if state.stage_done or state.stage_epoch >= stage_length(stage, state):
                _restore_best(model, state, run_dir, runtime)  # a no-op unless the run stopped right at the boundary
                state = TrainState(stage=state.stage + 1, epoch=state.epoch, elapsed=state.elapsed,
                                   micro_batches=state.micro_batches, history=state.history, probe=state.probe,
                                   world_size=state.world_size, overhead=state.overhead)  # planned_epochs: 0
                if config.train.time_budget and state.elapsed >= config.train.time_budget:
                    state.stage = len(stages)  # out of time: the remaining stages are skipped
                    runtime.log("time budget spent: remaining stages skipped")
                resume_from = None
                continue
            run_stage(model, stage, state, loaders, config, runtime, run_dir, hooks,
                      resume_from if state.stage_epoch or state.epoch_progress else None)
            resume_from = None
    except KeyboardInterrupt:
        runtime.log(f"interrupted: the last finished epoch is saved; continue with `graft fit --resume -o {run_dir}`")
        raise
    return state
