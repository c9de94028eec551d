"""The learning-rate finder: one step per rate on a fresh model, the curve and its suggestion."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graft.config import FitConfig, apply_overrides
from graft.data.datasets import unreadable_split
from graft.data.discovery import DatasetSplits
from graft.errors import GraftError
from graft.training import recipes
from graft.training.loop import compute_loss
from graft.training.optim import create_optimizer
from graft.training.setup import create_loaders, create_on_device
from graft.utils.files import write_csv
from graft.utils.plotting import plots_skipped, pyplot, save_figure
from graft.utils.progress import Progress
from graft.utils.runtime import Runtime, autocast, seed_everything, to_device

__all__ = ["LRFinding", "find_lr", "lr_sweep", "plot_lr_finding", "save_lr_finding"]


def find_lr(config: FitConfig, splits: DatasetSplits, runtime: Runtime, steps: int = 200, start: float = 1e-7,
            end: float = 10.0):
    """The learning-rate finder on the recipe's main stage (the one trained longest): one step per rate on a fresh
    model, rates growing exponentially. Returns a ``graft.training.lr_find.LRFinding`` whose ``suggestion`` is in the units
    of ``train.lr`` (the head's rate; the trunk's follows from finetune_lr_ratio)."""
    unit = apply_overrides(copy.deepcopy(config), {"train.lr": 1.0})
    stages = recipes.plan(unit)
    if not stages:
        raise GraftError("this strategy solves its head in closed form (probe): there is no learning rate to find")
    stage = stages[-1]
    seed_everything(config.train.seed)
    model, _ = create_on_device(unit, splits, runtime)
    groups = recipes.configure(model, stage, unit.train)
    optimizer = create_optimizer(groups, unit)
    ratios = [group["lr"] for group in optimizer.param_groups]  # train.lr = 1: each group's ratio (with --lr-decay's)
    loader, _, generator = create_loaders(splits, model, unit, runtime)
    generator.manual_seed(config.train.seed)

    def batches():
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:  # no sample decoded (a shard that is no tar): cycling the loader again would never end
                raise unreadable_split(loader.dataset, "training")

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

    with Progress("lr-find", steps, "steps", runtime.log, runtime.verbose and runtime.is_main) as progress:
        finding = lr_sweep(step_loss, start, end, steps, progress=progress)
    finding.suggestion = finding.suggestion / stage.lr  # the stage's rate → train.lr (the head's)
    return finding


@dataclass
class LRFinding:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float
    reason: str
    warning: str = ""  # why the suggestion should not be trusted (the curve has no usable minimum), else empty


def lr_sweep(step_loss, start: float = 1e-7, end: float = 10.0, steps: int = 200, smoothing: float = 0.9,
             progress: Progress | None = None) -> LRFinding:
    """Runs ``step_loss(lr)`` (one training step at ``lr``, returning its loss) for exponentially growing rates and
    suggests a tenth of the rate with the lowest smoothed loss (Smith's rule, fastai v1's default: the point of
    steepest descent is noisier). Stops early once the loss has blown up (4x its minimum, or not finite).
    ``progress`` (``graft.utils.progress``) is told after every step."""
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, average, best = [], [], 0.0, math.inf
    for index in range(steps):
        lr = start * factor ** index
        loss = step_loss(lr)
        if progress is not None:
            progress.update(index + 1, f"lr {lr:.1e} loss {loss:.3f}")
        if not math.isfinite(loss):
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (index + 1))  # bias-corrected, as Adam's moments
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best and index > 10:
            break
    if len(losses) < 5:
        raise GraftError("the loss blew up at once: the sweep's start rate is already too high; lower --start-lr")
    low = int(np.argmin(losses))
    slopes = np.gradient(np.array(losses), np.log(np.array(lrs)))
    steepest = lrs[int(np.argmin(slopes[: low + 1]))]
    reason = f"lowest loss at {lrs[low]:.1e}, a tenth of it; steepest descent at {steepest:.1e}"
    return LRFinding(lrs, losses, float(lrs[low] / 10), reason, _unreliable(lrs, losses, low, len(losses) == steps))


def _unreliable(lrs: list[float], losses: list[float], low: int, ran_to_the_end: bool) -> str:
    """Why a tenth of the lowest-loss rate is no answer: the minimum sits at an end of the sweep (the loss only rose,
    so the suggestion lies below every rate tried; or it still fell at the last rate), or the loss never fell."""
    if low < max(3, len(losses) // 20):
        return (f"the loss was lowest at the sweep's start ({lrs[low]:.1e}) and never fell: the suggestion lies "
                "below every rate tried; lower --start-lr, or check the data and labels")
    if low == len(losses) - 1 and ran_to_the_end:
        return f"the loss still fell at the sweep's last rate ({lrs[-1]:.1e}): raise --end-lr"
    if losses[low] > 0.98 * losses[0]:
        return (f"the loss fell by only {100 * (1 - losses[low] / losses[0]):.1f}% over the sweep: the curve is "
                "too flat to choose from; more --steps or a larger --batch-size")
    return ""


def save_lr_finding(finding: LRFinding, folder: Path) -> None:
    """The sweep as ``lr_find.csv`` (rate, smoothed loss) and ``lr_find.png`` (the curve and the suggestion)."""
    write_csv(folder / "lr_find.csv", ["lr", "loss"],
              [{"lr": lr, "loss": loss} for lr, loss in zip(finding.lrs, finding.losses)])
    if not plots_skipped("lr_find.png"):
        plot_lr_finding(finding, folder / "lr_find.png")


def plot_lr_finding(finding: LRFinding, path) -> None:
    figure, axis = pyplot().subplots(figsize=(6, 4))
    axis.plot(finding.lrs, finding.losses)
    axis.axvline(finding.suggestion, color="#c33", ls="--", label=f"suggested {finding.suggestion:.1e}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss (smoothed)")
    axis.legend()
    axis.grid(alpha=0.3)
    save_figure(figure, path)
