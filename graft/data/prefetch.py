"""Decoding in threads beside the forward pass: batches of a dataset decoded by a small thread pool, in order.

On the CPU a DataLoader without workers decodes a batch, then the network runs it, then the next batch is decoded:
with ONNX Runtime the forward pass no longer dominates, and decoding (JPEG, resize, normalise) takes about as long
as the forward while one of them waits for the other. Worker processes compete with the forward's threads for the
same cores (``graft.data.datasets.resolve_workers``). Threads are enough here: Pillow releases the GIL while it
decodes and resizes, and torch while it converts and normalises. Every item is decoded exactly as the dataset's own
``__getitem__`` decodes it, and the batches come out in the dataset's order, so what a network computes from them is
the same as from a sequential loader's batches.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.utils.data import default_collate

__all__ = ["DecodePlan", "ThreadedBatches", "decode_plan", "engine_plan", "plan_batches", "usable_cores"]

SMALL_MACHINE = 3  # cores: up to this many, the forward keeps them all, one thread decodes ahead (decode_plan)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class DecodePlan:
    """How decoding and the forward pass share the cores.

    Attributes:
        compute_threads: intra-op threads of the forward (ONNX Runtime's session).
        decode_threads: threads decoding images (0: in the calling thread, as a DataLoader without workers).
        ahead: batches decoded ahead of the one the forward runs (0: decoding and the forward take turns, each on
            every core; 1: batch k+1 is decoded while the forward runs batch k).
    """

    compute_threads: int
    decode_threads: int
    ahead: int

    @property
    def overlaps(self) -> bool:
        return self.ahead > 0 and self.decode_threads > 0


def decode_plan(cores: int | None = None) -> DecodePlan:
    """The thread split for ``cores`` (default: ``usable_cores()``), without measuring anything.

    A forward and a decode running at once must not ask for more threads than there are cores: a parallel kernel runs
    at the pace of its slowest thread, so one preempted intra-op thread stalls the whole forward. Hence:

    - up to ``SMALL_MACHINE`` cores, splitting them would halve the forward (one core of two), so the forward keeps
      every core and ONE thread decodes the next batch beside it (ahead 1). The session's idle threads sleep rather
      than spin (``graft.models.onnx_engine.onnx_session``), so the decoding thread takes the cycles the forward
      leaves between its kernels. Measured on 2 cores (bench/bench_engine.py, EfficientNet-Lite0 at 224 px, one
      quiet run): 121.4 img/s, against 114.8 when decoding and the forward took turns on every core, 88.9 with the
      cores split one and one.
    - above, decoding overlaps the forward (ahead 1): a third of the cores decode (decoding costs about 0.6 of
      EfficientNet-Lite0's forward at 224 px in core-seconds, less for any larger network), the rest run the forward.

    One core: nothing to overlap; the calling thread decodes between forwards.
    """
    cores = max(1, cores or usable_cores())
    if cores == 1:
        return DecodePlan(compute_threads=1, decode_threads=0, ahead=0)
    if cores <= SMALL_MACHINE:
        return DecodePlan(compute_threads=cores, decode_threads=1, ahead=1)
    decode = max(1, cores // 3)
    return DecodePlan(compute_threads=cores - decode, decode_threads=decode, ahead=1)


def engine_plan(onnx: bool, cores: int | None = None) -> DecodePlan:
    """The plan for a forward on ONNX Runtime (``onnx``: ``decode_plan``, the session takes ``compute_threads``) or
    on eager torch, whose intra-op threads are the process's to set, not graft's: decoding then takes turns with the
    forward, on every core."""
    cores = max(1, cores or usable_cores())
    if onnx:
        return decode_plan(cores)
    return DecodePlan(compute_threads=torch.get_num_threads(), decode_threads=cores if cores > 1 else 0, ahead=0)


def plan_batches(dataset, batch_size: int, plan: DecodePlan, one_thread: bool = False) -> ThreadedBatches:
    """``ThreadedBatches`` of ``dataset`` following ``plan``; ``one_thread``: at most one decoding thread (items
    whose transforms draw from torch's global generator after seeding it must not interleave). One thread that
    decodes nothing ahead would only wait for itself: the calling thread decodes instead."""
    threads = min(plan.decode_threads, 1) if one_thread else plan.decode_threads
    return ThreadedBatches(dataset, batch_size, threads if threads > 1 or plan.ahead else 0, plan.ahead)


class ThreadedBatches:
    """Batches of ``dataset`` (indices 0..N-1 in order, ``batch_size`` each, collated like a DataLoader's) whose items
    are decoded by ``threads`` threads, ``ahead`` batches in advance of the one being consumed.

    An item's exception is raised when its batch is reached; leaving the loop early cancels what was not started.
    """

    def __init__(self, dataset, batch_size: int, threads: int = 0, ahead: int = 0, collate=default_collate):
        self.dataset, self.batch_size, self.collate = dataset, max(1, int(batch_size)), collate
        self.threads, self.ahead = max(0, int(threads)), max(0, int(ahead))

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _ranges(self):
        total = len(self.dataset)
        return (range(start, min(start + self.batch_size, total)) for start in range(0, total, self.batch_size))

    def __iter__(self):
        if self.threads == 0:
            for indices in self._ranges():
                yield self.collate([self.dataset[index] for index in indices])
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="graft-decode")
        try:
            queued: deque = deque()
            for indices in self._ranges():
                queued.append([pool.submit(self.dataset.__getitem__, index) for index in indices])
                while len(queued) > self.ahead:
                    yield self.collate([future.result() for future in queued.popleft()])
            while queued:
                yield self.collate([future.result() for future in queued.popleft()])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
