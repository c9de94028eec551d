"""Where and how tensors run: device, autocast precision, seeding, and the process's place in a distributed job."""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from graft.errors import GraftError

__all__ = ["Runtime", "autocast", "autocast_dtype", "epoch_seed", "resolve_device", "seed_everything", "to_device"]


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.verbose and self.is_main:
            print(message, file=sys.stderr, flush=True)

    def create_sampler(self, dataset, shuffle: bool, seed: int):
        """None on one process (the DataLoader shuffles); a DistributedSampler under torchrun (a later issue)."""
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch
