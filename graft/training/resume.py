"""Mid-epoch checkpoints (``--checkpoint-every`` steps, ``--checkpoint-minutes``): a kill on an hour-long epoch loses
minutes, and the resumed run is exact.

Exact means: the checkpoint holds the weights, optimiser and schedule after step N, the epoch's running sums, and
every process's RNG states; on resume the sampler skips the N batches this epoch already consumed (ShardSampler)
and the RNGs continue from where they were. With loader workers (> 0), their seeds come from the epoch's generator
and the skipped batches shift which worker loads what, so augmentation after the resume point differs; the order
of images does not.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from graft.config import TrainConfig
from graft.training.checkpoints import save_checkpoint
from graft.training.state import TrainState
from graft.utils import distributed
from graft.utils.runtime import Runtime

__all__ = ["MidEpochCheckpoints", "restore_rng", "rng_state"]


def rng_state() -> dict:
    """This process's Python, NumPy and torch RNG states as JSON-able lists (they travel in the checkpoint's
    metadata with the TrainState)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, cached = random.getstate()
    return {"python": [version, list(internal), cached], "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist()}


def restore_rng(states: list[dict], rank: int) -> None:
    """Restores this rank's saved RNG states (a run resumed on as many processes as it was saved with)."""
    state = states[rank]
    version, internal, cached = state["python"]
    random.setstate((version, tuple(internal), cached))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class MidEpochCheckpoints:
    """Decides after each optimiser step whether to write a checkpoint inside the epoch (every N steps, or when M
    minutes passed since the last one) and writes it: every process hands its RNG states to rank 0, which writes.

    The minutes clock is rank 0's, broadcast, so every process takes part in the same gathers.
    """

    def __init__(self, train: TrainConfig, run_dir: Path, model, optimizer, scheduler, state: TrainState,
                 runtime: Runtime):
        self.every, self.seconds = train.checkpoint_every, train.checkpoint_minutes * 60
        self.run_dir, self.model, self.optimizer, self.scheduler = run_dir, model, optimizer, scheduler
        self.state, self.runtime = state, runtime
        self.last = time.monotonic()

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.seconds)

    def _due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        if not self.seconds:
            return False
        late = time.monotonic() - self.last >= self.seconds
        return bool(distributed.broadcast_object(late) if self.runtime.distributed else late)

    def after_step(self, progress: dict) -> None:
        if not self._due(progress["step"]):
            return
        self.state.epoch_progress = {**progress, "rng": distributed.all_gather_object(rng_state())}
        if self.runtime.is_main:
            save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state)
        self.last = time.monotonic()
