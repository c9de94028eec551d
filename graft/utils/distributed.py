"""torch.distributed as torchrun launches it: joining the job from its environment, and the few collectives graft needs.

graft never starts processes of its own: ``torchrun`` (or ``python -m torch.distributed.run``, which ``graft fit
--devices N`` runs for the user) sets RANK, WORLD_SIZE and LOCAL_RANK, and every process calls ``init_from_env``.
Without those variables everything here is a no-op on one process, so library code calls it unconditionally.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from graft.errors import GraftError

__all__ = [
    "all_gather_object", "all_reduce_sum", "barrier", "broadcast_buffers", "broadcast_module", "broadcast_object",
    "init_from_env", "is_distributed", "is_main", "launched", "leave", "local_rank", "main_decides", "rank",
    "state_digest", "world_size", "write_rank_digest"
]

RANK_DIGEST = "GRAFT_DEBUG_RANK_DIGEST"  # env var: a folder where each rank writes its final weights' digest (tests)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether torchrun started this process as one of several (its env vars say WORLD_SIZE > 1)."""
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: str = "auto") -> bool:
    """Joins the torchrun job once (NCCL on CUDA, gloo on the CPU); True when running distributed.

    On CUDA each process takes the GPU of its LOCAL_RANK, so ``--device cuda`` means "this process's GPU".

    Raises:
        GraftError: when torchrun's variables are malformed or the device asked for cannot be used by this rank.
    """
    if is_distributed():
        return True
    if not launched():
        return False
    try:
        local = int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise GraftError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r:.20}: expected a number (set by torchrun)") from None
    cuda = device != "cpu" and device != "mps" and torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise GraftError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) here; use "
                             "--nproc-per-node <= the GPU count")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    # A process that exits with its group alive can abort (SIGABRT) while the interpreter tears down gloo's worker
    # threads: rank 1 of a finished job failed that way. Leaving the group while Python is still whole avoids it.
    atexit.register(leave)
    return True


def leave() -> None:
    """Leaves the torchrun job (a no-op when not in one); ``init_from_env`` arranges it at exit."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value=None, source: int = 0):
    """``value`` as rank ``source`` has it, on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def all_gather_object(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (in place, and returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_module(module: torch.nn.Module, source: int = 0) -> None:
    """Copies rank ``source``'s parameters and buffers into every rank's ``module`` (e.g. after rank 0 solved the
    probe alone)."""
    if not is_distributed():
        return
    for tensor in list(module.state_dict().values()):
        if tensor.is_floating_point() or tensor.dtype in (torch.long, torch.int):
            dist.broadcast(tensor, src=source)


def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Rank ``source``'s buffers (batch-norm running statistics) on every rank. DDP sends them at the start of each
    forward, so after an epoch's last step every rank holds its own: without this, ranks validate (and end) with
    different statistics."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=source)


def main_decides(work):
    """Runs ``work()`` on rank 0 only and hands its result to every rank; an error on rank 0 (a GraftError: the
    folder is locked, not empty...) is raised on every rank with the same message instead of leaving the others
    waiting at a barrier."""
    if not is_distributed():
        return work()
    result, error = None, None
    if is_main():
        try:
            result = work()
        except GraftError as failure:
            error = str(failure)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise GraftError(error)
    return result


def state_digest(state: dict) -> str:
    """SHA-256 over a state dict's names and exact tensor bytes (two ranks with equal weights have equal digests)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_rank_digest(module: torch.nn.Module) -> None:
    """With ``GRAFT_DEBUG_RANK_DIGEST=DIR``: writes DIR/rank-R.txt, this rank's final weights' digest, so a test can
    check that every process ended with the same weights. Off (nothing written) without the variable."""
    folder = os.environ.get(RANK_DIGEST)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank-{rank()}.txt").write_text(state_digest(module.state_dict()) + "\n")
