"""The training loop: ``fit`` → ``run_stage`` → ``train_epoch`` / ``validate``, with atomic per-epoch checkpoints.

Reproducibility: every epoch reseeds all RNGs from (seed, epoch), so an interrupted run resumed from its last
checkpoint follows exactly the path of an uninterrupted one. Distributed training (torchrun) slots in through
``Runtime``: rank-0-only logging and saving, and ``make_sampler``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, WeightedRandomSampler

from graft import outputs, recipes
from graft.batchnorm import batch_norms, recompute_statistics
from graft.compare import resolve_auto
from graft.diagnose import dataset_statistics, lr_sweep, plot_lr_finding
from graft.config import BN_AUTO_FROZEN_BELOW, FitConfig, apply_overrides, check_ranges
from graft.data import DatasetSplits, ImageDataset, build_transform, discover, resolve_workers, scan
from graft.errors import GraftError
from graft.evaluate import autocast, autocast_dtype, classification_metrics, predict_logits, resolve_device, to_device
from graft.features import FeatureSet, cache_folder, extract_features
from graft.model import (
    GraftModel, atomic_write, build_model, check_finite, config_from_card, load, model_card, non_finite_tensors,
    read_card, save_model, save_weights, write_json,
)
from graft.memory import out_of_memory_hint
from graft.probe import fit_linear_probe
from graft.safefiles import read_safetensors
from graft.text import display_name

CHECKPOINT = "checkpoint.safetensors"
SCRATCH_STATS_SIZE = 32  # per-channel statistics barely depend on resolution; small is fast
SCRATCH_STATS_IMAGES = 2000
BEST = "best.safetensors"


@dataclass
class Hooks:
    """Named hook points (not a callback framework): each is called with plain values if set."""

    on_stage_start: Callable[[recipes.Stage, GraftModel], None] | None = None
    on_batch_end: Callable[[int, float], None] | None = None  # (step in epoch, loss)
    on_epoch_end: Callable[[dict], None] | None = None  # the history row just written


@dataclass
class Runtime:
    """Where and how the loop runs. The seam for distributed training: rank/world size, sampler, who logs."""

    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    verbose: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.verbose and self.is_main:
            print(message, file=sys.stderr, flush=True)

    def make_sampler(self, dataset, shuffle: bool, seed: int):
        """None on one process (the DataLoader shuffles); a DistributedSampler under torchrun (a later issue)."""
        return None


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    stage: int = 0  # index into recipes.plan(...)
    stage_epoch: int = 0  # epochs completed in this stage
    epoch: int = 0  # epochs completed overall
    best_val_loss: float = math.inf  # within the current stage
    bad_epochs: int = 0  # epochs since the stage's best
    stage_done: bool = False
    elapsed: float = 0.0  # seconds of training so far, across resumes
    lr_scale: float = 1.0  # 0.5 after a non-finite loss was retried in this stage
    micro_batches: int = 1  # > 1 after an out-of-memory error: each batch runs in this many slices
    planned_epochs: int = 0  # this stage's epochs after a time-budget re-plan (0: as configured)
    history: list[dict] = field(default_factory=list)


@dataclass
class FitResult:
    run_dir: Path
    model: GraftModel
    metrics: dict


# -------------------------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


# ------------------------------------------------------------------------------------------------------------ one epoch


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; carries what a person needs to find the cause."""

    def __init__(self, value: float, step: int, lr: float, files: list[str], what: str = "loss"):
        super().__init__(f"{what} {value} at step {step}")
        self.value, self.step, self.lr, self.files, self.what = value, step, lr, files, what


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)


def _train_step(model, images, labels, optimizer, scaler, runtime: Runtime, loss_options: dict,
                micro_batches: int) -> tuple[float, int, torch.Tensor]:
    """One optimiser step over ``micro_batches`` slices of the batch (gradient accumulation keeps the effective
    batch); returns (summed loss, correct predictions, the loss of the last slice)."""
    optimizer.zero_grad(set_to_none=True)
    total_loss, correct = 0.0, 0
    for part_images, part_labels in zip(images.chunk(micro_batches), labels.chunk(micro_batches)):
        with autocast(runtime.device, runtime.dtype):
            logits = model(part_images)
            loss = compute_loss(logits, part_labels, **loss_options)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(loss.item(), 0, optimizer.param_groups[0]["lr"], [])
        scaler.scale(loss * (part_labels.numel() / labels.numel())).backward()
        total_loss += loss.item() * part_labels.numel()
        correct += (logits.argmax(1) == part_labels).sum().item()
    scaler.step(optimizer)
    scaler.update()
    return total_loss, correct, loss


