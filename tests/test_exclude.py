"""`graft fit --exclude FILE`: the listed files are left out or relabelled, exactly; the run records it; resume keeps
it; a listed path cannot climb out of the dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_config

from graft.data.discovery import discover
from graft.data.exclusions import append_decision, apply_exclusions, read_listed
from graft.errors import GraftError
from graft.training.fitting import fit
from graft.training.state import Hooks


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def files(shapes: Path, split: str, kind: str) -> list[str]:
    """The fixture's files of one class, as names relative to the data folder (counted from the disk, not graft)."""
    return sorted(f"{split}/{kind}/{name.name}" for name in (shapes / split / kind).iterdir())


def test_a_label_issues_csv_excludes_every_listed_file_and_applies_no_suggestion(shapes, tmp_path):
    listed = files(shapes, "train", "circle")[:3] + files(shapes, "train", "square")[:2]
    issues = write_csv(tmp_path / "label_issues.csv", ["path", "given", "suggested", "score"],
                       [[path, "circle", "triangle", "0.9"] for path in listed])
    splits, record = apply_exclusions(discover(shapes), [str(issues)])
    kept = {str(Path(path).relative_to(shapes)) for path, _ in splits.train}
    on_disk = {path for kind in ("circle", "square", "triangle") for path in files(shapes, "train", kind)}
    assert kept == on_disk - set(listed)
    assert record.count("exclude") == 5 and record.count("relabel") == 0 and not record.missing
    assert len(splits.val) == len(discover(shapes).val)  # nothing listed there


def test_decisions_relabel_exclude_and_keep_with_the_last_row_winning(shapes, tmp_path):
    circles, squares = files(shapes, "train", "circle"), files(shapes, "train", "square")
    decisions = tmp_path / "decisions.csv"
    append_decision(decisions, circles[0], "exclude")
    append_decision(decisions, circles[1], "relabel", "triangle")
    append_decision(decisions, squares[0], "exclude")
    append_decision(decisions, squares[0], "keep")  # changed their mind: the later row wins
    append_decision(decisions, str((shapes / files(shapes, "val", "square")[0]).resolve()), "relabel", "circle")
    before = discover(shapes)
    splits, record = apply_exclusions(before, [str(decisions)])
    labels = {str(Path(path).relative_to(shapes)): splits.classes[label] for path, label in splits.train + splits.val}
    assert circles[0] not in labels and labels[circles[1]] == "triangle" and labels[squares[0]] == "square"
    assert labels[files(shapes, "val", "square")[0]] == "circle"  # an absolute path, in val: applied there too
    assert len(splits.train) == len(before.train) - 1 and len(splits.val) == len(before.val)
    assert record.summary()["by_split"] == {"train": {"excluded": 1, "relabelled": 1},
                                            "val": {"excluded": 0, "relabelled": 1}}


def test_paths_outside_the_dataset_are_refused_or_ignored(shapes, tmp_path):
    outside = write_csv(tmp_path / "list.csv", ["path"], [["/etc/passwd"], [files(shapes, "train", "circle")[0]],
                                                          ["train/circle/no-such.png"]])
    splits, record = apply_exclusions(discover(shapes), [str(outside)])
    assert record.count("exclude") == 1 and record.missing == ["/etc/passwd", "train/circle/no-such.png"]
    assert "warning: 2 listed path(s) are not in the dataset" in record.lines()[1]
    climbing = write_csv(tmp_path / "climb.csv", ["path"], [["train/circle/000.png"], ["../../etc/passwd"]])
    with pytest.raises(GraftError, match=r"climb\.csv, line 3: .*'\.\.'"):
        apply_exclusions(discover(shapes), [str(climbing)])


@pytest.mark.parametrize("header, row, message", [
    (["path", "decision", "label"], ["train/circle/000.png", "delete", ""], "line 2: decision 'delete'"),
    (["path", "decision", "label"], ["train/circle/000.png", "relabel", ""], "line 2: relabel without a label"),
    (["path", "decision", "label"], ["train/circle/000.png", "relabel", "dog"], "line 2: label 'dog' is not one"),
    (["file", "label"], ["train/circle/000.png", "circle"], "no path column in the header"),
    (["path"], ["train/circle/000.png", "extra"], "line 2: more cells than the header"),
])
def test_a_malformed_list_is_one_line_naming_the_file_and_line(shapes, tmp_path, header, row, message):
    bad = write_csv(tmp_path / "bad.csv", header, [row])
    with pytest.raises(GraftError, match="bad.csv") as caught:
        apply_exclusions(discover(shapes), [str(bad)])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_path_label_csv_relabels_and_an_empty_label_excludes(tmp_path):
    listed = write_csv(tmp_path / "fix.csv", ["path", "label"], [["a.png", "cat"], ["b.png", ""]])
    assert [(item.path, item.decision, item.label) for item in read_listed(listed)] == [
        ("a.png", "relabel", "cat"), ("b.png", "exclude", "")]


def test_fit_exclude_trains_without_the_files_records_them_and_resumes_on_the_same_list(shapes, tmp_path):
    circles, squares = files(shapes, "train", "circle"), files(shapes, "train", "square")
    decisions = tmp_path / "decisions.csv"
    for path in circles[:4]:
        append_decision(decisions, path, "exclude")
    append_decision(decisions, squares[0], "relabel", "circle")
    append_decision(decisions, "/etc/passwd", "exclude")
    config = tiny_config(shapes, tmp_path / "run", **{"train.strategy": "finetune", "train.head_fit": "epochs",
                                                      "train.head_epochs": 0, "train.epochs": 2,
                                                      "data.exclude": str(decisions)})

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, hooks=Hooks(on_epoch_end=stop), verbose=False)
    append_decision(decisions, squares[1], "exclude")  # the list changed under the interrupted run
    with pytest.raises(GraftError, match="changed since the run started"):
        fit(config, resume=True, verbose=False)
    lines = decisions.read_text().splitlines()
    decisions.write_text("\n".join(lines[:-1]) + "\n")  # restored
    result = fit(config, resume=True, verbose=False)
    run = result.run_dir
    counts = json.loads((run / "data_report.json").read_text())["counts"]["train"]
    per_class = {kind: len(files(shapes, "train", kind)) for kind in ("circle", "square", "triangle")}
    assert counts == {"circle": per_class["circle"] - 4 + 1, "square": per_class["square"] - 1,
                      "triangle": per_class["triangle"]}
    rows = list(csv.DictReader(open(run / "excluded.csv")))
    assert sorted((str(Path(r["path"]).relative_to(shapes)), r["action"], r["label"]) for r in rows) == sorted(
        [(path, "exclude", "") for path in circles[:4]] + [(squares[0], "relabel", "circle")])
    for record in (result.metrics["exclusions"], json.loads((run / "graft.json").read_text())["exclusions"]):
        assert (record["excluded"], record["relabelled"], record["not_in_data"]) == (4, 1, 1)
    assert json.loads((run / "metrics.json").read_text())["exclusions"]["lists"] == [str(decisions)]


def test_the_python_api_takes_the_lists_as_a_list():
    from graft.training.arguments import config_from_arguments

    assert config_from_arguments("data", {"exclude": ["a.csv", "b.csv"]}).data.exclude == "a.csv,b.csv"
