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
from typer.testing import CliRunner

from graft.cli import app
from graft.data.datasets import ImageDataset
from graft.data.discovery import discover
from graft.data.sharding import shard_dataset
from graft.data.shard_index import SIDECAR
from graft.data.shards import ShardDataset, parse_size
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
    # scratch normalises with statistics measured on a sample of the stream: here every image, as from the folder
    scratch = fit(tiny_config(shards, tmp_path / "scratch", **{"train.strategy": "scratch", "train.epochs": 1}),
                  verbose=False)
    from graft.data.statistics import dataset_statistics
    from graft.training.setup import SCRATCH_STATS_SIZE

    stats = dataset_statistics([p for p, _ in discover(folder).train], size=SCRATCH_STATS_SIZE)
    card = json.loads((scratch.run_dir / "graft.json").read_text())
    assert card["preprocessing"]["mean"] == pytest.approx(list(stats.mean))
    assert card["preprocessing"]["std"] == pytest.approx(list(stats.std))
    done = CliRunner().invoke(app, ["predict", str(streamed.run_dir), str(next((folder / "val" / "circle").iterdir()))])
    assert done.exit_code == 0, done.output  # in this process: the CLI's wiring, without 3 s of imports
    assert any(name in done.stdout for name in ("circle", "square", "triangle"))


def _set_label(value):
    def change(sidecar):
        sidecar["splits"]["train"]["shards"][0]["samples"][1][1] = value
    return change


def _set_name(value):
    def change(sidecar):
        sidecar["splits"]["train"]["shards"][0]["name"] = value
    return change


def _tamper(folder, change) -> None:
    """Applies ``change`` to the sidecar in ``folder``; a shard name without a slash also gets a file of that name (a
    copy of the first shard), so the only thing between the name and a URL opener is graft's check."""
    import shutil

    sidecar = json.loads((folder / SIDECAR).read_text())
    change(sidecar)
    (folder / SIDECAR).write_text(json.dumps(sidecar))
    name = sidecar["splits"]["train"]["shards"][0]["name"]
    if isinstance(name, str) and "/" not in name and not (folder / name).exists():
        shutil.copy(folder / "train-000000.tar", folder / name)


def _drop_label(sidecar):
    sidecar["splits"]["train"]["shards"][0]["samples"][1] = sidecar["splits"]["train"]["shards"][0]["samples"][1][:1]


def _set_classes(value):
    def change(sidecar):
        sidecar["classes"] = value
    return change


def _miscount(sidecar):
    sidecar["splits"]["val"]["count"] += 1


SIDECAR_CASES = {  # case: (change to a good sidecar, the field the one-line error must name)
    "label missing": (_drop_label, "splits.train.shards[0].samples[1]"),
    "label 99": (_set_label(99), "splits.train.shards[0].samples[1] label 99"),
    "label -1": (_set_label(-1), "splits.train.shards[0].samples[1] label -1"),
    "label abc": (_set_label("abc"), "splits.train.shards[0].samples[1] label 'abc'"),
    "label 1.7": (_set_label(1.7), "splits.train.shards[0].samples[1] label 1.7"),
    "label true": (_set_label(True), "splits.train.shards[0].samples[1] label True"),
    "one class": (_set_classes(["circle"]), "classes"),
    "classes abc": (_set_classes("abc"), "classes"),
    "class twice": (_set_classes(["circle", "square", "circle"]), "classes"),
    "count": (_miscount, "splits.val.count"),
    "pipe": (_set_name("pipe:touch PWNED;cat train-000000.tar"), "splits.train.shards[0].name"),
    "absolute": (_set_name("/etc/passwd"), "splits.train.shards[0].name"),
    "parent": (_set_name("../other/x.tar"), "splits.train.shards[0].name"),
    "http": (_set_name("http://127.0.0.1:9/x.tar"), "splits.train.shards[0].name"),
    "gs": (_set_name("gs://bucket/x.tar"), "splits.train.shards[0].name"),
    "file": (_set_name("file:train-000000.tar"), "splits.train.shards[0].name"),
}