def _after_out_of_memory(micro_batches: int, batch: int, optimizer, runtime: Runtime) -> int:
    """Halves the micro-batch after an out-of-memory error, or gives up with what to do at one image per slice."""
    optimizer.zero_grad(set_to_none=True)
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    if micro_batches >= batch:
        raise GraftError("out of memory even at one image per step; use a smaller --image-size or backbone, or free "
                         "the device's memory") from None
    micro_batches *= 2
    runtime.log(f"warning: out of memory at batch size {batch}; continuing with {micro_batches} micro-batches of "
                f"~{math.ceil(batch / micro_batches)} (gradient accumulation keeps the effective batch)")
    return micro_batches


def train_epoch(model: GraftModel, loader, optimizer, scheduler, runtime: Runtime, label_smoothing: float = 0.0,
                limit_batches: int = 0, hooks: Hooks | None = None, progress=None,
                class_weights: torch.Tensor | None = None, micro_batches: int = 1) -> dict:
    """One pass over ``loader``; returns mean loss, accuracy, images/s and the micro-batch count in use.

    Raises:
        NonFiniteLoss: naming the batch's files (when the dataset yields indices) and the learning rate.
    """
    model.train()
    scaler = torch.amp.GradScaler(enabled=runtime.dtype == torch.float16)
    loss_options = {"label_smoothing": label_smoothing, "class_weights": class_weights}
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for step, (images, labels, *indices) in enumerate(loader):
        if limit_batches and step >= limit_batches:
            break
        images = to_device(images, runtime.device, runtime.channels_last)
        labels = labels.to(runtime.device, non_blocking=True)
        while True:
            try:
                batch_loss, batch_correct, loss = _train_step(model, images, labels, optimizer, scaler, runtime,
                                                              loss_options, micro_batches)
                break
            except torch.cuda.OutOfMemoryError:
                micro_batches = _after_out_of_memory(micro_batches, labels.numel(), optimizer, runtime)
            except NonFiniteLoss as blowup:
                files = [loader.dataset.samples[i][0] for i in indices[0].tolist()] if indices else []
                raise NonFiniteLoss(blowup.value, step, blowup.lr, files) from None
        scheduler.step()
        total_loss += batch_loss
        correct += batch_correct
        seen += labels.numel()
        if hooks and hooks.on_batch_end:
            hooks.on_batch_end(step, loss.item())
        if progress is not None:
            progress(seen, total_loss / seen, correct / seen, seen / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(1, seen), "train_acc": correct / max(1, seen),
            "images_per_s": seen / max(seconds, 1e-9), "micro_batches": micro_batches}


def validate(model: GraftModel, loader, runtime: Runtime, limit_batches: int = 0) -> dict:
    logits, labels = predict_logits(model, loader, runtime.device, runtime.dtype, runtime.channels_last, limit_batches)
    if not len(labels):
        return {"val_loss": math.nan, "val_acc": math.nan}
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_acc": (logits.argmax(1) == labels).float().mean().item()}


# ------------------------------------------------------------------------------------------------------------- schedule


def make_optimizer(groups: list[dict], config: FitConfig) -> torch.optim.Optimizer:
    train = config.train
    factories = {
        "adamw": lambda: torch.optim.AdamW(groups, lr=train.lr),
        "sgd": lambda: torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=True),
    }
    return factories[train.optimizer]()


def make_scheduler(optimizer, total_steps: int, warmup_fraction: float, state: TrainState | None = None):
    """Linear warm-up, then cosine decay to zero, stepped per batch, times ``state.lr_scale`` (halved after a
    non-finite loss)."""
    horizon = {"steps": total_steps}  # shortened by a time-budget re-plan

    def factor(step: int) -> float:
        scale = state.lr_scale if state is not None else 1.0
        warmup = int(horizon["steps"] * warmup_fraction)
        if step < warmup:
            return scale * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, horizon["steps"] - warmup)
        return scale * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.horizon = horizon
    return scheduler


# ---------------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, model: GraftModel, optimizer, scheduler, state: TrainState) -> None:
    """Model, optimizer and scheduler state and the TrainState in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict = {}
    for param_id, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    metadata = {
        "graft.state": json.dumps(asdict(state)),
        "graft.optimizer": json.dumps({"param_groups": optimizer_state["param_groups"], "scalars": scalars}),
        "graft.scheduler": json.dumps(scheduler.state_dict()),
    }
    atomic_write(run_dir / CHECKPOINT, lambda temp: save_file(tensors, temp, metadata=metadata))


def read_checkpoint(run_dir: Path) -> tuple[dict, dict, dict, TrainState]:
    """(model state, optimizer state, scheduler state, TrainState) from the run's checkpoint."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise GraftError(f"{run_dir}: no {CHECKPOINT} to resume from; start the run again without --resume")
    tensors, metadata = read_safetensors(path, "the checkpoint is lost: restart with --overwrite")
    if not {"graft.state", "graft.optimizer", "graft.scheduler"} <= set(metadata):
        raise GraftError(f"{path}: damaged checkpoint (no training state inside); restart with --overwrite")
    try:
        return _unpack_checkpoint(tensors, metadata)
    except (KeyError, TypeError, ValueError) as error:  # metadata edited or written by another program
        raise GraftError(f"{path}: damaged checkpoint (bad training state: {error!r:.100}); restart with --overwrite"
                         ) from None


