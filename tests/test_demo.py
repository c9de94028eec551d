"""The embedded default on its real data (scikit-learn digits) and real ImageNet weights, at a reduced budget."""

import json

from graft.analysis.demo import POOL_PER_CLASS, run_demo, write_digits


def test_write_digits_split_sizes(tmp_path):
    root = write_digits(tmp_path, shots=3, val_per_class=2)
    assert len(list((root / "train").rglob("*.png"))) == 30
    assert len(list((root / "val").rglob("*.png"))) == 20
    assert len(list((root / "test").rglob("*.png"))) == 1797 - 50


def test_transfer_beats_scratch_on_held_out_digits(tmp_path):
    rows = {r.strategy: r for r in run_demo(shots=10, epochs=3, image_size=48, output=str(tmp_path))}
    assert rows["probe"].split == "test"
    assert rows["probe"].accuracy > 0.5  # ten digits: chance is 0.1
    assert rows["probe"].accuracy > rows["scratch"].accuracy + 0.1
    assert rows["finetune"].accuracy > rows["scratch"].accuracy + 0.1
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert rows["auto"].chose.startswith(auto["auto"]["chose"]) and auto["auto"]["advice"] in rows["auto"].chose
    assert rows["auto"].accuracy > rows["scratch"].accuracy + 0.1
    assert rows["probe + pool"].split == "test" and "pseudo-labelled" in rows["probe + pool"].chose
    # advise read only train + val (150 images); the fit's probe found them cached and extracted the test digits
    if auto["auto"]["overrides"]["train.strategy"] == "probe":
        assert auto["features"]["cached"] == 150 and auto["features"]["extracted"] == 1797 - 150 - 10 * POOL_PER_CLASS


def test_demo_writes_the_tour_data_as_class_folders(tmp_path):
    from sklearn.datasets import load_digits
    from typer.testing import CliRunner

    from graft.cli import app

    result = CliRunner().invoke(app, ["demo", "--write-data", str(tmp_path / "digits")])
    assert result.exit_code == 0, result.output
    counts = {split: sum(1 for _ in (tmp_path / "digits" / split).rglob("*.png")) for split in ("train", "val", "test")}
    assert counts == {"train": 100, "val": 50, "test": len(load_digits().target) - 150}
    assert sorted(p.name for p in (tmp_path / "digits" / "train").iterdir()) == [str(d) for d in range(10)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(app, ["demo", "--write-data", str(mine)])
    assert refused.exit_code == 2 and (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1
