"""The page on ``GET /`` and the report on ``GET /report``, over HTTP without a browser (tests/test_browser.py runs
them in headless Chromium): self-contained, a CSP that allows exactly the inline code, the run's facts, and no way
from a URL to any other file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket

import httpx
import pytest
from browser_support import live_server

from graft.deploy.page import PAGE
from graft.deploy.serve import create_app
from graft.evaluation.scoring import evaluate


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """A copy of the shared trained run (this module writes a report into it)."""
    copy = tmp_path_factory.mktemp("page-run") / "shapes"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture(scope="module")
def server(run):
    with live_server(create_app(run, "cpu")) as base:
        yield base


def raw_get(base: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side normalisation of ``..`` or ``%2f``)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("ascii"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_small_self_contained_and_its_csp_allows_exactly_its_own_code(server):
    response = httpx.get(f"{server}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert page == PAGE and len(page.encode()) < 30_000
    policy = response.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert f"script-src {csp_hash(scripts[0])};" in policy and f"style-src {csp_hash(styles[0])};" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "nothing loaded from another host"
    assert "http://" not in page and "https://" not in page and "@import" not in page and "url(" not in page
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in scripts[0], f"{sink}: class names are user data and go into the DOM as text only"


def test_metadata_carries_the_facts_the_page_shows(server, run):
    metadata = httpx.get(f"{server}/metadata").json()
    metrics = json.loads((run / "metrics.json").read_text())
    (facts,) = metadata["facts"]
    assert facts["backbone"] == "test_resnet" and facts["strategy"] == "finetune" and facts["run"] == "shapes"
    assert facts["val"]["accuracy"] == metrics["val"]["accuracy"] and facts["val"]["images"] == 30
    assert facts["val"]["top3_accuracy"] == metrics["val"]["top3_accuracy"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", facts["trained"])
    # the page's "/explain" switch reads this; /explain is served when the explain extra (Captum) is installed
    assert metadata["endpoints"] == ["/explain", "/health", "/metadata", "/predict"]
    assert metadata["classes"] == ["circle", "square", "triangle"]


def test_report_is_404_until_evaluate_writes_one_then_served(server, run, shapes):
    before = httpx.get(f"{server}/report")
    assert before.status_code == 404
    assert before.json() == {"error": "no report.html in the run folder: run `graft evaluate RUN DATA` to write one"}
    assert httpx.get(f"{server}/metadata").json()["report"] is False
    metrics = evaluate(run, shapes, device="cpu")  # writes RUN/eval-shapes/report.html
    response = httpx.get(f"{server}/report")
    assert response.status_code == 200 and response.content == open(metrics["report"], "rb").read()
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "img-src data:" in policy and "script-src" not in policy
    assert httpx.get(f"{server}/metadata").json()["report"] is True


@pytest.mark.parametrize("target", [
    "/report/../graft.json", "/..%2fgraft.json", "/report/..%2f..%2fgraft.json", "/report%2f..%2fgraft.json",
    "/%2e%2e/graft.json", "/graft.json", "/metrics.json", "/model.safetensors", "/eval-shapes/report.html",
    "/report/graft.json", "/./graft.json", "//etc/passwd", "/report/..\\graft.json",
])
def test_no_url_reaches_another_file(server, target):
    status, body = raw_get(server, target)
    assert status in (400, 404), (target, status)
    assert b"format_version" not in body and b"root:" not in body
    if status == 404:
        assert "error" in json.loads(body)


def test_a_query_string_does_not_choose_the_file(server, run):
    status, body = raw_get(server, "/report?path=../graft.json")
    assert b"format_version" not in body
    if status == 200:
        assert body.startswith(b"<!doctype html") or b"<html" in body[:200]


def test_a_symlinked_report_is_not_followed(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    (copy / "eval-x").mkdir()
    os.symlink(copy / "graft.json", copy / "eval-x" / "report.html")
    from fastapi.testclient import TestClient

    with TestClient(create_app(copy, "cpu")) as client:
        response = client.get("/report")
    assert response.status_code == 404 and "no report.html" in response.json()["error"]


def test_unknown_paths_and_methods_get_the_one_line_json_error(server):
    missing = httpx.get(f"{server}/nothing-here")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found: GET /nothing-here"}
    wrong = httpx.get(f"{server}/predict")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed: GET /predict"}


def test_explain_answers_an_overlay_the_page_can_show_and_the_errors_of_predict(server, shapes):
    image = next((shapes / "val" / "square").iterdir())
    with open(image, "rb") as handle:
        answer = httpx.post(f"{server}/explain", files={"file": (image.name, handle, "image/png")}, timeout=60)
    assert answer.status_code == 200
    (row,) = answer.json()["explanations"]
    predicted = httpx.post(f"{server}/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()
    assert row["file"] == image.name and row["labels"] == predicted["predictions"][0]["labels"]
    assert row["target"] == row["labels"][0]
    prefix = "data:image/png;base64,"
    assert row["overlay"].startswith(prefix)
    import io

    from PIL import Image

    overlay = Image.open(io.BytesIO(base64.b64decode(row["overlay"][len(prefix):])))
    assert overlay.format == "PNG" and overlay.size == Image.open(image).size  # small images keep their size
    bad = httpx.post(f"{server}/explain", files={"file": ("notes.jpg", b"not an image", "image/jpeg")})
    assert bad.status_code == 415 and "notes.jpg" in bad.json()["error"]