def _unpack_checkpoint(tensors: dict, metadata: dict) -> tuple[dict, dict, dict, TrainState]:
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_meta = json.loads(metadata["graft.optimizer"])
    optimizer_state: dict = {"state": {}, "param_groups": optimizer_meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(param_id), {})[name] = value
    for param_id, values in optimizer_meta["scalars"].items():
        optimizer_state["state"].setdefault(int(param_id), {}).update(values)
    state = TrainState(**json.loads(metadata["graft.state"]))
    return model_state, optimizer_state, json.loads(metadata["graft.scheduler"]), state


# ----------------------------------------------------------------------------------------------------------------- data


def resolve_bn_stats(config: FitConfig, train_images: int) -> str:
    """``auto``: freeze pretrained statistics on small data (batch statistics of a few images are noise) and whenever
    fine-tuning starts from the solved probe (LP-FT): the probe was fitted to features normalised with the
    pretrained statistics, and batch statistics undo it (flowers5, 3,449 images, 8 epochs: 0.677 updating vs 0.776
    frozen, bench/RESULTS.md). A random trunk (scratch, --no-pretrained) has no statistics worth keeping, so it
    always updates them."""
    if config.train.bn_stats != "auto":
        return config.train.bn_stats
    pretrained = config.model.pretrained and config.train.strategy != "scratch"
    small = train_images < BN_AUTO_FROZEN_BELOW
    return "frozen" if pretrained and (small or recipes.solves_head(config)) else "update"


def make_loaders(splits: DatasetSplits, model: GraftModel, config: FitConfig, runtime: Runtime):
    """Training and validation DataLoaders with the backbone's preprocessing."""
    data = config.data
    workers = resolve_workers(data.workers, runtime.device)
    train_set = ImageDataset(splits.train, build_transform(model.preprocessing, True, data.augment, data.hflip),
                             data.max_image_pixels, with_index=True)
    val_set = ImageDataset(splits.val, build_transform(model.preprocessing), data.max_image_pixels)
    common = {"num_workers": workers, "pin_memory": runtime.device.type == "cuda"}
    generator = torch.Generator()
    sampler = runtime.make_sampler(train_set, True, config.train.seed)
    if config.train.balance == "sampler" and sampler is None:
        sampler = balanced_sampler(train_set.samples, generator)
    # Training workers are not persistent: fresh workers each epoch take their seeds from the reseeded generator,
    # which keeps augmentation (and so a resumed run) reproducible.
    train_loader = DataLoader(train_set, batch_size=data.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=generator, drop_last=len(train_set) > data.batch_size, **common)
    val_loader = DataLoader(val_set, batch_size=data.batch_size * 2, shuffle=False, persistent_workers=workers > 0,
                            **common)
    return train_loader, val_loader, generator


def balanced_sampler(samples: list, generator: torch.Generator) -> WeightedRandomSampler:
    """``--balance sampler``: draws every class equally often (with replacement), an epoch still len(samples) long."""
    labels = torch.as_tensor([label for _, label in samples])
    counts = torch.bincount(labels).double()
    return WeightedRandomSampler(1.0 / counts[labels], len(samples), replacement=True, generator=generator)


# ------------------------------------------------------------------------------------------------------------- the loop


