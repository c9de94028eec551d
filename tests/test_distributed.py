"""torchrun: DDP fit on two gloo processes (same weights everywhere, a run folder predict loads), the two-"node"
rendezvous on localhost, and exact mid-epoch resume. Tiny model, 32 px, the synthetic shapes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from graft.cli import app
from graft.models.run_folder import load
from graft.utils.distributed import state_digest
from tests.conftest import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIT_ARGS = ["--backbone", TINY, "--no-pretrained", "--image-size", "32", "--workers", "0", "--batch-size", "8",
            "--augment", "none", "--strategy", "finetune", "--head-fit", "epochs", "--epochs", "2", "--head-epochs",
            "1", "--lr", "0.01", "--patience", "0", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(digests: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "GRAFT_DEBUG_RANK_DIGEST": str(digests), "OMP_NUM_THREADS": "1",
            "GRAFT_PROGRESS_SECONDS": "0"}


def _torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "graft", "fit"]


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text().strip() for path in sorted(folder.glob("rank-*.txt"))}


def _check_run(run: Path, digests: Path, shapes: Path) -> None:
    """Both ranks hold the saved weights; metrics count each val image once (30, not DistributedSampler's 32)."""
    ranks = _digests(digests)
    assert sorted(ranks) == ["rank-0.txt", "rank-1.txt"]
    saved = state_digest(load(run).state_dict())
    assert set(ranks.values()) == {saved}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["images"] == 30
    assert not (run / ".graft-lock").exists() and not (run / "checkpoint.safetensors").exists()
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # one head epoch, two fine-tuning epochs, written once (by rank 0)


def test_ddp_fit_same_weights_on_every_rank_and_predict_loads(shapes, tmp_path):
    """`graft fit --devices 2`: graft runs torch.distributed.run with the same arguments (the other tests call
    torchrun themselves)."""
    run, digests = tmp_path / "run", tmp_path / "digests"
    command = [sys.executable, "-m", "graft", "fit", str(shapes), *FIT_ARGS, "--devices", "2", "-o", str(run)]
    done = subprocess.run(command, env=_env(digests), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--devices 2: -m torch.distributed.run --standalone --nproc-per-node=2 -m graft fit" in done.stderr
    assert "global batch 16 = --batch-size 8 x --accumulate 1 x 2 process(es)" in done.stderr
    _check_run(run, digests, shapes)
    image = next((shapes / "val").rglob("*.png"))
    predicted = CliRunner().invoke(app, ["predict", str(run), str(image), "--format", "csv"])  # in-process: no start-up
    assert predicted.exit_code == 0, predicted.output
    assert str(image) in predicted.output


def test_two_node_rendezvous_on_localhost(shapes, tmp_path):
    """Two `torchrun --nnodes 2` launches of one process each meet at a c10d rendezvous, as two machines would."""
    run, digests, port = tmp_path / "run", tmp_path / "digests", _free_port()
    nodes = []
    for node in (0, 1):
        command = _torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend",
                            "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "graft-test") + [
            str(shapes), *FIT_ARGS, "-o", str(run)]
        nodes.append(subprocess.Popen(command, env=_env(digests), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    _check_run(run, digests, shapes)


def test_mid_epoch_resume_equals_an_uninterrupted_run(shapes, tmp_path):
    """Killed after step 3's checkpoint (Ctrl-C at step 4, before its checkpoint): the resumed run continues from
    step 3 with the sampler and RNGs where they were, and ends on exactly the uninterrupted run's weights."""
    from graft.training.fitting import fit
    from graft.training.state import Hooks

    overrides = {"train.strategy": "finetune", "train.head_fit": "epochs", "train.epochs": 1, "train.head_epochs": 0,
                 "data.augment": "standard", "data.batch_size": 8, "train.checkpoint_every": 1}
    whole = fit(tiny_config(shapes, tmp_path / "whole", **overrides), verbose=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(shapes, tmp_path / "cut", **overrides), hooks=Hooks(on_batch_end=interrupt), verbose=False)
    resumed = fit(tiny_config(shapes, tmp_path / "cut", **overrides), resume=True, verbose=False)
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(whole_state[name], resumed_state[name]) for name in whole_state)
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-6)


def test_checkpoint_minutes_writes_mid_epoch_checkpoints_on_the_clock(shapes, tmp_path):
    """--checkpoint-minutes: a checkpoint whenever that much time passed since the last; a clock far from due writes
    none inside the epoch."""
    from graft.training.checkpoints import read_checkpoint
    from graft.training.fitting import fit
    from graft.training.state import Hooks

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    base = {"train.strategy": "finetune", "train.head_fit": "epochs", "train.epochs": 1, "train.head_epochs": 0,
            "data.batch_size": 8}
    for minutes, expected_step in ((1e-7, 4), (60.0, None)):  # 6 µs: due after every step; an hour: never here
        run = tmp_path / f"run-{minutes}"
        with pytest.raises(KeyboardInterrupt):
            fit(tiny_config(shapes, run, **base, **{"train.checkpoint_minutes": minutes}),
                hooks=Hooks(on_batch_end=interrupt), verbose=False)
        state = read_checkpoint(run)[3] if (run / "checkpoint.safetensors").exists() else None
        progress = state.epoch_progress if state else {}
        assert progress.get("step") == expected_step, (minutes, progress)


def test_resume_refuses_another_world_size(shapes, tmp_path):
    """A run checkpointed on 2 processes resumed on 1: the global batch (and the lr chosen for it) would change."""
    from graft.errors import GraftError
    from graft.training.checkpoints import read_checkpoint, save_checkpoint
    from graft.training.fitting import fit
    from graft.training.state import Hooks

    overrides = {"train.strategy": "finetune", "train.head_fit": "epochs", "train.epochs": 1, "train.head_epochs": 0,
                 "train.checkpoint_every": 1}
    config = tiny_config(shapes, tmp_path / "run", **overrides)

    def interrupt(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, hooks=Hooks(on_batch_end=interrupt), verbose=False)
    model_state, optimizer_state, scheduler_state, state = read_checkpoint(tmp_path / "run")
    state.world_size = 2

    class _Saved(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return model_state

    class _Optimizer:
        def state_dict(self):
            return optimizer_state

    class _Scheduler:
        def state_dict(self):
            return scheduler_state

    save_checkpoint(tmp_path / "run", _Saved(), _Optimizer(), _Scheduler(), state)
    with pytest.raises(GraftError, match="trained on 2 process.*this resume has 1"):
        fit(config, resume=True, verbose=False)


def test_sharded_extraction_fills_the_cache_one_process_would(shapes, tmp_path):
    """`graft fit --strategy probe` on two processes: each extracts half the images into the shared cache, rank 0
    solves the probe; the cache then holds every image, with the features one process extracts (fp16 tolerance)."""
    from graft.data.discovery import discover
    from graft.probing.extraction import extract_features

    run, digests, cache = tmp_path / "run", tmp_path / "digests", tmp_path / "cache"
    probe_args = ["--backbone", TINY, "--no-pretrained", "--image-size", "32", "--workers", "0", "--strategy",
                  "probe", "--device", "cpu", "--seed", "0", "--cache", str(cache)]
    command = _torchrun("--nproc-per-node", "2", "--master-port", str(_free_port())) + [
        str(shapes), *probe_args, "-o", str(run)]
    done = subprocess.run(command, env=_env(digests), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = _digests(digests)
    assert len(ranks) == 2 and len(set(ranks.values())) == 1
    model = load(run)
    assert set(ranks.values()) == {state_digest(model.state_dict())}
    splits = discover(str(shapes), 0.2, 0)
    sharded = extract_features(splits, model.trunk, model.preprocessing, TINY, cache)[model.trunk.node]
    assert sharded.stats["extracted"] == 0 and sharded.stats["cached"] == 102  # 72 train + 30 val, all from ranks
    single = extract_features(splits, model.trunk, model.preprocessing, TINY, tmp_path / "single")[model.trunk.node]
    assert single.stats["extracted"] == 102
    for split in ("train", "val"):
        assert single.features[split].shape == sharded.features[split].shape
        assert (abs(single.features[split].astype("float32") - sharded.features[split].astype("float32")).max()
                <= 1e-2 * max(1.0, abs(single.features[split].astype("float32")).max()))


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (Linux /proc), None while it has not started."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_job_and_resume_continues(shapes, tmp_path):
    """kill -9 of rank 1 after the first epoch: torchrun ends the job (non-zero exit); `--resume` under the same
    torchrun command finishes the run, every rank on the saved weights, history continuous."""
    import signal
    import time

    run, digests = tmp_path / "run", tmp_path / "digests"
    args = [str(shapes), *FIT_ARGS, "--epochs", "3", "--checkpoint-every", "2", "-o", str(run)]
    job = subprocess.Popen(_torchrun("--nproc-per-node", "2", "--master-port", str(_free_port())) + args,
                           env=_env(digests), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 200
    while not (run / "history.csv").is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    victim = _worker_of_rank(job.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert (run / "checkpoint.safetensors").is_file() and not (run / "metrics.json").exists()
    resumed = subprocess.run(_torchrun("--nproc-per-node", "2", "--master-port", str(_free_port())) + args +
                             ["--resume"], env=_env(digests), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after" in resumed.stderr
    ranks = _digests(digests)
    assert len(ranks) == 2 and set(ranks.values()) == {state_digest(load(run).state_dict())}
    epochs = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3", "4"]  # one head epoch and three fine-tuning epochs, none twice


def test_multi_stage_probe_uses_every_rank_and_matches_one_process(shapes, tmp_path):
    """`graft probe --stages all` on two processes: the leaderboard one process writes, row for row."""
    import csv

    from graft.probing.leaderboard import probe_backbones

    board, digests = tmp_path / "board", tmp_path / "digests"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "graft", "probe", str(shapes), "--backbones", TINY, "--stages", "all",
               "--no-pretrained", "--image-size", "32", "--workers", "0", "--device", "cpu", "--cache",
               str(tmp_path / "cache"), "-o", str(board)]
    done = subprocess.run(command, env=_env(digests), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(board / "leaderboard.csv") as handle:
        ranked = {row["node"]: float(row["val_accuracy"]) for row in csv.DictReader(handle)}
    single = probe_backbones(str(shapes), [TINY], "all", 32, pretrained=False, cache_dir=tmp_path / "single",
                             device="cpu", workers=0)
    assert len(ranked) == len(single) >= 3  # every stage and the pooled features, each probed once
    assert ranked == pytest.approx({row.node: row.val_accuracy for row in single}, abs=1e-6)
