"""Where and how tensors run: device, autocast precision, seeding, and the process's place in a distributed job."""

from __future__ import annotations

import contextlib
import math
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Sampler

from graft.errors import GraftError
from graft.utils.progress import in_notebook
from graft.utils.timings import Timings

__all__ = [
    "Runtime", "ShardSampler", "autocast", "autocast_dtype", "epoch_seed", "resolve_device", "seed_everything",
    "to_device"
]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GraftError(f"device '{spec}' not understood: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraftError(f"device '{spec}' asked for but CUDA is not available here; use --device cpu")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA where supported (no loss scaling needed), else fp16; None means fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@dataclass
class Runtime:
    """Where and how the loop runs. The seam for distributed training: rank/world size, sampler, who logs."""

    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    verbose: bool = True
    timings: Timings = field(default_factory=Timings)  # seconds per phase (`graft fit --timings`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        """A line for the user: stderr, except in Jupyter, which shows stderr in red as if it were an error."""
        if self.verbose and self.is_main:
            print(message, file=sys.stdout if in_notebook() else sys.stderr, flush=True)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def create_sampler(self, dataset, shuffle: bool, seed: int, resumable: bool = False):
        """None on one process (the DataLoader shuffles) unless mid-epoch checkpoints need a sampler that can skip
        what an epoch already consumed; under torchrun this rank's padded share (every rank the same batch count)."""
        if not (self.distributed or resumable):
            return None
        return ShardSampler(len(dataset), self.rank, self.world_size, shuffle, seed)

    def shard_indices(self, size: int) -> list[int]:
        """This rank's unpadded share of ``size`` items for evaluation: ``rank::world``, so no item counts twice."""
        return list(range(self.rank, size, self.world_size))


class ShardSampler(Sampler[int]):
    """A seeded per-epoch order cut into equal shares, one per rank (padded by repeating the first indices, as
    ``DistributedSampler`` does), that can resume mid-epoch: ``set_epoch(epoch, skip)`` drops the ``skip`` indices
    this rank already consumed. (``DistributedSampler`` has no skip, which exact mid-epoch resume needs.)"""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.size, self.rank, self.world_size, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.per_rank = math.ceil(size / world_size) if size else 0
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """This rank's whole share of the current epoch (before ``skip``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padding = self.per_rank * self.world_size - self.size
        order += (order * math.ceil(padding / max(1, self.size)))[:padding]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.order()[self.skip:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch
