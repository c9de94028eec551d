"""`graft fit --timings`: each phase's wall seconds printed at the end and recorded in metrics.json."""

from __future__ import annotations

import json

from conftest import TINY
from typer.testing import CliRunner

from graft.cli import app

PROBE = ["--backbone", TINY, "--no-pretrained", "--strategy", "probe", "--image-size", "32", "--workers", "0"]


def test_fit_timings_are_printed_and_recorded_phase_by_phase(shapes, tmp_path):
    result = CliRunner().invoke(app, ["fit", str(shapes), *PROBE, "--cache", str(tmp_path / "cache"),
                                      "--timings", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    timings = json.loads((tmp_path / "run" / "metrics.json").read_text())["timings"]
    # the probe's phases in the order they ran: no epochs, so no training phase
    assert list(timings) == ["start-up", "model", "scan", "extraction", "solve", "evaluation", "outputs", "total"]
    assert all(seconds >= 0 for seconds in timings.values())
    phases = sum(seconds for name, seconds in timings.items() if name != "total")
    assert abs(phases - timings["total"]) < 0.01  # the phases cover the run without gaps or overlaps
    line = next(line for line in result.output.splitlines() if line.startswith("timings: "))
    assert f"extraction {timings['extraction']:.2f} s" in line and line.endswith(f"total {timings['total']:.2f} s")


def test_fit_without_timings_records_none(shapes, tmp_path):
    result = CliRunner().invoke(app, ["fit", str(shapes), *PROBE, "--cache", str(tmp_path / "cache"),
                                      "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "timings" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "timings: " not in result.output
