"""Shared fixtures: synthetic image data the tests make, and one small trained run reused by many tests."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("GRAFT_OFFLINE", "1")  # tests never touch the network; the offline path is what they check
os.environ["GRAFT_CACHE"] = tempfile.mkdtemp(prefix="graft-test-cache-")  # never the user's feature cache
atexit.register(shutil.rmtree, os.environ["GRAFT_CACHE"], ignore_errors=True)  # the suite's cache, not a leak per run
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from synthetic import make_shapes  # noqa: E402

from graft.config import load_config  # noqa: E402

TINY = "test_resnet"  # timm's ~0.5 M-parameter ResNet: real BN, stages and group_matcher, fast at 32 px


def tiny_config(data: Path, output: Path, **overrides):
    """A config for fast CPU runs of the tiny backbone on the synthetic shapes."""
    values = {
        "data.path": str(data), "output": str(output), "model.backbone": TINY, "model.pretrained": False,
        "data.image_size": 32, "data.workers": 0, "data.batch_size": 16, "data.augment": "none",
        "train.epochs": 3, "train.head_epochs": 1, "train.lr": 1e-2, "train.patience": 0, "train.seed": 0,
    }
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """train/ (24 per class) and val/ (10 per class) of coloured circles, squares and triangles."""
    return make_shapes(tmp_path_factory.mktemp("shapes"), splits={"train": 24, "val": 10}, seed=1)


@pytest.fixture(scope="session")
def trained_result(shapes, tmp_path_factory):
    """A finished finetune run of the tiny backbone, with the in-memory model ``fit`` returned beside its folder."""
    from graft.training.fitting import fit

    output = tmp_path_factory.mktemp("runs") / "shapes"
    return fit(tiny_config(shapes, output, **{"train.strategy": "finetune", "train.epochs": 12}), verbose=False)


@pytest.fixture(scope="session")
def trained_run(trained_result) -> Path:
    """The finished run's folder (shared: predict, evaluate, load and CLI tests read it)."""
    return trained_result.run_dir


@pytest.fixture(scope="session")
def pretrained_tiny(trained_run, tmp_path_factory) -> Path:
    """A 'pretrained' tiny backbone: the trained run's trunk as a weights file with its preprocessing inside."""
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(str(trained_run / "model.safetensors"))
    trunk = {k.removeprefix("trunk.net."): v for k, v in state.items() if k.startswith("trunk.net.")}
    card = json.loads((trained_run / "graft.json").read_text())
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(trunk, str(path), metadata={"graft.preprocessing": json.dumps(card["preprocessing"])})
    return path
