"""The prediction server, driven over real HTTP on 127.0.0.1: happy path, bad uploads, concurrency."""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from browser_support import live_server
from PIL import Image

from graft.deploy.serve import EXPLAIN_MAX_FILES, MAX_FILES, RETRY_AFTER_S, ServeConfig, create_app
from graft.evaluation.inference import predict


@pytest.fixture(scope="module")
def server(trained_run):
    """A live uvicorn server on a free loopback port; yields its base URL."""
    config = ServeConfig(max_upload_bytes=200_000, max_pixels=250_000, max_batch=16, max_wait_ms=150, top_k=3)
    with live_server(create_app(trained_run, "cpu", config)) as base:
        yield base


def png(size=(48, 48), colour=(220, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_health_and_metadata(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok"
    metadata = httpx.get(f"{server}/metadata").json()
    assert metadata["classes"] == ["circle", "square", "triangle"]
    assert metadata["preprocessing"]["input_size"] == [32, 32] and metadata["limits"]["max_pixels"] == 250_000


def test_predictions_match_the_library(server, shapes, trained_run):
    files = sorted((shapes / "val" / "triangle").iterdir())[:3]
    response = httpx.post(f"{server}/predict", files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    expected = predict(trained_run, [str(f) for f in files], top_k=3, device="cpu")
    assert [r["file"] for r in rows] == [f.name for f in files]
    for row, reference in zip(rows, expected):
        assert row["labels"] == reference.labels
        assert row["probabilities"] == pytest.approx(reference.probabilities, abs=1e-4)


def test_a_raw_image_body_is_accepted(server):
    response = httpx.post(f"{server}/predict", content=png(), headers={"content-type": "image/png"})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1


@pytest.mark.parametrize("request_kwargs, status, message", [
    ({"files": {"file": ("notes.jpg", b"just text, not a picture", "image/jpeg")}}, 415, "notes.jpg: not a readable"),
    ({"files": {"file": ("empty.png", b"", "image/png")}}, 415, "empty.png: empty file"),
    ({"files": {"file": ("big.png", png((600, 600)), "image/png")}}, 413, "600x600 pixels exceeds the limit"),
    ({"files": {"file": ("huge.bin", b"\0" * 300_000, "image/png")}}, 413, "exceeds the limit of 200000 bytes"),
    ({"files": {"field": (None, "value")}}, 400, "no image in the request"),  # multipart, but no file
    ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "expected multipart/form-data"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, ""),
])
def test_bad_uploads_get_a_4xx_json_error_and_the_server_lives_on(server, request_kwargs, status, message):
    response = httpx.post(f"{server}/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_a_decompression_bomb_is_refused_before_decoding(server):
    from test_hostile import _png_header_only

    response = httpx.post(f"{server}/predict", files={"file": ("bomb.png", _png_header_only(100_000, 100_000))})
    assert response.status_code == 413 and "bomb.png" in response.json()["error"]


def test_concurrent_requests_are_batched_and_all_answered(server):
    before = httpx.get(f"{server}/health").json()
    colours = [(220, 40, 40), (40, 180, 60), (50, 80, 230)] * 4

    def one(colour):
        return httpx.post(f"{server}/predict", files={"file": ("x.png", png(colour=colour), "image/png")}, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, colours))
    assert all(r.status_code == 200 for r in responses)
    after = httpx.get(f"{server}/health").json()
    assert after["images"] - before["images"] == 12
    assert after["batches"] - before["batches"] < 12 and after["largest_batch"] > 1  # requests shared passes


def test_the_cli_refuses_a_missing_run_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "not a graft run folder" in result.output


def test_an_ensembles_metadata_and_predictions_say_what_they_should(trained_run, shapes):
    from fastapi.testclient import TestClient

    app = create_app([trained_run, trained_run], "cpu")
    metadata = json.loads(json.dumps(app.state.predictor.metadata()))  # JSON-serialisable, and unchanged by it
    assert metadata["classes"] == ["circle", "square", "triangle"] and len(metadata["runs"]) == 2
    assert metadata["preprocessing"]["input_size"] == [32, 32]
    files = [sorted((shapes / "val" / name).iterdir())[0] for name in metadata["classes"]]
    with TestClient(app) as client:
        response = client.post("/predict", files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    single = predict(trained_run, [str(f) for f in files], top_k=3, device="cpu")  # two equal members: the same
    assert [row["file"] for row in rows] == [f.name for f in files]
    for row, reference, path in zip(rows, single, files):
        assert sorted(row["labels"]) == metadata["classes"], "all three classes, each once"
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
        assert row["labels"][0] == reference.labels[0]
        assert row["probabilities"] == pytest.approx(reference.probabilities, abs=1e-4)
    right = [row["labels"][0] == path.parent.name for row, path in zip(rows, files)]
    assert sum(right) >= 2, f"the trained run names most val shapes right: {rows}"


def _partial_upload(base: str, path: str, declared: int = 150_000) -> socket.socket:
    """A socket that has sent the headers and the start of a multipart body announcing ``declared`` bytes, and stops."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=cut\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    part = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    sock.sendall(head + part + png()[:60])
    return sock


def _wait_for(base: str, key: str, value: int) -> dict:
    """/health once its ``key`` reaches ``value`` (the server notices a socket's news on its own loop, soon after)."""
    for _ in range(2400):
        health = httpx.get(f"{base}/health").json()
        if health.get(key, 0) >= value:
            return health
        time.sleep(0.05)
    return health


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_gone_mid_upload_is_one_quiet_line_not_a_server_error(server):
    records = _Records()
    loggers = [logging.getLogger("uvicorn"), logging.getLogger("graft")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        before = httpx.get(f"{server}/health").json()
        _partial_upload(server, "/predict").close()
        after = _wait_for(server, "disconnects", before.get("disconnects", 0) + 1)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert after.get("disconnects") == before.get("disconnects", 0) + 1
    assert after["errors"] == before["errors"], "a client hanging up is not a server error"
    assert [record for record in records.records if record.exc_info] == [], "no traceback"
    assert len([record for record in records.records if "disconnected" in record.getMessage()]) <= 1
    assert httpx.post(f"{server}/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
def test_no_api_description_is_served(server, path):
    response = httpx.get(f"{server}{path}")
    assert response.status_code == 404 and response.json() == {"error": f"Not Found: GET {path}"}


def test_a_request_with_more_files_than_allowed_gets_413_in_one_line(server):
    many = [("file", (f"{index}.png", png(), "image/png")) for index in range(MAX_FILES + 1)]
    response = httpx.post(f"{server}/predict", files=many)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == (f"more than {MAX_FILES} files or fields in one request to /predict (its "
                                        "limit); send the images in several requests")
    assert httpx.post(f"{server}/predict", files=many[:MAX_FILES]).status_code == 200


@pytest.fixture(scope="module")
def explain_server(trained_run):
    """One /explain at a time and none waiting: a stalled upload fills it."""
    pytest.importorskip("captum", reason="graft[explain] (captum) is not installed: no /explain")
    config = ServeConfig(max_upload_bytes=200_000, top_k=3, explain_concurrency=1, explain_queue=0)
    with live_server(create_app(trained_run, "cpu", config)) as base:
        yield base


def test_explain_takes_fewer_files_than_predict(explain_server):
    files = [("file", (f"{index}.png", png((40, 40), (30 * index, 90, 90)), "image/png"))
             for index in range(EXPLAIN_MAX_FILES + 1)]
    response = httpx.post(f"{explain_server}/explain", files=files, timeout=60)
    assert response.status_code == 413, response.text
    assert response.json()["error"].startswith(f"more than {EXPLAIN_MAX_FILES} files or fields in one request to "
                                               "/explain")
    answer = httpx.post(f"{explain_server}/explain", files=files[:EXPLAIN_MAX_FILES], timeout=60)
    assert answer.status_code == 200 and len(answer.json()["explanations"]) == EXPLAIN_MAX_FILES
    assert httpx.post(f"{explain_server}/predict", files=files).status_code == 200  # /predict's own limit


def test_a_busy_explain_answers_503_with_retry_after_and_predict_goes_on(explain_server):
    one = [("file", ("x.png", png(), "image/png"))]
    before = httpx.get(f"{explain_server}/health").json()
    stalled = _partial_upload(explain_server, "/explain")  # takes the one place, then uploads nothing more
    try:
        _wait_for(explain_server, "requests", before["requests"] + 1)
        busy = httpx.post(f"{explain_server}/explain", files=one, timeout=60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == str(RETRY_AFTER_S)
        assert busy.json()["error"].startswith("busy: 1 /explain requests are already running or waiting")
        assert httpx.post(f"{explain_server}/predict", files=one, timeout=60).status_code == 200
    finally:
        stalled.close()
    _wait_for(explain_server, "disconnects", before.get("disconnects", 0) + 1)
    assert httpx.post(f"{explain_server}/explain", files=one, timeout=60).status_code == 200  # the place is free