def run_stage(model, stage: recipes.Stage, state: TrainState, loaders, config: FitConfig, runtime: Runtime,
              run_dir: Path, hooks: Hooks, resume_from: tuple | None = None) -> None:
    """Trains one stage epoch by epoch, checkpointing before the first and after each; stops early when val loss
    stalls; a non-finite loss rolls back to the last checkpoint and retries once at half the learning rate."""
    train_loader, val_loader, generator = loaders
    groups = recipes.configure(model, stage, config.train)
    optimizer = make_optimizer(groups, config)
    steps_per_epoch = min(len(train_loader), config.train.limit_batches or len(train_loader))
    scheduler = make_scheduler(optimizer, stage_length(stage, state) * steps_per_epoch,
                               config.train.warmup_fraction, state)
    if resume_from is not None:
        optimizer.load_state_dict(resume_from[0])
        scheduler.load_state_dict(resume_from[1])
    if hooks.on_stage_start and state.stage_epoch == 0:
        hooks.on_stage_start(stage, model)
    if state.stage_epoch == 0 and runtime.is_main:  # Ctrl-C or a blow-up in the first epoch can return here
        save_checkpoint(run_dir, model, optimizer, scheduler, state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runtime.log(f"stage {stage.name}: {stage.epochs} epochs, lr {stage.lr:.2e}, {trainable:,} trainable parameters")
    class_weights = _loss_class_weights(train_loader.dataset, len(model.classes), config, runtime.device)
    while state.stage_epoch < stage_length(stage, state) and not state.stage_done:
        seed = epoch_seed(config.train.seed, state.epoch)
        seed_everything(seed)
        generator.manual_seed(seed)
        start = time.perf_counter()
        try:
            with _progress_bar(runtime, f"{stage.name} {state.stage_epoch + 1}/{stage_length(stage, state)}",
                               len(train_loader.dataset)) as progress:
                row = train_epoch(model, train_loader, optimizer, scheduler, runtime, config.train.label_smoothing,
                                  config.train.limit_batches, hooks, progress, class_weights, state.micro_batches)
            row.update(validate(model, val_loader, runtime, config.train.limit_batches))
            _check_epoch_finite(model, row, len(val_loader.dataset), optimizer)
        except NonFiniteLoss as blowup:
            _roll_back_after_blowup(blowup, model, optimizer, scheduler, state, run_dir, runtime)
            continue
        state.micro_batches = row["micro_batches"]
        state.stage_epoch += 1
        state.epoch += 1
        state.elapsed += time.perf_counter() - start
        row = {"epoch": state.epoch, "stage": stage.name, "stage_epoch": state.stage_epoch,
               "lr": optimizer.param_groups[0]["lr"], **row, "seconds": round(time.perf_counter() - start, 3)}
        _track_best(model, state, row, config.train.patience, run_dir, runtime)
        state.history.append(row)
        if config.train.time_budget:
            seconds = statistics.median(r["seconds"] for r in state.history if r["stage"] == stage.name)
            _fit_to_budget(stage, state, seconds, config.train.time_budget, scheduler, steps_per_epoch, runtime)
        if runtime.is_main:
            write_history(run_dir, state.history)
            save_checkpoint(run_dir, model, optimizer, scheduler, state)
        runtime.log(_epoch_line(row))
        if hooks.on_epoch_end:
            hooks.on_epoch_end(row)
    _restore_best(model, state, run_dir, runtime)


def stage_length(stage: recipes.Stage, state: TrainState) -> int:
    """The stage's epochs: as configured, or as a time-budget re-plan shortened them."""
    return state.planned_epochs or stage.epochs


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


def _loss_class_weights(dataset, classes: int, config: FitConfig, device: torch.device) -> torch.Tensor | None:
    """``--balance loss``: inverse-frequency class weights (mean 1 over the images), as scikit-learn's 'balanced'."""
    if config.train.balance != "loss":
        return None
    from graft.probe import class_weights

    return class_weights(torch.as_tensor([label for _, label in dataset.samples]), classes).to(device)


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


def _restore_best(model, state: TrainState, run_dir: Path, runtime: Runtime) -> None:
    """With early stopping on, the stage ends on its best-val-loss weights (Keras' restore_best_weights)."""
    best = run_dir / BEST
    last_was_best = state.history and state.history[-1].get("best")
    if best.is_file() and not last_was_best:
        model.load_state_dict(read_safetensors(best, "delete it and train the run again (--overwrite)")[0])
        runtime.log(f"restored the weights of the stage's best epoch (val loss {state.best_val_loss:.4f})")
    best.unlink(missing_ok=True)


def _epoch_line(row: dict) -> str:
    return (f"epoch {row['epoch']:>3} [{row['stage']}] train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | {row['images_per_s']:.1f} img/s"
            f" | {row['seconds']:.1f}s")


class _progress_bar:
    """A rich progress bar with loss, accuracy and images/s on a terminal; silent elsewhere (logs, CI, tests)."""

    def __init__(self, runtime: Runtime, description: str, total: int):
        self.enabled = runtime.verbose and runtime.is_main and sys.stderr.isatty()
        self.description, self.total = description, total

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=self.total, stats="")
        return self.update

    def update(self, seen: int, loss: float, accuracy: float, speed: float) -> None:
        self.progress.update(self.task, completed=seen, stats=f"loss {loss:.3f} acc {accuracy:.3f} {speed:.0f} img/s")

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()


