"""``--compile``: torch.compile around the module that runs the batches, falling back to eager on any failure."""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

__all__ = ["COMPILE_BACKEND_ENV", "EagerOnFailure", "compile_backend", "maybe_compile"]

COMPILE_BACKEND_ENV = "GRAFT_COMPILE_BACKEND"  # e.g. "eager" or "aot_eager": tests, or where inductor cannot build

log = logging.getLogger(__name__)
_failed: set[str] = set()  # backends that failed in this process: later stages and extractions skip them


def compile_backend() -> str:
    """torch.compile's backend: ``$GRAFT_COMPILE_BACKEND``, else inductor (torch's default)."""
    return os.environ.get(COMPILE_BACKEND_ENV, "").strip() or "inductor"


def maybe_compile(module: nn.Module, mode: str, what: str, warn=None) -> nn.Module:
    """``module`` itself when ``mode`` is off; else an ``EagerOnFailure`` around ``torch.compile(module, ...)``.

    Compilation happens at the first call (and again when shapes change), so a failure (no C++ compiler for
    inductor, an op dynamo cannot trace) surfaces there, not here; ``EagerOnFailure`` catches it, warns once and
    runs ``module`` eagerly from then on: the run goes on, only slower.

    Args:
        mode: one of ``graft.config.COMPILE_MODES``; the mode is passed only to inductor (other backends take none).
        what: named in the warning ("training", "extraction").
        warn: called with the warning's text (e.g. ``Runtime.log``); default ``logging``'s warning.
    """
    if mode == "off":
        return module
    backend = compile_backend()
    warn = warn or log.warning
    if backend in _failed:
        return module
    options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    try:
        compiled = torch.compile(module, backend=backend, **options)
    except Exception as error:  # e.g. an unknown backend, or torch.compile unsupported on this Python
        _fell_back(backend, what, error, warn)
        return module
    return EagerOnFailure(module, compiled, backend, what, warn)


def _fell_back(backend: str, what: str, error: BaseException, warn) -> None:
    if backend not in _failed:
        _failed.add(backend)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        warn(f"warning: --compile ({backend}) failed for {what}, continuing without it: {type(error).__name__}: "
             f"{first}")


class EagerOnFailure(nn.Module):
    """Calls the compiled module; if compiling (or running compiled code) raises, warns once and calls the eager
    module from then on. Out-of-memory errors pass through untouched (graft's micro-batching handles them).

    ``module`` is a registered child, so ``.train()``/``.eval()`` reach it; graft never reads weights from this
    wrapper (checkpoints come from the bare model), so its ``module.`` keys never reach a file.
    """

    def __init__(self, module: nn.Module, compiled, backend: str, what: str, warn):
        super().__init__()
        self.module = module
        # not registered: the compiled wrapper shares module's parameters, which must not appear twice
        object.__setattr__(self, "_compiled", compiled)
        self.backend, self.what, self.warn = backend, what, warn

    @property
    def compiled(self) -> bool:
        """Whether batches still go through the compiled module."""
        return self._compiled is not None

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - any compiler failure: the eager module still works
                object.__setattr__(self, "_compiled", None)
                _fell_back(self.backend, self.what, error, self.warn)
        return self.module(*args, **kwargs)

    def no_sync(self):
        """DDP's ``no_sync`` when the module is DDP (gradient accumulation), else nothing to suspend."""
        return self.module.no_sync() if hasattr(self.module, "no_sync") else contextlib.nullcontext()
