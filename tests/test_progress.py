"""Slow commands show progress: off a terminal, a timed line saying what, how far, how fast and how long is left
(GRAFT_PROGRESS_SECONDS sets the interval; a tiny one prints a line at every step)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from graft.cli import app
from graft.utils.progress import Progress

runner = CliRunner()
TINY = ["-b", "test_resnet", "--no-pretrained", "--image-size", "32"]


@pytest.fixture
def every_step(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAFT_PROGRESS_SECONDS", "1e-9")
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))


def _lines(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def test_a_plain_progress_line_says_what_how_far_how_fast_and_how_long(monkeypatch):
    monkeypatch.setenv("GRAFT_PROGRESS_SECONDS", "1e-9")
    seen = []
    with Progress("work", 10, "steps", seen.append) as progress:
        progress.update(4, "loss 0.5")
    assert re.fullmatch(r"work: 4/10 steps, loss 0\.5, [\d.]+ steps/s, about \d+s left", seen[0]), seen


def test_features_shows_the_extraction_as_it_goes(shapes, every_step):
    result = runner.invoke(app, ["features", str(shapes), *TINY, "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    counts = [int(re.match(r"features: (\d+)/(\d+) images", line).group(1))
              for line in _lines(result.output, "features: ") if "/" in line.split(",")[0]]
    total = sum(1 for _ in shapes.rglob("*.png"))
    assert counts == sorted(counts) and counts[0] == 8 and counts[-1] == total and len(counts) >= total // 8


def test_advise_shows_its_extraction_and_its_probes(shapes, every_step):
    result = runner.invoke(app, ["advise", str(shapes), *TINY])
    assert result.exit_code == 0, result.output
    assert _lines(result.output, "features: ") and _lines(result.output, "advise: linear probes: 1/")


def test_lr_find_shows_its_steps(shapes, every_step, tmp_path):
    result = runner.invoke(app, ["lr-find", str(shapes), *TINY, "--steps", "12", "--strategy", "scratch",
                                 "-o", str(tmp_path / "lr")])
    assert result.exit_code == 0, result.output
    steps = _lines(result.output, "lr-find: ")
    assert steps[0].startswith("lr-find: 1/12 steps, lr 1.0e-07 loss ") and len(steps) >= 10


def test_probe_checks_every_backbone_before_extracting_any(shapes, every_step, tmp_path):
    result = runner.invoke(app, ["probe", str(shapes), "--backbones", "test_resnet,no_such_net_v9", "--no-pretrained",
                                 "--image-size", "32"])
    assert result.exit_code == 2, result.output
    assert "no_such_net_v9" in result.output and not _lines(result.output, "features")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))


def test_evaluate_and_the_scan_show_their_progress(trained_run, shapes, every_step, tmp_path):
    result = runner.invoke(app, ["evaluate", str(trained_run), str(shapes), "-o", str(tmp_path / "eval"),
                                 "--no-report"])
    assert result.exit_code == 0, result.output
    assert _lines(result.output, "evaluate: ")[-1].startswith("evaluate: 30/30 images")  # the val split: 3 x 10
    total = sum(1 for _ in shapes.rglob("*.png"))
    scanned = runner.invoke(app, ["features", str(shapes), *TINY])  # every_step: a new, empty scan cache
    assert scanned.exit_code == 0, scanned.output
    assert _lines(scanned.output, "scan: decoding: ")[-1].startswith(f"scan: decoding: {total}/{total} files")


def test_stats_and_shard_show_their_progress(shapes, every_step, tmp_path):
    total = sum(1 for _ in (shapes / "train").rglob("*.png"))
    stats = runner.invoke(app, ["stats", str(shapes)])
    assert stats.exit_code == 0, stats.output
    assert _lines(stats.output, "statistics: ")[-1].startswith(f"statistics: {total}/{total} images")
    shard = runner.invoke(app, ["shard", str(shapes), "-o", str(tmp_path / "shards"), "--shard-size", "20KB"])
    assert shard.exit_code == 0, shard.output
    written = _lines(shard.output, "shard: train: ")
    assert len(written) >= 2 and written[-1].startswith(f"shard: train: {total}/{total} images")


def test_a_comparison_says_which_strategy_it_is_on(shapes, tmp_path):
    from graft.analysis.comparison import compare_strategies

    lines = []
    overrides = {"model.pretrained": False, "data.image_size": 32, "data.workers": 0}
    compare_strategies(shapes, "test_resnet", tmp_path / "cmp", ("probe", "scratch"), epochs=1, overrides=overrides,
                       log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["probe (1/2)", "probe (1/2)", "scratch (2/2)", "scratch (2/2)"]
    assert lines[0] == "probe (1/2): training test_resnet" and re.match(r"probe \(1/2\): val accuracy [\d.]+ in \d+s",
                                                                          lines[1])
