"""GPU speed paths, checked on the CPU: the loader settings helper, --compile (eager backend) and its fallback,
and the GPU benchmark's smoke mode. Nothing here needs CUDA; the CUDA-only behaviour is not run here."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config

from graft.data.datasets import PREFETCH_BATCHES, loader_options
from graft.errors import GraftError
from graft.training.fitting import fit
from graft.utils import compiling

ROOT = Path(__file__).resolve().parents[1]


def test_loader_options_on_the_cpu_are_what_graft_used_before():
    assert loader_options("cpu", -1) == {"num_workers": 0, "pin_memory": False}
    assert loader_options("cpu", 0) == {"num_workers": 0, "pin_memory": False}
    assert loader_options("cpu", 2) == {"num_workers": 2, "pin_memory": False, "persistent_workers": False}
    assert loader_options("cpu", 2, persistent=True)["persistent_workers"] is True


def test_loader_options_on_cuda_pin_prefetch_and_share_cores_between_local_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda = torch.device("cuda")  # a device object needs no GPU; nothing is allocated on it
    assert loader_options(cuda) == {"num_workers": 8, "pin_memory": True, "persistent_workers": False,
                                    "prefetch_factor": PREFETCH_BATCHES}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun processes on this machine: 16 cores / 4
    assert loader_options(cuda, persistent=True) == {"num_workers": 4, "pin_memory": True,
                                                     "persistent_workers": True, "prefetch_factor": 2}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than cores: still one worker each
    assert loader_options(cuda)["num_workers"] == 1
    assert loader_options(cuda, 0) == {"num_workers": 0, "pin_memory": True}  # an explicit count is kept


def _fit(shapes, out: Path, verbose: bool = False, **overrides):
    overrides = {"train.strategy": "finetune", "train.epochs": 2, "train.head_epochs": 1, **overrides}
    return fit(tiny_config(shapes, out, **overrides), verbose=verbose)


@pytest.fixture
def fresh_compile_state(monkeypatch):
    monkeypatch.setattr(compiling, "_failed", set())


def test_compile_with_the_eager_backend_trains_and_extracts_like_eager(shapes, tmp_path, monkeypatch,
                                                                       fresh_compile_state):
    calls = []
    real = torch.compile

    def recording(module, **options):
        calls.append(options)
        return real(module, **options)

    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setenv(compiling.COMPILE_BACKEND_ENV, "eager")  # inductor on 2 shared cores compiles for minutes
    compiled = _fit(shapes, tmp_path / "compiled", **{"train.compile": "default"})
    monkeypatch.delenv(compiling.COMPILE_BACKEND_ENV)
    eager = _fit(shapes, tmp_path / "eager")
    # the probe extraction, then each training stage (head, then the whole model)
    assert calls and all(options == {"backend": "eager"} for options in calls) and len(calls) >= 2
    assert compiled.metrics["val"]["images"] == eager.metrics["val"]["images"] == 30
    for key, value in eager.model.state_dict().items():
        assert torch.allclose(compiled.model.state_dict()[key].float(), value.float(), atol=1e-5), key
    assert "_orig_mod" not in "".join(compiled.model.state_dict())  # weights come from the bare model


def test_a_compile_that_fails_at_the_first_batch_warns_once_and_the_fit_finishes(shapes, tmp_path, monkeypatch,
                                                                                capsys, fresh_compile_state):
    def broken(module, **options):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    result = _fit(shapes, tmp_path / "fallback", verbose=True, **{"train.compile": "max-autotune"})
    assert result.metrics["val"]["images"] == 30 and len(result.history) == 3  # head, then 2 fine-tune epochs
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
    assert len(warnings) == 1, warnings  # extraction and both stages fell back; the warning is printed once
    assert "no working C++ compiler found" in warnings[0] and "more detail" not in warnings[0]


def test_a_compile_that_raises_at_once_returns_the_eager_module(monkeypatch, fresh_compile_state):
    def refuses(module, **options):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuses)
    module, seen = torch.nn.Linear(3, 2), []
    assert compiling.maybe_compile(module, "default", "training", seen.append) is module
    assert len(seen) == 1 and "not supported on this Python" in seen[0]
    assert compiling.maybe_compile(module, "default", "training", seen.append) is module and len(seen) == 1
    assert compiling.maybe_compile(module, "off", "training", seen.append) is module


def test_out_of_memory_in_compiled_code_is_not_a_compile_failure(fresh_compile_state):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    module, seen = torch.nn.Linear(3, 2), []
    wrapper = compiling.EagerOnFailure(module, oom, "inductor", "training", seen.append)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        wrapper(torch.zeros(1, 3))
    assert wrapper.compiled and not seen  # graft's micro-batching handles it; compiled code stays in use


def test_unknown_compile_mode_is_refused(shapes, tmp_path):
    with pytest.raises(GraftError, match="compile 'fast' not understood"):
        tiny_config(shapes, tmp_path / "bad", **{"train.compile": "fast"})


def test_features_cli_refuses_an_unknown_compile_mode(shapes, tmp_path):
    from typer.testing import CliRunner

    from graft.cli import app

    result = CliRunner().invoke(app, ["features", str(shapes), "--backbone", TINY, "--compile", "fast"])
    assert result.exit_code == 2 and "--compile 'fast' not understood" in result.output


@pytest.mark.parametrize("arguments, expected", [([], "no CUDA device: not measured"),
                                                 (["--device", "cpu", "--smoke"], "(smoke: not a measurement)")])
def test_bench_gpu_runs_without_a_gpu(tmp_path, monkeypatch, capsys, arguments, expected):
    """The script's main() in this process (its own imports are what pytest already holds: no 3 s start-up)."""
    if arguments == [] and torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would measure")
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", *arguments])
    assert bench.main() == 0
    printed = capsys.readouterr().out
    assert expected in printed
    if arguments:
        rows = [line for line in printed.splitlines() if line.startswith(("| fine-tune", "| extraction"))]
        assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)
