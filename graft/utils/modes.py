"""A module's train/eval mode changed for a block and put back as it was, submodule by submodule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Runs the block with ``module`` in eval mode, then gives every submodule back its own training flag, also when
    the block raises.

    Each flag is restored, not just the top one: ``module.train(flag)`` alone would switch a frozen batch norm kept
    in eval inside a training model back to batch statistics. ``module.train`` still runs first, for modules whose
    ``train`` does more than set the flag.
    """
    flags = [(part, part.training) for part in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        module.train(flags[0][1])
        for part, flag in flags:
            part.training = flag
