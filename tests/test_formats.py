"""Images and data (issue 10, parts 2, 4 and 5): the format allow-list on every path that reads an image, with a
logging stand-in ``gs`` first on PATH; sparse multi-GB files; malformed CSV manifests; names that are not UTF-8 or
that a spreadsheet would run; ``skipped_files.txt`` records; decoder warnings; streamed predictions."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import httpx
import pytest
from conftest import tiny_config
from PIL import EpsImagePlugin, Image
from synthetic import make_shapes, shape_image
from test_serve import server  # noqa: F401 - the live server fixture, reused for the upload test
from typer.testing import CliRunner

from graft.cli.shared import app
from graft.data.discovery import discover
from graft.data.images import ALLOWED_FORMATS, MAX_FILE_BYTES, decode_image, load_image
from graft.data.scan import _check_file, scan
from graft.errors import GraftError
from graft.evaluation.inference import iter_predictions, predict
from graft.evaluation.scoring import evaluate
from graft.utils.text import display_name, unescape_field

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
PS = b"%!PS-Adobe-3.0\n/Helvetica findfont 12 scalefont setfont 72 72 moveto (hello) show showpage\n"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
# content → the format the refusal names; PostScript is EPS to Pillow (same signature), PDF it cannot open at all
HOSTILE = {"eps.jpg": (EPS, "EPS"), "ps.png": (PS, "EPS"), "noext": (EPS, "EPS"), "pdf.jpg": (PDF, "PDF"),
           "pdf": (PDF, "PDF")}


@pytest.fixture
def gs_log(tmp_path, monkeypatch) -> Path:
    """A stand-in ``gs`` first on PATH that appends its arguments to the returned log file."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gs.log"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{log}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where gs is: look again
    return log


