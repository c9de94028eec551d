import json

import pytest
from typer.testing import CliRunner

from graft.cli.shared import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_layers_lists_stage_nodes_with_receptive_fields():
    result = invoke("layers", "test_resnet", "--size", 64)
    assert result.exit_code == 0, result.output
    assert "layer3" in result.output and "192x4x4" in result.output and "pre_logits" in result.output


def test_fit_writes_a_run_and_prints_metrics(shapes, tmp_path):
    result = invoke("fit", shapes, "-o", tmp_path / "run", "--backbone", "test_resnet", "--no-pretrained",
                    "--strategy", "probe", "--epochs", 1, "--image-size", 32, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.safetensors").is_file() and "val" in result.output


def test_fit_reads_yaml_and_flags_override_it(shapes, tmp_path):
    config = tmp_path / "graft.yaml"
    config.write_text("model:\n  backbone: test_resnet\n  pretrained: false\ndata:\n  image_size: 32\n  workers: 0\n"
                      "train:\n  strategy: probe\n  epochs: 3\n")
    result = invoke("fit", shapes, "-o", tmp_path / "run", "--config", config, "--epochs", 1, "--stem-lr-ratio", 0.3,
                    "--head-fit", "epochs", "--bn-stats", "frozen", "--balance", "loss")
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "run" / "graft.json").read_text())
    assert card["config"]["train"]["epochs"] == 1 and card["config"]["train"]["strategy"] == "probe"
    assert card["config"]["train"]["stem_lr_ratio"] == 0.3 and card["config"]["train"]["head_fit"] == "epochs"
    assert card["config"]["train"]["bn_stats"] == "frozen" and card["config"]["train"]["balance"] == "loss"


def test_errors_are_one_line_without_traceback(tmp_path):
    result = invoke("fit", tmp_path / "missing", "-o", tmp_path / "run")
    assert result.exit_code == 2
    assert "error:" in result.output and "no such folder" in result.output and "Traceback" not in result.output
    result = invoke("fit", tmp_path, "--strategy", "magic")
    assert result.exit_code == 2 and "choose one of probe, finetune, scratch" in result.output


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_predict_formats(trained_run, shapes, fmt):
    result = invoke("predict", trained_run, shapes / "val" / "triangle", "--top-k", 2, "--format", fmt,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    if fmt == "csv":
        lines = result.stdout.strip().splitlines()
        assert lines[0] == "path,label1,prob1,label2,prob2,error" and len(lines) == 11
    elif fmt == "json":
        rows = json.loads(result.stdout)
        assert len(rows) == 10 and set(rows[0]) == {"path", "labels", "probabilities", "error"}
    else:
        assert "triangle" in result.output


def test_predict_needs_a_run_folder(shapes):
    result = invoke("predict", shapes, "x.png")
    assert result.exit_code == 2 and "not a run folder" in result.output


def test_evaluate_prints_report(trained_run, shapes, tmp_path):
    result = invoke("evaluate", trained_run, shapes, "--output", tmp_path / "e", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "confusion matrix" in result.output and "macro F1" in result.output
    assert (tmp_path / "e" / "metrics.json").is_file()


def test_resume_and_overwrite_through_the_cli(shapes, tmp_path):
    run = tmp_path / "run"
    args = ["fit", shapes, "-o", run, "--backbone", "test_resnet", "--no-pretrained", "--strategy", "probe",
            "--epochs", 1, "--image-size", 32, "--workers", 0]
    assert invoke(*args).exit_code == 0
    assert "--overwrite" in invoke(*args).output
    result = invoke("fit", "--resume", "-o", run)
    assert result.exit_code == 2 and "already complete" in result.output
    card = json.loads((run / "graft.json").read_text())
    (run / "graft.json").write_text(json.dumps({**card, "status": "training"}))  # as if killed mid-run
    (run / "model.safetensors").rename(run / "checkpoint.safetensors")  # wrong content: must be refused cleanly
    result = invoke("fit", "--resume", "-o", run)
    assert result.exit_code == 2 and "damaged checkpoint" in result.output
    assert invoke(*args, "--overwrite").exit_code == 0


def test_demo_on_a_users_folder(shapes, tmp_path):
    result = invoke("demo", "--data", shapes, "--epochs", 1, "--image-size", 32, "-o", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert all(s in result.output for s in ("scratch", "probe", "finetune"))
    assert (tmp_path / "demo" / "finetune" / "model.safetensors").is_file()