@pytest.fixture
def tampered(shards, tmp_path):
    """A copy of the shard set beside a folder ``other/`` holding a tar the sidecar may point at."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    (tmp_path / "other").mkdir()
    shutil.copy(next(copy.glob("train-*.tar")), tmp_path / "other" / "x.tar")
    return copy


@pytest.mark.parametrize("case", SIDECAR_CASES)
def test_every_sidecar_field_is_checked_before_any_work(tampered, case, monkeypatch):
    from test_cli_property import fingerprint

    change, field = SIDECAR_CASES[case]
    _tamper(tampered, change)
    before = fingerprint(tampered.parent, [])
    monkeypatch.chdir(tampered)  # where a pipe: name's shell command would run
    with pytest.raises(GraftError) as caught:
        discover(".")
    message = str(caught.value)
    assert message.startswith(f"{SIDECAR}: {field}") and "\n" not in message, message
    assert fingerprint(tampered.parent, []) == before and not (tampered / "PWNED").exists()


def test_a_pipe_shard_name_runs_nothing_from_the_cli(tampered, tmp_path):
    from test_cli_property import fingerprint

    _tamper(tampered, _set_name("pipe:touch PWNED;cat train-000000.tar"))
    before = fingerprint(tmp_path, [tmp_path / "run"])
    done = subprocess.run([sys.executable, "-m", "graft", "fit", ".", "-o", str(tmp_path / "run"), "-b", "test_resnet",
                           "--no-pretrained", "--image-size", "32", "--epochs", "1"],
                          capture_output=True, text=True, cwd=tampered, check=False)
    assert done.returncode == 2 and not (tampered / "PWNED").exists()
    assert done.stderr.strip().splitlines() == [
        f"error: {SIDECAR}: splits.train.shards[0].name 'pipe:touch PWNED;cat train-000000.tar' is not the plain name "
        "of a .tar file in the shard folder (no folder, '..' or URL scheme); write the shards again with graft shard"]
    assert fingerprint(tmp_path, [tmp_path / "run"]) == before and not list((tmp_path / "run").rglob("*.pt"))


def test_shard_statistics_match_numpy_on_the_same_images(tmp_path):
    import numpy as np
    from PIL import Image

    from graft.data.statistics import shard_statistics

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for number in range(6):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[..., 2] //= 4  # channels that differ, so a channel mix-up shows
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{number}.png")
    shard_dataset(tmp_path / "data", tmp_path / "shards", shard_size="2KB", val_fraction=0.3)
    splits = discover(tmp_path / "shards")
    assert len(splits.shards["train"]) > 2
    stats = shard_statistics(splits.shards["train"], size=16, max_images=1000)
    originals = [path for path, _ in discover(tmp_path / "data", 0.3, 0).train]  # the files the train shards hold
    pixels = np.stack([np.asarray(Image.open(path), dtype=np.float64) for path in originals]) / 255.0
    assert stats.images == len(splits.train) == 8
    assert stats.mean == pytest.approx(tuple(pixels.mean(axis=(0, 1, 2))), abs=1e-9)
    assert stats.std == pytest.approx(tuple(pixels.std(axis=(0, 1, 2))), abs=1e-6)
    assert shard_statistics(splits.shards["train"], size=16, max_images=3).images == 3  # a bounded sample


def test_folders_and_shards_share_one_loader_builder(folder, shards):
    """--accumulate K loads B x K images per step and --random-erasing erases, from shards as from folders."""
    from timm.data.random_erasing import RandomErasing

    from graft.models.grafted import create_model
    from graft.training.setup import create_loaders
    from graft.utils.runtime import Runtime

    config = tiny_config(folder, "unused", **{"data.batch_size": 4, "train.accumulate": 2, "data.random_erasing": 0.5})
    model, _ = create_model(config, ["circle", "square", "triangle"])
    runtime = Runtime(torch.device("cpu"), None, False, verbose=False)
    loaders = {name: create_loaders(discover(data), model, config, runtime)
               for name, data in (("folder", folder), ("shards", shards))}
    for name, (train, val, _) in loaders.items():
        assert train.batch_size == 8 and val.batch_size == 8, name
        assert any(isinstance(step, RandomErasing) for step in train.dataset.transform.transforms), name
    images, labels, _ = next(iter(loaders["shards"][0]))
    assert images.shape[0] == labels.shape[0] == 8  # 4 x 2 images, split by the loop into two micro-batches


def _tar(path, entries) -> None:
    """A tar of (member name, bytes, or a link target given as ("->", target)) in order."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def test_shard_read_problems_are_one_plain_line_naming_shard_member_and_reason(shards, tmp_path, caplog):
    import warnings

    splits = discover(shards)
    _, members = splits.shards["val"][0]
    (first, label), (second, _), (third, _) = members[:3]
    shard = tmp_path / "odd.tar"
    _tar(shard, [(f"{first}.png", _png()), (f"{first}.cls", str(label).encode()),
                 (f"{second}.png", ("->", "/etc/passwd")), (f"{third}.png", b"not an image")]
         + [(f"{key}.png", _png()) for key, _ in members[3:]])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(bytes(range(256)) * 40)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(ShardDataset([(str(shard), members), (str(garbage), members)], _transform(), equal=True))
    assert len(items) == 2 * len(members) and not [str(w.message) for w in caught]  # no raw Python warning
    lines = [record.getMessage() for record in caplog.records]
    assert all("\n" not in line and "<_io" not in line for line in lines), lines
    assert f"{shard}: member {second}.png: a symbolic link member, skipped (substituted the next image)" in lines
    assert any(line.startswith(f"{shard}: member {third}.png: not a readable image") for line in lines), lines
    about_garbage = [line for line in lines if str(garbage) in line]  # one line for the whole shard
    assert len(about_garbage) == 1 and about_garbage[0].startswith(
        f"{garbage}: {len(members)} sample(s) listed in {SIDECAR} not read (unreadable tar: "), about_garbage
    assert about_garbage[0].endswith(f"), e.g. {first} (substituted the next image)"), about_garbage
