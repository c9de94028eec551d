"""Tar shards: `graft shard` writes them, `graft fit SHARDS/` streams them with the folder's split and counts."""

import io
import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from synthetic import make_shapes

from graft.data.datasets import ImageDataset
from graft.data.discovery import discover
from graft.data.shards import SIDECAR, ShardDataset, parse_size, shard_dataset
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), splits={"train": 9, "val": 4}, seed=2, size=24)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "shards"
    shard_dataset(folder, output, shard_size="12KB")
    return output


def _transform():
    return create_transform(Preprocessing(input_size=(24, 24), mean=(0.5,) * 3, std=(0.5,) * 3,
                                          interpolation="bilinear", crop_pct=1.0))


def test_shards_keep_the_splits_counts_and_the_images_as_stored(folder, shards):
    sidecar = json.loads((shards / SIDECAR).read_text())
    assert sidecar["classes"] == ["circle", "square", "triangle"]
    assert sidecar["splits"]["train"]["count"] == 27 and sidecar["splits"]["val"]["count"] == 12
    assert sidecar["splits"]["val"]["counts"] == {"circle": 4, "square": 4, "triangle": 4}
    names = [s["name"] for s in sidecar["splits"]["train"]["shards"]]
    assert len(names) > 1 and all((shards / n).is_file() for n in names)  # 12 KB splits 27 images
    manifest = json.loads((shards / ".graft-manifest.json").read_text())
    assert set(names) <= set(manifest) and SIDECAR in manifest
    import tarfile

    with tarfile.open(shards / names[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        path = next(m for m in tar.getmembers() if m.name == member.name.replace(".png", ".path.txt"))
        original = folder / tar.extractfile(path).read().decode()
        assert tar.extractfile(member).read() == original.read_bytes()


def test_discovery_of_shards_gives_the_folders_split(folder, shards):
    plain, streamed = discover(folder), discover(shards)
    assert streamed.shards is not None and streamed.classes == plain.classes
    assert [label for _, label in streamed.train] == [label for _, label in plain.train]
    assert streamed.counts("val") == plain.counts("val") and len(streamed.val) == len(plain.val)


def test_a_plain_folders_seeded_val_split_is_recorded_once(tmp_path):
    data = make_shapes(tmp_path / "plain", per_class=10, size=16)
    shard_dataset(data, tmp_path / "s", val_fraction=0.3, seed=5)
    expected = discover(data, 0.3, 5)
    streamed = discover(tmp_path / "s", val_fraction=0.9, seed=99)  # the recorded split wins
    assert len(streamed.val) == len(expected.val) == 9 and streamed.counts("train") == expected.counts("train")


def test_streaming_yields_the_same_images_as_the_folder(folder, shards):
    plain, streamed = discover(folder), discover(shards)
    dataset = ShardDataset(streamed.shards["val"], _transform(), equal=False, samples=streamed.val)
    got = sorted(((label, image.sum().item()) for image, label in dataset), key=lambda x: (x[0], round(x[1], 3)))
    folder_set = ImageDataset(plain.val, _transform())  # indexed: it wraps around, so never iterate it
    want = sorted(((label, image.sum().item()) for image, label in map(folder_set.__getitem__, range(12))),
                  key=lambda x: (x[0], round(x[1], 3)))
    assert len(dataset) == len(got) == 12
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(abs(g[1] - w[1]) < 1e-3 for g, w in zip(got, want))


def test_each_rank_and_worker_takes_an_equal_disjoint_share(shards, monkeypatch):
    splits = discover(shards)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr("graft.data.shards.rank_and_world", lambda rank=rank: (rank, 2))
        dataset = ShardDataset(splits.shards["train"], _transform(), shuffle=True, generator=torch.Generator(),
                               with_index=True)
        seen[rank] = [int(index) for _, _, index in dataset]
        assert len(dataset) == len(seen[rank]) == 13  # floor(27 / 2): both ranks step in lockstep
    monkeypatch.setattr("graft.data.shards.rank_and_world", lambda: (0, 1))
    dataset = ShardDataset(splits.shards["train"], _transform(), shuffle=True,
                           generator=torch.Generator().manual_seed(1), with_index=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, generator=torch.Generator())
    indices = [int(i) for _, _, batch in loader for i in batch]
    assert sorted(indices) == list(range(27))  # two workers: every sample once
    first = [int(i) for _, _, i in ShardDataset(splits.shards["train"], _transform(), shuffle=True,
                                                 generator=torch.Generator().manual_seed(3), with_index=True)]
    again = [int(i) for _, _, i in ShardDataset(splits.shards["train"], _transform(), shuffle=True,
                                                 generator=torch.Generator().manual_seed(3), with_index=True)]
    assert first == again and first != sorted(first)  # shuffled, and seeded


def test_a_bad_sample_is_logged_and_replaced_keeping_the_count(shards, tmp_path, caplog):
    import webdataset as wds

    splits = discover(shards)
    _, members = splits.shards["val"][0]
    broken = tmp_path / "broken.tar"
    with wds.TarWriter(str(broken)) as sink:
        for number, (key, label) in enumerate(members):
            sink.write({"__key__": key, "png": b"not an image" if number == 1 else b"", "cls": label}
                       if number < 2 else {"__key__": key, "png": _png(), "cls": label})
    with caplog.at_level(logging.WARNING):
        items = list(ShardDataset([(str(broken), members)], _transform(), equal=True))
    assert len(items) == len(members)
    assert "substituted the next image" in caplog.text


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_brace_pattern_selects_shards(shards):
    splits = discover(f"{shards}/train-{{000000..000001}}.tar")
    sidecar = json.loads((shards / SIDECAR).read_text())
    expected = sum(len(s["samples"]) for s in sidecar["splits"]["train"]["shards"][:2])
    assert len(splits.train) == expected < 27 and len(splits.val) == 12
    with pytest.raises(GraftError, match="not in"):
        discover(f"{shards}/train-{{000000..000099}}.tar")


def test_bad_sizes_and_outputs_are_refused(folder, tmp_path):
    assert parse_size("512MB") == 512 * 10**6 and parse_size("1GiB") == 2**30 and parse_size(4096) == 4096
    with pytest.raises(GraftError, match="--shard-size"):
        parse_size("lots")
    with pytest.raises(GraftError, match="inputs"):
        shard_dataset(folder, folder / "shards")
    assert not (folder / "shards").exists()


def test_fit_from_shards_matches_the_folder_and_predict_loads_it(folder, shards, tmp_path):
    from graft.training.fitting import fit

    overrides = {"train.strategy": "finetune", "train.epochs": 2, "train.head_epochs": 1, "data.batch_size": 9}
    streamed = fit(tiny_config(shards, tmp_path / "from-shards", **overrides), verbose=False)
    report = json.loads((streamed.run_dir / "data_report.json").read_text())
    assert report["counts"]["train"] == {"circle": 9, "square": 9, "triangle": 9}
    assert report["counts"]["val"] == {"circle": 4, "square": 4, "triangle": 4}
    # the cached L-BFGS probe reads image files: on shards the head trains by epochs over the stream instead
    probed = fit(tiny_config(shards, tmp_path / "probe", **{"train.strategy": "probe", "train.epochs": 1}),
                 verbose=False)
    assert [row["stage"] for row in probed.history] == ["probe"] and probed.metrics["val"]["images"] == 12
    assert json.loads((probed.run_dir / "graft.json").read_text())["config"]["train"]["head_fit"] == "epochs"
    assert not (probed.run_dir / "probe_grid.csv").exists()
    with pytest.raises(GraftError, match="scratch measures normalisation statistics"):
        fit(tiny_config(shards, tmp_path / "scratch", **{"train.strategy": "scratch"}), verbose=False)
    done = subprocess.run([sys.executable, "-m", "graft", "predict", str(streamed.run_dir),
                           str(next((folder / "val" / "circle").iterdir()))], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert any(name in done.stdout for name in ("circle", "square", "triangle"))
