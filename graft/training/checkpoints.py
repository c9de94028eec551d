"""The run folder while training: checkpoints, history, the run lock and preparing the folder."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from graft.config import FitConfig
from graft.data.discovery import DatasetSplits
from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.models.run_folder import (
    HISTORY,
    config_from_card,
    read_card,
)
from graft.training.state import TrainState
from graft.utils import outputs
from graft.utils.files import atomic_write, write_csv
from graft.utils.safefiles import read_safetensors
from graft.utils.text import display_name

__all__ = [
    "BEST", "CHECKPOINT", "HISTORY_COLUMNS", "LOCK", "ignored_on_resume", "prepare_run_dir", "read_checkpoint",
    "run_lock", "save_checkpoint", "write_history", "check_same_classes", "resumable_config"
]

CHECKPOINT = "checkpoint.safetensors"


BEST = "best.safetensors"


def save_checkpoint(run_dir: Path, model: GraftModel, optimizer, scheduler, state: TrainState) -> None:
    """Model, optimizer and scheduler state and the TrainState in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict = {}
    for param_id, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    metadata = {
        "graft.state": json.dumps(asdict(state)),
        "graft.optimizer": json.dumps({"param_groups": optimizer_state["param_groups"], "scalars": scalars}),
        "graft.scheduler": json.dumps(scheduler.state_dict()),
    }
    atomic_write(run_dir / CHECKPOINT, lambda temp: save_file(tensors, temp, metadata=metadata))


def read_checkpoint(run_dir: Path) -> tuple[dict, dict, dict, TrainState]:
    """(model state, optimizer state, scheduler state, TrainState) from the run's checkpoint."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise GraftError(f"{run_dir}: no {CHECKPOINT} to resume from; start the run again without --resume")
    tensors, metadata = read_safetensors(path, "the checkpoint is lost: restart with --overwrite")
    if not {"graft.state", "graft.optimizer", "graft.scheduler"} <= set(metadata):
        raise GraftError(f"{path}: damaged checkpoint (no training state inside); restart with --overwrite")
    try:
        return _unpack_checkpoint(tensors, metadata)
    except (KeyError, TypeError, ValueError) as error:  # metadata edited or written by another program
        raise GraftError(f"{path}: damaged checkpoint (bad training state: {error!r:.100}); restart with --overwrite"
                         ) from None


def _unpack_checkpoint(tensors: dict, metadata: dict) -> tuple[dict, dict, dict, TrainState]:
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_meta = json.loads(metadata["graft.optimizer"])
    optimizer_state: dict = {"state": {}, "param_groups": optimizer_meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(param_id), {})[name] = value
    for param_id, values in optimizer_meta["scalars"].items():
        optimizer_state["state"].setdefault(int(param_id), {}).update(values)
    state = TrainState(**json.loads(metadata["graft.state"]))
    return model_state, optimizer_state, json.loads(metadata["graft.scheduler"]), state


HISTORY_COLUMNS = ["epoch", "stage", "stage_epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                   "images_per_s", "seconds", "best", "micro_batches"]


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_csv(run_dir / HISTORY, HISTORY_COLUMNS, history)


LOCK = outputs.RUN_LOCK
OWNER = outputs.RUN_LOCK_OWNER  # beside the lock, not in it: filelock truncates the lock file on every attempt


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Holds an exclusive lock on the run folder while a fit writes to it; the OS drops it if the process dies.

    ``filelock`` rather than ``fcntl``, which does not exist on Windows (``import graft`` would fail there).
    """
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        owner = _read_owner(run_dir / OWNER)
        raise GraftError(f"{run_dir}: another graft fit (pid {owner}) is writing to this folder; wait for it to "
                         "finish, stop it, or choose another -o") from None
    try:
        (run_dir / OWNER).write_text(f"{os.getpid()}\n")
        yield
    finally:
        (run_dir / OWNER).unlink(missing_ok=True)  # while still held: a finished folder carries no lock files
        with contextlib.suppress(OSError):  # Windows refuses to remove an open file, and removes it on release
            (run_dir / LOCK).unlink(missing_ok=True)
        lock.release()


def _read_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:  # not written yet (the holder has just taken the lock) or already removed
        return "?"


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Checks the run folder (with ``overwrite``, removes graft's own files from it; see ``graft.utils.outputs``) and
    claims it; the caller holds its lock."""
    outputs.remove_temp_files(run_dir)  # atomic_write's .graft-tmp-* files, left only by a kill -9 mid-write
    if not resume and overwrite:
        kept = outputs.replace_own(run_dir, "-o")
        if kept:
            print(f"--overwrite: kept {len(kept)} file(s) graft did not write in {run_dir} (e.g. {kept[0]!r})",
                  file=sys.stderr)
    elif not resume and outputs.entries(run_dir):
        raise GraftError(f"{run_dir}: output folder is not empty; pass --resume to continue it, --overwrite to "
                         "replace it, or choose another -o")
    outputs.claim(run_dir, "-o")


def resumable_config(run_dir: Path, given: FitConfig | None = None, verbose: bool = True) -> FitConfig:
    """The run's saved config (a resumed run must follow it to stay reproducible); a warning lists each setting of
    ``given`` that is not the default and differs from the saved one, since it is ignored."""
    card = read_card(run_dir)
    if card.get("status") == "complete":
        raise GraftError(f"{run_dir}: this run is already complete; nothing to resume (--overwrite trains it again)")
    if not (run_dir / CHECKPOINT).is_file():
        raise GraftError(f"{run_dir}: no {CHECKPOINT} to resume from (stopped before its first epoch ended); "
                         "start the run again with --overwrite")
    saved = config_from_card(card)
    ignored = ignored_on_resume(given, saved) if given is not None else []
    if ignored and verbose:
        print(f"warning: --resume continues with the run's saved config; ignored: {', '.join(ignored)}",
              file=sys.stderr)
    return saved


def ignored_on_resume(given: FitConfig, saved: FitConfig) -> list[str]:
    """``key=value (saved: value)`` for each setting the caller changed from the default that the saved run does not
    have. (A flag set to the default value cannot be told from an unset one, so it is not listed.)"""
    from graft.config import flatten

    defaults, given_flat, saved_flat = (flatten(c.to_dict()) for c in (FitConfig(), given, saved))
    ignored = []
    for key, value in given_flat.items():
        if key == "output" or value == defaults.get(key) or value == saved_flat.get(key):
            continue
        if key == "data.path" and Path(value).resolve() == Path(saved_flat.get(key) or "").resolve():
            continue  # the same folder, spelled differently
        ignored.append(f"{key}={value} (saved: {saved_flat.get(key)})")
    return ignored


def check_same_classes(run_dir: Path, splits: DatasetSplits, data: str) -> None:
    """A resumed run continues the saved head, which has one output per saved class, in order."""
    saved = read_card(run_dir)["classes"]
    if list(splits.classes) == list(saved):
        return
    gone, new = [c for c in saved if c not in splits.classes], [c for c in splits.classes if c not in saved]
    what = "; ".join(part for part in (f"gone: {', '.join(map(display_name, gone[:5]))}" if gone else "",
                                       f"new: {', '.join(map(display_name, new[:5]))}" if new else "") if part)
    raise GraftError(f"{data}: the classes changed since the run started ({what or 'reordered'}); --resume "
                     "needs the same classes: restore the data, or start again with --overwrite")
