"""A warm `graft features` rerun reads the cache through a record of the weights' identity, never building the net."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from synthetic import make_shapes

from graft.data.discovery import discover
from graft.models.backbones.base import Preprocessing
from graft.models.backbones.registry import create_backbone
from graft.probing.warm import RECORDS, cached_features

ROOT = Path(__file__).resolve().parents[1]
# the console script's code, reporting at exit which heavy modules the command imported
PROBE = ("import atexit, sys; atexit.register(lambda: print('IMPORTED', 'timm' in sys.modules, "
         "'torchvision' in sys.modules)); from graft.cli import main; main()")


@pytest.fixture()
def data(tmp_path):
    return make_shapes(tmp_path / "data", splits={"train": 4, "val": 2}, seed=5)


def _features(data, cache, **options):
    return cached_features(discover(data), "test_resnet", ["layer2", "pre_logits"], 32, cache_dir=cache,
                           device="cpu", workers=0, **options)


def test_a_warm_rerun_imports_neither_timm_nor_torchvision_and_reads_the_cold_features(data, tmp_path):
    cold = _features(data, tmp_path / "cache", pretrained=False)
    assert cold["layer2"].stats["extracted"] == 18
    command = [sys.executable, "-c", PROBE, "features", str(data), "-b", "test_resnet", "--no-pretrained",
               "--image-size", "32", "--cut-at", "layer2,pre_logits", "--cache", str(tmp_path / "cache"),
               "-o", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED False False" in result.stdout  # the network was never built
    assert "0 images extracted" in result.stdout and "18 from the cache" in result.stdout
    for node in ("layer2", "pre_logits"):
        saved = np.load(tmp_path / "out" / f"{node}.npz")
        for split in ("train", "val"):
            assert np.array_equal(saved[f"{split}_features"], cold[node].features[split])
            assert saved[f"{split}_paths"].tolist() == cold[node].paths[split]


def _weights_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = create_backbone("test_resnet", pretrained=False).net
    preprocessing = json.dumps(Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3).to_dict())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path,
              metadata={"graft.preprocessing": preprocessing})
    return path


def test_another_weights_file_under_the_same_name_misses_the_cache(data, tmp_path):
    weights = _weights_file(tmp_path / "trunk.safetensors", seed=1)
    first = _features(data, tmp_path / "cache", weights_file=str(weights))
    again = _features(data, tmp_path / "cache", weights_file=str(weights))
    assert first["pre_logits"].stats["extracted"] == 18
    assert again["pre_logits"].stats["engine"] == "cache" and again["pre_logits"].stats["extracted"] == 0
    assert np.array_equal(again["pre_logits"].features["train"], first["pre_logits"].features["train"])
    _weights_file(weights, seed=2)  # same name, other bytes
    other = _features(data, tmp_path / "cache", weights_file=str(weights))
    assert other["pre_logits"].stats["extracted"] == 18  # the full path ran, on the new weights
    assert not np.array_equal(other["pre_logits"].features["train"], first["pre_logits"].features["train"])


def test_a_damaged_record_falls_back_to_the_full_path_and_is_rewritten(data, tmp_path, caplog):
    cold = _features(data, tmp_path / "cache", pretrained=False)
    (record,) = (tmp_path / "cache" / RECORDS).glob("*.json")
    sound = json.loads(record.read_text())
    record.write_text(json.dumps({**sound, "digests": {"layer2": "../x", "pre_logits": 7}}))
    again = _features(data, tmp_path / "cache", pretrained=False)
    assert again["layer2"].stats["engine"] != "cache"  # the network was built and hashed
    assert again["layer2"].stats["extracted"] == 0  # its features were still in the cache
    assert "damaged warm-rerun record" in caplog.text
    assert json.loads(record.read_text()) == sound
    np.testing.assert_array_equal(again["layer2"].features["val"], cold["layer2"].features["val"])
