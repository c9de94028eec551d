"""What a fit carries between epochs and returns: hooks, the training state, the result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.training import recipes

__all__ = ["FitResult", "Hooks", "TrainState"]


@dataclass
class Hooks:
    """Named hook points (not a callback framework): each is called with plain values if set."""

    on_stage_start: Callable[[recipes.Stage, GraftModel], None] | None = None
    on_batch_end: Callable[[int, float], None] | None = None  # (step in epoch, loss)
    on_epoch_end: Callable[[dict], None] | None = None  # the history row just written
    on_learning_rates: Callable[[int, dict], None] | None = None  # (epoch, lr per param group) just before on_epoch_end
    on_fit_end: Callable[[FitResult], None] | None = None  # the finished run, its files written


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
    probe: dict | None = None  # the solved probe as candidate epoch 0: val_acc, val_loss, seconds (finetune only)
    overhead: float = 0.0  # auto: seconds advise spent before training, which the fine-tune's epochs must give back
    world_size: int = 1  # processes the run trains on (torchrun); a resume must use as many
    epoch_progress: dict = field(default_factory=dict)  # a mid-epoch checkpoint: step, the epoch's sums, RNG states
    history: list[dict] = field(default_factory=list)


@dataclass
class FitResult:
    """What ``fit`` returns: the run folder, the trained model (eval mode), its metrics and the epoch history."""

    run_dir: Path
    model: GraftModel
    metrics: dict
    history: list[dict] = field(default_factory=list)  # history.csv's rows, as numbers (none for a solved probe)

    def history_frame(self):
        """The history as a pandas DataFrame, one row per epoch.

        Raises:
            GraftError: when pandas is not installed (``history`` holds the same rows as dicts).
        """
        try:
            import pandas
        except ImportError:
            raise GraftError("history_frame needs pandas: pip install 'graft[notebook]' (or pandas); "
                             "result.history holds the same rows as dicts") from None
        return pandas.DataFrame(self.history)
