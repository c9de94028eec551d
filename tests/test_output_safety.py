"""Issue 10 part 1: graft never deletes a user's files, and every folder-writing command checks its output first."""

import json

import pytest
from synthetic import make_shapes
from typer.testing import CliRunner

from graft.cli.shared import app
from graft.utils.files import write_json
from graft.utils.outputs import MANIFEST, TEMP_PREFIX, read_manifest, remove_temp_files

runner = CliRunner()
DOTFILES = (".env.local", ".eslintrc.json", ".gitlab-ci.yml", ".pre-commit-config.yaml")
FIT = ["--backbone", "test_resnet", "--no-pretrained", "--strategy", "scratch", "--epochs", 1, "--image-size", 32,
       "--workers", 0, "--batch-size", 16]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *words):
    """One `error:` line naming what is wrong, no traceback, a failing exit status."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code != 0 and "error:" in result.output and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, result.output
    return result


def snapshot(folder):
    """Every path under ``folder`` with its bytes: what "nothing lost, nothing changed" compares."""
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def data(tmp_path):
    return make_shapes(tmp_path / "data", per_class=6, seed=3)


@pytest.fixture
def project(tmp_path):
    """A user's project folder: source, hidden files with two dots in their names, a sub-folder."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('mine')\n")
    for name in DOTFILES:
        (root / name).write_text(f"{name}\n")
    return root


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_folder_never_loses_its_dotfiles(data, project, overwrite):
    before = snapshot(project)
    result = invoke("fit", data, "-o", project, *FIT, *(["--overwrite"] if overwrite else []))
    refused(result, "not a folder graft wrote" if overwrite else "not empty")
    assert snapshot(project) == before


def test_overwrite_of_the_working_folder_is_refused_and_removes_nothing(data, project, monkeypatch):
    monkeypatch.chdir(project)
    before = snapshot(project)
    refused(invoke("fit", data, "-o", ".", *FIT, "--overwrite"), "--overwrite only replaces graft's own output")
    assert snapshot(project) == before


@pytest.mark.parametrize("where, relation", [("data", "is the data"), ("parent", "contains the data"),
                                             ("inside", "lies inside the data")])
def test_output_overlapping_the_data_is_refused_before_anything_is_written(data, where, relation):
    output = {"data": data, "parent": data.parent, "inside": data / "circle"}[where]
    before = snapshot(data.parent)
    refused(invoke("fit", data, "-o", output, *FIT, "--overwrite"), relation)
    assert snapshot(data.parent) == before


def test_output_inside_the_feature_cache_is_refused(data, tmp_path):
    cache = tmp_path / "cache"
    refused(invoke("fit", data, "-o", cache / "run", *FIT, "--cache", cache), "lies inside the feature cache")
    refused(invoke("features", data, "-b", "test_resnet", "--no-pretrained", "--cache", cache, "-o", cache),
            "is the feature cache")
    assert not cache.exists()


