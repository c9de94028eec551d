"""Out of memory at the allocator (CPU or GPU) as one line that says which --batch-size to try."""

from __future__ import annotations

import contextlib

from graft.errors import GraftError

__all__ = ["OUT_OF_MEMORY_TEXTS", "is_out_of_memory", "out_of_memory_hint", "out_of_memory_message"]

# RuntimeError texts of allocators that failed; MemoryError (Python's own) and torch.cuda.OutOfMemoryError are typed
OUT_OF_MEMORY_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "MPS backend out of memory",
                       "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_TEXTS)


def out_of_memory_message(batch_size: int) -> str:
    if batch_size <= 1:
        return "out of memory at --batch-size 1: use a smaller --image-size or backbone, or free memory"
    return f"out of memory at --batch-size {batch_size}: try --batch-size {batch_size // 2}"


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int):
    """Turns an allocator's failure inside the block into a GraftError naming half of ``batch_size``.

    (Training on a GPU first retries with micro-batches, see ``graft.training.loop``; this is what is left after that.)
    """
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise GraftError(out_of_memory_message(batch_size)) from None
