"""Real interruptions of a real `graft fit` process: SIGKILL at a random moment and Ctrl-C (SIGINT), then
`graft fit --resume`, which must reach exactly the weights of an uninterrupted run.

``GRAFT_KILL_TRIALS=20 pytest tests/test_interrupt.py`` repeats the kill trial for the figure in the README.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors import safe_open
from safetensors.torch import load_file

from graft.utils.outputs import MANIFEST

EPOCHS = 12  # ~0.1 s each here: a kill aimed at epochs 1-4 leaves a wide margin before the run ends


def fit_command(data: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from graft.cli import main; main()", "fit", str(data), "-o", str(output),
            "--backbone", TINY, "--no-pretrained", "--image-size", "32", "--workers", "0", "--batch-size", "16",
            "--strategy", "finetune", "--head-fit", "epochs", "--head-epochs", "2", "--epochs", str(EPOCHS - 2),
            "--augment", "standard", "--lr", "0.01", "--patience", "0", *extra]


def checkpoint_epoch(run_dir: Path) -> int:
    try:
        with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as handle:
            return json.loads(handle.metadata()["graft.state"])["epoch"]
    except Exception:  # not written yet (the rename is atomic: never half a file)
        return -1


def interrupt_at(data: Path, output: Path, epoch: int, sig: int, delay: float) -> subprocess.CompletedProcess:
    """Starts a fit, waits until its checkpoint reaches ``epoch``, waits ``delay`` more seconds, sends ``sig``."""
    process = subprocess.Popen(fit_command(data, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while checkpoint_epoch(output) < epoch and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before the signal: aim at an earlier epoch"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def resume(output: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from graft.cli import main; main()", "fit", "--resume", "-o", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(fit_command(shapes, output), check=True, capture_output=True, timeout=300)
    return output


@pytest.mark.parametrize("trial", range(int(os.environ.get("GRAFT_KILL_TRIALS", "1"))))
def test_kill_9_mid_run_then_resume_reaches_the_uninterrupted_weights(shapes, tmp_path, uninterrupted, trial):
    rng = random.Random()  # a random moment each run: the property must hold wherever the kill lands
    output = tmp_path / "killed"
    killed = interrupt_at(shapes, output, rng.randint(1, 4), signal.SIGKILL, rng.uniform(0, 0.2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lost = checkpoint_epoch(output)
    assert lost >= 1 and not (output / "model.safetensors").exists()  # the last complete checkpoint still reads
    resumed = resume(output)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {lost}" in resumed.stderr
    assert same_weights(uninterrupted, output)
    assert not [p.name for p in output.iterdir() if p.name.startswith(".") and p.name != MANIFEST]  # temps removed


def test_ctrl_c_exits_cleanly_with_a_resumable_checkpoint(shapes, tmp_path, uninterrupted):
    output = tmp_path / "interrupted"
    stopped = interrupt_at(shapes, output, 2, signal.SIGINT, 0.05)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and "interrupted" in stopped.stderr
    assert f"graft fit --resume -o {output}" in stopped.stderr
    resumed = resume(output)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(uninterrupted, output)