def test_overwrite_of_a_run_removes_graft_files_and_keeps_the_users(data, tmp_path):
    run = tmp_path / "run"
    assert invoke("fit", data, "-o", run, *FIT).exit_code == 0
    assert {"graft.json", "model.safetensors", "metrics.json"} <= set(read_manifest(run))
    write_json(run / "stale.json", {"from": "an earlier graft command"})  # graft's: recorded, so removable
    (run / "notes.txt").write_text("mine")
    (run / ".env.local").write_text("SECRET=1")
    refused(invoke("fit", data, "-o", run, *FIT), "--overwrite")  # not empty: refused without --overwrite
    result = invoke("fit", data, "-o", run, *FIT, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (run / "notes.txt").read_text() == "mine" and (run / ".env.local").read_text() == "SECRET=1"
    assert not (run / "stale.json").exists() and (run / "model.safetensors").is_file()
    assert "notes.txt" not in read_manifest(run) and "model.safetensors" in read_manifest(run)


def test_temp_clean_up_removes_only_graft_temp_files_only_in_graft_folders(tmp_path):
    user, run = tmp_path / "user", tmp_path / "run"
    for folder in (user, run):
        folder.mkdir()
        for name in (*DOTFILES, f"{TEMP_PREFIX}model.safetensors.abc123"):
            (folder / name).write_text("x")
    (run / "graft.json").write_text("{}")
    remove_temp_files(user)
    remove_temp_files(run)
    assert {p.name for p in user.iterdir()} == {*DOTFILES, f"{TEMP_PREFIX}model.safetensors.abc123"}  # not graft's
    assert {p.name for p in run.iterdir()} == {*DOTFILES, "graft.json"}


def test_atomic_write_temp_files_carry_the_graft_prefix(tmp_path):
    from pathlib import Path

    from graft.utils.files import atomic_write

    seen = []
    atomic_write(tmp_path / "x.json", lambda temp: (seen.append(temp), Path(temp).write_text("{}")))
    assert Path(seen[0]).name.startswith(f"{TEMP_PREFIX}x.json.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # a user's folder gets no manifest


def test_output_naming_an_existing_file_is_refused(data, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    refused(invoke("fit", data, "-o", target, *FIT), "existing file")
    refused(invoke("stats", data, "-o", target), "existing file")
    assert target.read_text() == "mine"


def test_fit_into_an_unwritable_folder_is_refused_before_the_scan(data, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("mine")  # tests run as root: a path under a regular file is what cannot be written
    result = refused(invoke("fit", data, "-o", blocker / "out", *FIT), "which is a file")
    assert "scan" not in result.output and blocker.read_text() == "mine"


def test_export_checks_its_folder_before_the_work(trained_run, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    result = refused(invoke("export", trained_run, "-o", blocker / "out"), "which is a file")
    assert "folded" not in result.output  # refused before the batch-norm folding, the first piece of work
    user = tmp_path / "mine"
    user.mkdir()
    (user / ".eslintrc.json").write_text("{}")
    refused(invoke("export", trained_run, "-o", user, "--overwrite"), "not a folder graft wrote")
    assert [p.name for p in user.iterdir()] == [".eslintrc.json"]
    refused(invoke("export", trained_run, "-o", trained_run), "the run folder itself")


def test_export_overwrite_replaces_its_own_files_only(trained_run, tmp_path):
    out = tmp_path / "exported"
    assert invoke("export", trained_run, "-o", out, "--format", "safetensors").exit_code == 0
    (out / "README.txt").write_text("mine")
    refused(invoke("export", trained_run, "-o", out, "--format", "safetensors"), "--overwrite")
    result = invoke("export", trained_run, "-o", out, "--format", "safetensors", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "README.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_evaluate_output_never_writes_into_a_users_folder(trained_run, shapes, tmp_path):
    user = tmp_path / "results"
    user.mkdir()
    (user / "metrics.json").write_text("my own numbers")
    refused(invoke("evaluate", trained_run, shapes / "val", "--output", user, "--no-report"), "graft did not make")
    assert (user / "metrics.json").read_text() == "my own numbers"
    refused(invoke("evaluate", trained_run, shapes / "val", "--output", user / "metrics.json"), "existing file")
    refused(invoke("evaluate", trained_run, shapes / "val", "--output", shapes / "val" / "out"), "inside the data")
    out = tmp_path / "eval"
    for _ in range(2):  # graft's own folder: a rerun replaces its files in place
        assert invoke("evaluate", trained_run, shapes / "val", "--output", out, "--no-report").exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["images"] == 30
    assert {"metrics.json", "predictions.csv"} <= set(read_manifest(out))


def test_every_other_writing_command_checks_its_folder_first(trained_run, shapes, tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    bad = blocker / "out"
    commands = [
        ["features", shapes, "-b", "test_resnet", "--no-pretrained", "-o", bad],
        ["probe", shapes, "--backbones", "test_resnet", "--no-pretrained", "-o", bad],
        ["compare", shapes, "-b", "test_resnet", "--strategies", "scratch", "--epochs", 1, "-o", bad],
        ["diagnose", trained_run, shapes, "-o", bad],
        ["stats", shapes, "-o", bad],
        ["lr-find", shapes, "-b", "test_resnet", "--no-pretrained", "-o", bad],
    ]
    for args in commands:
        refused(invoke(*args), "which is a file")
    assert blocker.read_text() == "x"


def test_compare_refuses_a_users_folder_as_a_strategy_run(shapes, tmp_path):
    out = tmp_path / "cmp"
    (out / "scratch").mkdir(parents=True)
    (out / "scratch" / ".gitlab-ci.yml").write_text("stages: []\n")
    refused(invoke("compare", shapes, "-b", "test_resnet", "--strategies", "scratch", "--epochs", 1, "--image-size",
                   32, "-o", out), "graft did not make")
    assert (out / "scratch" / ".gitlab-ci.yml").read_text() == "stages: []\n"


def test_stats_output_is_graft_folder_rewritten_in_place(shapes, tmp_path):
    out = tmp_path / "stats"
    for _ in range(2):
        result = invoke("stats", shapes, "--size", 16, "--max-images", 20, "-o", out)
        assert result.exit_code == 0, result.output
    assert set(read_manifest(out)) == {"stats.json", "mean_image.png"} and (out / MANIFEST).is_file()


@pytest.mark.parametrize("where", ["data", "inside"])
def test_a_feature_cache_in_the_data_is_refused_and_writes_nothing(data, tmp_path, where):
    cache = data if where == "data" else data / "train" / "cache"
    before = sorted(p for p in data.rglob("*"))
    refused(invoke("features", data, "-b", "test_resnet", "--no-pretrained", "--image-size", 32, "--cache", cache),
            "--cache", "the data")
    assert sorted(p for p in data.rglob("*")) == before


@pytest.mark.parametrize("blank", [" ", "\t"])
def test_blank_folder_names_are_refused(data, tmp_path, monkeypatch, blank):
    monkeypatch.chdir(tmp_path)
    refused(invoke("features", data, "-b", "test_resnet", "--no-pretrained", "--image-size", 32, "--cache", blank),
            "is blank")
    refused(invoke("fit", data, "-o", blank, *FIT), "is blank")
    assert not (tmp_path / blank).exists()