HISTORY_COLUMNS = ["epoch", "stage", "stage_epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                   "images_per_s", "seconds", "best", "micro_batches"]


def write_history(run_dir: Path, history: list[dict]) -> None:
    _write_csv(run_dir / "history.csv", HISTORY_COLUMNS, history)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


LOCK = ".graft.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Holds an exclusive lock on the run folder while a fit writes to it; the OS drops it if the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise GraftError(f"{run_dir}: another graft fit (pid {owner}) is writing to this folder; wait for it to "
                         "finish, stop it, or choose another -o") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        (run_dir / LOCK).unlink(missing_ok=True)  # while still held: a finished folder carries no lock file
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Checks the run folder (with ``overwrite``, removes graft's own files from it; see ``graft.outputs``) and
    claims it; the caller holds its lock."""
    outputs.remove_temp_files(run_dir)  # atomic_write's .graft-tmp-* files, left only by a kill -9 mid-write
    if not resume and overwrite:
        kept = outputs.replace_own(run_dir, "-o")
        if kept:
            print(f"--overwrite: kept {len(kept)} file(s) graft did not write in {run_dir} (e.g. {kept[0]!r})",
                  file=sys.stderr)
    elif not resume and outputs.entries(run_dir):
        raise GraftError(f"{run_dir}: output folder is not empty; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another -o")
    outputs.claim(run_dir, "-o")


def fit(config: FitConfig, resume: bool = False, overwrite: bool = False, hooks: Hooks | None = None,
        verbose: bool = True, splits: DatasetSplits | None = None) -> FitResult:
    """Trains a classifier as ``config`` says and writes a run folder (see the README for its files).

    Args:
        resume: continue the run in ``config.output`` from its last checkpoint (its saved config is used).
        overwrite: replace a non-empty output folder (never one another fit is writing to).
        splits: pre-discovered data (skips ``discover``); the scan still runs.

    Raises:
        KeyboardInterrupt: after Ctrl-C, with the last checkpoint on disk (``--resume`` continues from it).
    """
    run_dir = Path(config.output)
    if resume and not (run_dir / "graft.json").is_file():
        raise GraftError(f"{run_dir}: nothing to resume (no graft.json); start the run without --resume")
    outputs.check_output(run_dir, "-o", ((config.data.path, "data"), (cache_folder(config.data.cache_dir),
                                                                       "feature cache")))
    with run_lock(run_dir), out_of_memory_hint(config.data.batch_size):
        prepare_run_dir(run_dir, resume, overwrite)
        return _fit_locked(config, run_dir, resume, hooks or Hooks(), verbose, splits)


def _fit_locked(config: FitConfig, run_dir: Path, resume: bool, hooks: Hooks, verbose: bool,
                splits: DatasetSplits | None) -> FitResult:
    if resume:
        config = _resumable_config(run_dir, config, verbose)
    if config.train.strategy == "auto":
        config = resolve_auto(config, (lambda message: print(message, file=sys.stderr)) if verbose else None)
    device = resolve_device(config.train.device)
    runtime = Runtime(device, autocast_dtype(device, config.train.precision), config.train.channels_last,
                      verbose=verbose)
    seed_everything(config.train.seed)
    splits = splits or discover(config.data.path, config.data.val_fraction, config.train.seed)
    if resume:
        _check_same_classes(run_dir, splits, config.data.path)
    report = scan(splits, config.data.max_image_pixels, workers=4)
    _write_data_report(run_dir, splits, report, runtime)
    if config.train.lr == "auto":
        config = _with_found_lr(config, splits, runtime, run_dir)
    seed_everything(config.train.seed)  # the head's initialisation depends on the seed alone
    model, card = _prepare_model(config, splits, runtime, run_dir)
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
        runtime.log(f"resuming after epoch {state.epoch} (stage {state.stage}, epoch {state.stage_epoch})")
    cached = None
    if recipes.solves_head(config) and state.epoch == 0:
        start = time.perf_counter()
        cached = fit_probe_head(model, splits, config, runtime, run_dir)
        state.elapsed += time.perf_counter() - start
    loaders = make_loaders(splits, model, config, runtime)
    state = _run_stages(model, state, resume_from, loaders, config, runtime, run_dir, hooks)
    return _finish(run_dir, model, card, splits, state, config, runtime, loaders, cached)


def _prepare_model(config: FitConfig, splits: DatasetSplits, runtime: Runtime, run_dir: Path):
    """Builds the model on its device and writes graft.json (status: training); returns (model, card).

    A network trained from scratch is normalised with the training data's own per-channel statistics (there are no
    pretrained ones to match).
    """
    model, info = build_on_device(config, splits, runtime)
    card = model_card(model, config, info)
    card["status"] = "training"
    if runtime.is_main:
        write_json(run_dir / "graft.json", card)
    runtime.log(f"{config.model.backbone} ({info['weights']}) cut at {info['cut_at']}: {info['feature_dim']} features"
                f" → {len(splits.classes)} classes; {len(splits.train)} train / {len(splits.val)} val images on "
                f"{runtime.device}; batch-norm statistics {'frozen' if model.freeze_bn_stats else 'updated'} when "
                "unfrozen")
    return model, card


def build_on_device(config: FitConfig, splits: DatasetSplits, runtime: Runtime) -> tuple[GraftModel, dict]:
    mean_std = None
    if config.train.strategy == "scratch":
        stats = dataset_statistics([path for path, _ in splits.train], size=SCRATCH_STATS_SIZE,
                                   max_images=SCRATCH_STATS_IMAGES, seed=config.train.seed)
        mean_std = (stats.mean, stats.std)
    model, info = build_model(config, splits.classes, mean_std)
    model.to(runtime.device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    model.freeze_bn_stats = resolve_bn_stats(config, len(splits.train)) == "frozen"
    return model, info


def find_lr(config: FitConfig, splits: DatasetSplits, runtime: Runtime, steps: int = 200, start: float = 1e-7,
            end: float = 10.0):
    """The learning-rate finder on the recipe's main stage (the one trained longest): one step per rate on a fresh
    model, rates growing exponentially. Returns a ``graft.diagnose.LRFinding`` whose ``suggestion`` is in the units
    of ``train.lr`` (the head's rate; the trunk's follows from finetune_lr_ratio)."""
    unit = apply_overrides(copy.deepcopy(config), {"train.lr": 1.0})
    stages = recipes.plan(unit)
    if not stages:
        raise GraftError("this strategy solves its head in closed form (probe): there is no learning rate to find")
    stage = stages[-1]
    seed_everything(config.train.seed)
    model, _ = build_on_device(unit, splits, runtime)
    groups = recipes.configure(model, stage, unit.train)
    ratios = [group["lr"] for group in groups]  # with train.lr = 1 each group's rate is its ratio to train.lr
    optimizer = make_optimizer(groups, unit)
    loader, _, generator = make_loaders(splits, model, unit, runtime)
    generator.manual_seed(config.train.seed)

    def batches():
        while True:
            yield from loader

    stream = batches()

    def step_loss(lr: float) -> float:
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        images, labels, *_ = next(stream)
        images = to_device(images, runtime.device, runtime.channels_last)
        with autocast(runtime.device, runtime.dtype):
            loss = compute_loss(model(images), labels.to(runtime.device), config.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return math.inf
        loss.backward()
        optimizer.step()
        return loss.item()

    finding = lr_sweep(step_loss, start, end, steps)
    finding.suggestion = finding.suggestion / stage.lr  # the stage's rate → train.lr (the head's)
    return finding


def _with_found_lr(config: FitConfig, splits: DatasetSplits, runtime: Runtime, run_dir: Path) -> FitConfig:
    """``--lr auto``: runs the finder, saves its curve (lr_find.png/.csv) and returns the config with that rate."""
    finding = find_lr(config, splits, runtime)
    if runtime.is_main:
        plot_lr_finding(finding, run_dir / "lr_find.png")
        _write_csv(run_dir / "lr_find.csv", ["lr", "loss"],
                   [{"lr": lr, "loss": loss} for lr, loss in zip(finding.lrs, finding.losses)])
    runtime.log(f"lr-find: --lr {finding.suggestion:.2e} ({finding.reason})")
    found = apply_overrides(copy.deepcopy(config), {"train.lr": float(f"{finding.suggestion:.3g}")})
    check_ranges(found)  # a finder that only saw the loss explode must not start a run at an absurd rate
    return found


def _run_stages(model, state: TrainState, resume_from, loaders, config: FitConfig, runtime: Runtime, run_dir: Path,
                hooks: Hooks) -> TrainState:
    """Runs the recipe's remaining stages from ``state``; Ctrl-C leaves the last finished epoch's checkpoint."""
    stages = recipes.plan(config)
    try:
        while state.stage < len(stages):
            stage = stages[state.stage]
            if state.stage_done or state.stage_epoch >= stage_length(stage, state):
                _restore_best(model, state, run_dir, runtime)  # a no-op unless the run stopped right at the boundary
                state = TrainState(stage=state.stage + 1, epoch=state.epoch, elapsed=state.elapsed,
                                   micro_batches=state.micro_batches, history=state.history)  # planned_epochs: 0
                if config.train.time_budget and state.elapsed >= config.train.time_budget:
                    state.stage = len(stages)  # out of time: the remaining stages are skipped
                    runtime.log("time budget spent: remaining stages skipped")
                resume_from = None
                continue
            run_stage(model, stage, state, loaders, config, runtime, run_dir, hooks,
                      resume_from if state.stage_epoch else None)
            resume_from = None
    except KeyboardInterrupt:
        runtime.log(f"interrupted: the last finished epoch is saved; continue with `graft fit --resume -o {run_dir}`")
        raise
    return state


def _resumable_config(run_dir: Path, given: FitConfig | None = None, verbose: bool = True) -> FitConfig:
    """The run's saved config (a resumed run must follow it to stay reproducible); a warning lists each setting of
    ``given`` that is not the default and differs from the saved one, since it is ignored."""
    card = read_card(run_dir)
    if card.get("status") == "complete":
        raise GraftError(f"{run_dir}: this run is already complete; nothing to resume (--overwrite trains it again)")
    if not (run_dir / CHECKPOINT).is_file():
        raise GraftError(f"{run_dir}: no {CHECKPOINT} to resume from (stopped before its first epoch ended); "
                         "start the run again with --overwrite")
    saved = config_from_card(card)
    ignored = ignored_on_resume(given, saved) if given is not None else []
    if ignored and verbose:
        print(f"warning: --resume continues with the run's saved config; ignored: {', '.join(ignored)}",
              file=sys.stderr)
    return saved


def ignored_on_resume(given: FitConfig, saved: FitConfig) -> list[str]:
    """``key=value (saved: value)`` for each setting the caller changed from the default that the saved run does not
    have. (A flag set to the default value cannot be told from an unset one, so it is not listed.)"""
    from graft.config import _flatten

    defaults, given_flat, saved_flat = (_flatten(c.to_dict()) for c in (FitConfig(), given, saved))
    ignored = []
    for key, value in given_flat.items():
        if key == "output" or value == defaults.get(key) or value == saved_flat.get(key):
            continue
        if key == "data.path" and Path(value).resolve() == Path(saved_flat.get(key) or "").resolve():
            continue  # the same folder, spelled differently
        ignored.append(f"{key}={value} (saved: {saved_flat.get(key)})")
    return ignored


def _check_same_classes(run_dir: Path, splits: DatasetSplits, data: str) -> None:
    """A resumed run continues the saved head, which has one output per saved class, in order."""
    saved = read_card(run_dir)["classes"]
    if list(splits.classes) == list(saved):
        return
    gone, new = [c for c in saved if c not in splits.classes], [c for c in splits.classes if c not in saved]
    what = "; ".join(part for part in (f"gone: {', '.join(map(display_name, gone[:5]))}" if gone else "",
                                       f"new: {', '.join(map(display_name, new[:5]))}" if new else "") if part)
    raise GraftError(f"{data}: the classes changed since the run started ({what or 'reordered'}); --resume "
                     "needs the same classes: restore the data, or start again with --overwrite")


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
    """The head on the frozen trunk, solved: cached features, then L-BFGS over an L2 path chosen on val."""
    data = config.data
    sets = extract_features(splits, model.trunk, model.preprocessing, config.model.backbone, data.cache_dir,
                            None, data.workers, runtime.device, data.augment_views, data.hflip, runtime.log)
    features = sets[model.trunk.node]
    train_x = np.concatenate([features.features["train"], *features.augmented])
    train_y = np.concatenate([features.labels["train"]] * (1 + len(features.augmented)))
    result = fit_linear_probe(train_x, train_y, features.features["val"], features.labels["val"], len(model.classes),
                              balanced=config.train.balance != "none", device=runtime.device, log=runtime.log)
    model.head[-1].load_state_dict(result.linear.state_dict())
    runtime.log(f"probe: λ={result.l2:.0e} chosen on val (accuracy {result.val_accuracy:.4f})")
    features.stats["probe_l2"] = result.l2
    if runtime.is_main:
        columns = ["l2", "C", "train_acc", "train_loss", "val_acc", "val_loss", "iterations"]
        _write_csv(run_dir / "probe_grid.csv", columns, result.grid)
    return features


def _features_logits(model: GraftModel, features: FeatureSet, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.head.parameters()).device
    with torch.no_grad():
        logits = model.head(torch.as_tensor(features.features[split], dtype=torch.float32, device=device))
    return logits.cpu(), torch.as_tensor(features.labels[split])


def _finish(run_dir: Path, model: GraftModel, card: dict, splits: DatasetSplits, state: TrainState,
            config: FitConfig, runtime: Runtime, loaders, cached: FeatureSet | None = None) -> FitResult:
    """Saves the final model, evaluates it on val (and test) with full metrics, removes the checkpoint.

    With ``cached`` features (the solved probe's), a probe's metrics come from them instead of another forward pass:
    its trunk never changed.
    """
    _refuse_non_finite(run_dir, model)  # before metrics: NaN logits have no meaningful ones
    card["status"] = "complete"
    metrics: dict = {"strategy": config.train.strategy, "epochs": state.epoch,
                     "train_seconds": round(state.elapsed, 2)}
    if config.train.precise_bn:
        metrics["precise_bn"] = _precise_bn_after_training(model, splits, config, runtime, card)
    if cached is not None:
        metrics["features"] = cached.stats
    if cached is not None and config.train.strategy == "probe":
        for split in ("val", "test"):
            if len(cached.labels[split]):
                metrics[split] = classification_metrics(*_features_logits(model, cached, split), model.classes)
        return _save_final(run_dir, model, card, metrics, state, runtime)
    logits, labels = predict_logits(model, loaders[1], runtime.device, runtime.dtype, runtime.channels_last)
    if len(labels):
        metrics["val"] = classification_metrics(logits, labels, model.classes)
    if splits.test:
        test_set = ImageDataset(splits.test, build_transform(model.preprocessing), config.data.max_image_pixels)
        test_loader = DataLoader(test_set, batch_size=config.data.batch_size * 2, num_workers=0)
        logits, labels = predict_logits(model, test_loader, runtime.device, runtime.dtype, runtime.channels_last)
        metrics["test"] = classification_metrics(logits, labels, model.classes)
    return _save_final(run_dir, model, card, metrics, state, runtime)


def _refuse_non_finite(run_dir: Path, model: GraftModel) -> None:
    """Never saves a run as complete with NaN or infinite weights: predict would print blank labels, no error."""
    if non_finite_tensors(model.state_dict()):
        raise GraftError(f"{run_dir}: the trained weights hold NaN or infinite values, so the run is not marked "
                         "complete; train again with a lower --lr (--overwrite)")


def _precise_bn_after_training(model: GraftModel, splits: DatasetSplits, config: FitConfig, runtime: Runtime,
                               card: dict) -> dict:
    if model.trunk_frozen() and not batch_norms(model.head):
        runtime.log("precise BN: skipped, nothing with batch norm was trained")
        return {"images": 0, "skipped": "nothing with batch norm was trained"}
    start = time.perf_counter()
    images = recompute_bn_statistics(model, splits.train, config, runtime)
    card["precise_bn"] = {"images": images}
    seconds = time.perf_counter() - start
    runtime.log(f"precise BN: statistics recomputed over {images} training images in {seconds:.1f}s")
    return {"images": images, "seconds": round(seconds, 2)}


def recompute_bn_statistics(model: GraftModel, samples: list, config: FitConfig, runtime: Runtime,
                            augmented: bool = True) -> int:
    """Precise BN over ``samples`` (see ``graft.batchnorm.recompute_statistics``), in the training augmentation by
    default: the weights were learnt on augmented images' statistics (evaluation preprocessing measured worse, see
    bench/RESULTS.md)."""
    transform = build_transform(model.preprocessing, augmented, config.data.augment, config.data.hflip)
    seed_everything(config.train.seed)  # the augmentation draws: the same statistics every time
    dataset = ImageDataset(samples, transform, config.data.max_image_pixels)
    loader = DataLoader(dataset, batch_size=config.data.batch_size, shuffle=False,
                        num_workers=resolve_workers(config.data.workers, runtime.device))
    return recompute_statistics(model, loader, runtime.device, runtime.channels_last)


def precise_bn(run_dir: str | Path, data: str | None = None, device: str = "auto", verbose: bool = True,
               augmented: bool = True) -> dict:
    """Precise BN for a finished run: recomputes BN statistics over its training split (``augmented``: in the
    training augmentation, else in evaluation preprocessing), reports validation accuracy before and after, and
    saves the new weights (the old ones stay as ``model.before-precise-bn``)."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        card = read_card(run_dir)
        config = config_from_card(card)
        target = resolve_device(device)
        runtime = Runtime(target, autocast_dtype(target, config.train.precision), config.train.channels_last,
                          verbose=verbose)
        splits = discover(data or config.data.path, config.data.val_fraction, config.train.seed)
        scan(splits, config.data.max_image_pixels)
        model = load(run_dir, target)
        if not batch_norms(model):
            raise GraftError(f"{run_dir}: this model has no batch norm layers; nothing to recompute")
        val_set = ImageDataset(splits.val, build_transform(model.preprocessing), config.data.max_image_pixels)
        val_loader = DataLoader(val_set, batch_size=config.data.batch_size * 2)
        before = validate(model, val_loader, runtime)
        images = recompute_bn_statistics(model, splits.train, config, runtime, augmented)
        after = validate(model, val_loader, runtime)
        check_finite(model.state_dict(), f"{run_dir} after precise BN")  # the saved model stays as it was
        shutil.copyfile(run_dir / "model.safetensors", run_dir / "model.before-precise-bn.safetensors")
        outputs.record(run_dir / "model.before-precise-bn.safetensors")
        card["precise_bn"] = {"images": images, "augmented": augmented, "val_acc_before": before["val_acc"],
                              "val_acc_after": after["val_acc"]}
        save_model(run_dir, model, card)
    runtime.log(f"precise BN over {images} training images: val accuracy {before['val_acc']:.4f} → "
                f"{after['val_acc']:.4f}, val loss {before['val_loss']:.4f} → {after['val_loss']:.4f}")
    return {"images": images, **{f"before_{k}": v for k, v in before.items()},
            **{f"after_{k}": v for k, v in after.items()}}


def _save_final(run_dir: Path, model: GraftModel, card: dict, metrics: dict, state: TrainState,
                runtime: Runtime) -> FitResult:
    _refuse_non_finite(run_dir, model)  # precise BN ran since the check in _finish
    if runtime.is_main:
        write_history(run_dir, state.history)
        save_model(run_dir, model, card)
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    if "val" in metrics:
        runtime.log(f"done: val accuracy {metrics['val']['accuracy']:.4f} in {state.elapsed:.1f}s → {run_dir}")
    return FitResult(run_dir, model.eval(), metrics)