def _hostile_files(folder: Path) -> dict[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (content, _) in HOSTILE.items():
        (folder / name).write_bytes(content)
    return {folder / name: fmt for name, (_, fmt) in HOSTILE.items()}


def _png(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_stand_in_gs_is_what_pillow_would_run(gs_log, tmp_path):
    """The control: without graft's allow-list Pillow hands the file to the logging gs, so the tests below can fail."""
    (tmp_path / "eps.jpg").write_bytes(EPS)
    with pytest.raises(Exception):  # noqa: B017 - whatever Pillow makes of the stand-in's failure
        Image.open(tmp_path / "eps.jpg").load()
    assert gs_log.read_text().strip()


def test_load_and_decode_refuse_other_formats_by_content(gs_log, tmp_path):
    for path, fmt in _hostile_files(tmp_path / "files").items():
        with pytest.raises(GraftError, match=f"^{path}: not an allowed image format \\({fmt}\\); graft reads JPEG, "
                                             "PNG, WebP, BMP, GIF, TIFF$"):
            load_image(path)
        with pytest.raises(GraftError, match=f"not an allowed image format \\({fmt}\\)"):
            decode_image(path.read_bytes(), "upload.jpg")
    assert not gs_log.exists()


def test_scan_and_fit_skip_them_and_skipped_files_keeps_one_record_per_line(gs_log, tmp_path):
    from graft.training.fitting import fit

    data = make_shapes(tmp_path / "data", per_class=6, seed=4)
    hostile = _hostile_files(data / "circle")
    odd = data / "square" / "tab\there\nnewline\\.jpg"  # a name holding a tab, a newline and a backslash
    odd.write_bytes(b"not an image at all")
    result = fit(tiny_config(data, tmp_path / "run", **{"train.strategy": "scratch", "train.epochs": 1}),
                 verbose=False)
    lines = (result.run_dir / "skipped_files.txt").read_text().splitlines()
    records = dict(tuple(unescape_field(field) for field in line.split("\t")) for line in lines)
    assert len(lines) == len(hostile) + 1 and set(records) == {str(p) for p in [*hostile, odd]}
    for path, fmt in hostile.items():
        assert f"not an allowed image format ({fmt})" in records[str(path)]
    assert records[str(odd)].startswith(str(odd)) and "no known image format" in records[str(odd)]
    assert not any("object at 0x" in reason or "gs " in reason for reason in records.values())
    assert not gs_log.exists()


def test_predict_refuses_them_in_the_library_and_the_cli(gs_log, trained_run, tmp_path):
    hostile = _hostile_files(tmp_path / "files")
    rows = {row.path: row for row in predict(trained_run, [str(tmp_path / "files")], device="cpu")}
    for path, fmt in hostile.items():
        assert not rows[str(path)].labels and f"not an allowed image format ({fmt})" in rows[str(path)].error
    result = CliRunner().invoke(app, ["predict", str(trained_run), str(tmp_path / "files"), "--format", "csv",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    errors = {row["path"]: row["error"] for row in csv.DictReader(io.StringIO(result.stdout))}
    assert all(f"not an allowed image format ({fmt})" in errors[str(path)] for path, fmt in hostile.items())
    assert not gs_log.exists()


def test_serve_answers_415_to_an_upload_of_another_format(gs_log, server):  # noqa: F811 - the imported fixture
    for name, (content, fmt) in HOSTILE.items():
        response = httpx.post(f"{server}/predict", files={"file": (name, content, "image/jpeg")})
        assert response.status_code == 415
        assert response.json()["error"].startswith(f"{name}: not an allowed image format ({fmt})")
    response = httpx.post(f"{server}/predict", content=EPS, headers={"content-type": "image/jpeg"})
    assert response.status_code == 415 and "object at 0x" not in response.json()["error"]
    assert not gs_log.exists()


def test_the_exported_standalone_example_refuses_them_too(gs_log, trained_run, tmp_path):
    from graft.deploy.export import export

    out = tmp_path / "export"
    export(trained_run, out, formats=("onnx",), fold_bn=False)
    script = (out / "predict_onnx.py").read_text()
    assert f"ALLOWED_FORMATS = {ALLOWED_FORMATS!r}" in script  # generated from graft's one definition
    hostile = _hostile_files(tmp_path / "files")
    (tmp_path / "files" / "good.png").write_bytes(_png())
    files = [*map(str, hostile), str(tmp_path / "files" / "good.png")]
    run = subprocess.run([sys.executable, str(out / "predict_onnx.py"), *files], capture_output=True, text=True,
                         env=os.environ, check=True)
    assert [line.split("\t")[0] for line in run.stdout.splitlines()] == [files[-1]]
    for path in hostile:
        assert f"{path}: skipped, not an allowed image format" in run.stderr
    assert not gs_log.exists()


def test_a_sparse_multi_gigabyte_file_is_refused_from_stat_alone(tmp_path):
    data = make_shapes(tmp_path / "data", per_class=5, seed=5)
    huge = data / "circle" / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(3 * 2**30)
    tracemalloc.start()
    splits = discover(data)
    report = scan(splits, workers=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [reason for path, reason in report.skipped] == [
        f"{huge}: 3,072 MB is more than graft reads from one image file ({MAX_FILE_BYTES // 2**20} MB); "
        "remove it or make it smaller"]
    assert peak < 50 * 2**20
    with pytest.raises(GraftError, match="3,072 MB is more than graft reads"):
        load_image(huge)


def test_the_leak_check_hashes_a_large_image_in_chunks(tmp_path):
    path = tmp_path / "padded.png"
    path.write_bytes(_png())
    with open(path, "r+b") as handle:
        handle.truncate(300 * 2**20)  # a valid PNG and 300 MB of (sparse) trailing bytes: decodes, then is hashed
    tracemalloc.start()
    digest, reason = _check_file(str(path), None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reason is None and len(digest) == 40 and peak < 20 * 2**20


@pytest.mark.parametrize("row, message", [
    ("x" * (100 * 2**20) + ".png,b", "line 3: a field longer than 131,072 characters .*close the quote"),
    ('"unclosed.png,b\nz.png,c\n' + "w.png,c\n" * 40_000, "line 3: a field longer than"),
    ("ca\0t.png,b", "line 3: the path holds a NUL byte"),
])
def test_a_malformed_manifest_is_one_line_naming_the_csv_and_line(tmp_path, row, message):
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\na.png,a\n{row}\n")
    with pytest.raises(GraftError, match=f"^{manifest}, {message}") as caught:
        discover(manifest)
    assert "\n" not in str(caught.value)
    result = CliRunner().invoke(app, ["fit", str(manifest), "-o", str(tmp_path / "run")])
    assert result.exit_code != 0 and "Traceback" not in result.output and f"{manifest}, line 3" in result.output


def test_decoder_warnings_are_logged_with_the_file_name_even_from_scan_threads(tmp_path, caplog):
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # a description stored past the IFD; cutting the block's end damages it
    damaged = []
    data = make_shapes(tmp_path / "data", per_class=6, seed=6)
    for kind in ("circle", "square"):
        path = data / kind / "damaged-exif.jpg"
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (90, 20, 20)).save(buffer, "JPEG", exif=exif.tobytes()[:-150])
        path.write_bytes(buffer.getvalue())
        damaged.append(path)
    with caplog.at_level(logging.WARNING, logger="graft.data"):
        report = scan(discover(data), workers=4)
        load_image(damaged[0])
    assert not report.skipped  # the pixels are fine: the images are used
    named = sorted({record.getMessage().split(": ")[0] for record in caplog.records})
    assert named == sorted(map(str, damaged))  # each warning names its own file, never another thread's
    assert all("tag 270" in record.getMessage() for record in caplog.records)


def test_pillow_object_reprs_never_reach_a_reason():
    truncated = _png()[:60]
    for content in (b"plain text", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, truncated):
        with pytest.raises(GraftError) as caught:
            decode_image(content, "upload.png")
        assert str(caught.value).startswith("upload.png: ") and "object at 0x" not in str(caught.value)


@pytest.fixture(scope="module")
def odd_names_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): classes named by a non-UTF-8 folder and by spreadsheet formulas, trained for one epoch."""
    from graft.training.fitting import fit

    root = tmp_path_factory.mktemp("odd")
    data = make_shapes(root / "data", per_class=8, seed=7)
    for kind, name in (("circle", b"caf\xe9"), ("square", b"=HYPERLINK(\"x\")"), ("triangle", b"@SUM(A1)")):
        os.rename(os.fsencode(data / kind), os.fsencode(data) + b"/" + name)
    fit(tiny_config(data, root / "run", **{"train.strategy": "scratch", "train.epochs": 1}), verbose=False)
    return data, root / "run"


def test_non_utf8_and_formula_class_names_survive_evaluate(odd_names_run, tmp_path):
    data, run = odd_names_run
    metrics = evaluate(run, data, output=tmp_path / "eval")
    assert "caf\udce9" in metrics["classes"]
    page = (tmp_path / "eval" / "report.html").read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "caf\\xe9" in page
    assert all((tmp_path / "eval" / f"{name}.png").is_file() for name in ("confusion_matrix", "reliability"))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["classes"] == metrics["classes"]
    raw = (tmp_path / "eval" / "predictions.csv").read_bytes()
    assert b"caf\xe9" in raw  # written back as the folder's bytes
    cells = [cell for row in csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"))) for cell in row]
    assert "'=HYPERLINK(\"x\")" in cells and "'@SUM(A1)" in cells
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)


def test_non_utf8_and_formula_class_names_survive_predict_and_the_cli(odd_names_run, tmp_path):
    data, run = odd_names_run
    images = str(data / "caf\udce9")
    assert {row.labels[0] for row in predict(run, [images], device="cpu")} <= set(json.loads(
        (run / "graft.json").read_text())["classes"])
    result = CliRunner().invoke(app, ["predict", str(run), images, "--format", "csv", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    cells = [cell for row in csv.reader(io.StringIO(result.stdout_bytes.decode("utf-8", "surrogateescape")))
             for cell in row]
    assert "'=HYPERLINK(\"x\")" in cells and "caf\udce9" in cells
    assert not any(cell.startswith(("=", "@")) for cell in cells)
    for command in (["predict", str(run), images], ["evaluate", str(run), str(data), "--output", str(tmp_path / "e")]):
        result = CliRunner().invoke(app, command)  # tables: names shown with \xNN escapes
        assert result.exit_code == 0, result.output
        assert "caf\\xe9" in result.output


def test_non_utf8_class_names_in_the_servers_json(odd_names_run):
    from fastapi.testclient import TestClient

    from graft.deploy.serve import ServeConfig, create_app

    data, run = odd_names_run
    image = next((data / "caf\udce9").iterdir()).read_bytes()
    with TestClient(create_app(run, "cpu", ServeConfig(top_k=3))) as client:
        assert "caf\\xe9" in client.get("/metadata").json()["classes"]
        response = client.post("/predict", files={"file": ("a.png", image, "image/png")})
        assert response.status_code == 200
        assert set(response.json()["predictions"][0]["labels"]) == {"caf\\xe9", "=HYPERLINK(\"x\")", "@SUM(A1)"}
    assert display_name("caf\udce9") == "caf\\xe9"


def test_predict_yields_rows_before_the_last_batch_is_computed(trained_run, tmp_path):
    files = []
    for index in range(4):
        files.append(tmp_path / f"{index}.png")
        shape_image("circle", __import__("random").Random(index)).save(files[-1])
    rows = iter_predictions(trained_run, [str(tmp_path)], batch_size=1, device="cpu")
    first = next(rows)
    for later in files[1:]:
        later.unlink()  # had the rows been computed up front, these would have labels
    rest = list(rows)
    assert first.labels and first.path == str(files[0])
    assert [row.path for row in rest] == list(map(str, files[1:])) and all("cannot read file" in row.error
                                                                          for row in rest)


def test_cli_jsonl_and_json_output_stream_one_row_per_line(trained_run, shapes):
    folder = str(shapes / "val" / "circle")
    lines = CliRunner().invoke(app, ["predict", str(trained_run), folder, "--format", "jsonl"]).stdout.splitlines()
    assert len(lines) == 10 and all(set(json.loads(line)) == {"path", "labels", "probabilities", "error"}
                                    for line in lines)
    whole = CliRunner().invoke(app, ["predict", str(trained_run), folder, "--format", "json"]).stdout
    assert [row["path"] for row in json.loads(whole)] == [json.loads(line)["path"] for line in lines]
