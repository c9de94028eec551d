"""`graft serve RUN --audit OUT`: the review page lists an audit's suspects, serves thumbnails only of listed files
inside the dataset, and appends decisions to OUT/decisions.csv, which `graft fit --exclude` then reads."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from graft.data.discovery import discover
from graft.data.exclusions import apply_exclusions
from graft.deploy.review_page import REVIEW_PAGE
from graft.deploy.serve import create_app

HOSTILE = "<img src=x onerror=alert(1)>"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def audit(tmp_path) -> tuple[Path, Path]:
    """A dataset (circle/, square/, a link leading out of it) and an audit folder listing inside and hostile paths."""
    data, out = tmp_path / "data", tmp_path / "audit"
    for kind, colour in (("circle", (220, 40, 40)), ("square", (40, 180, 60))):
        (data / kind).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (64, 48), colour).save(data / kind / f"{index}.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "outside.png")  # a real image, outside the dataset
    (data / "circle" / "link.png").symlink_to(tmp_path / "outside.png")
    out.mkdir()
    (out / "audit.json").write_text(json.dumps({"data": str(data)}))
    write_csv(out / "label_issues.csv", ["path", "given", "suggested", "score"], [
        ["circle/0.png", "circle", "square", "0.93"],
        [f"circle/{HOSTILE}.png", HOSTILE, "square", "0.9"],
        ["/etc/passwd", "circle", "square", "0.8"],
        ["../../etc/passwd", "circle", "square", "0.7"],
        [str(tmp_path / "outside.png"), "circle", "square", "0.6"],
        ["circle/link.png", "circle", "square", "0.5"],
    ])
    write_csv(out / "duplicates.csv", ["path_a", "path_b", "similarity", "kind"],
              [["square/0.png", "square/1.png", "0.998", "near"]])
    return data, out


@pytest.fixture
def client(trained_run, audit):
    from fastapi.testclient import TestClient

    with TestClient(create_app(trained_run, "cpu", audit=audit[1])) as client:
        yield client


def test_the_page_is_static_text_only_and_its_csp_allows_exactly_its_script(client):
    response = client.get("/review")
    assert response.status_code == 200
    script = re.search(r"<script>(.*)</script>", response.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = response.headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}'" in policy and "unsafe-inline" not in policy and "img-src 'self';" in policy
    assert "innerHTML" not in REVIEW_PAGE and "insertAdjacentHTML" not in REVIEW_PAGE  # names go in as text
    assert HOSTILE not in response.text


def test_thumbnails_only_for_listed_files_inside_the_dataset(client, audit):
    items = client.get("/review/items").json()
    issues = {row["path"]: row for row in items["label_issues"]}
    assert issues[f"circle/{HOSTILE}.png"]["given"] == HOSTILE  # JSON text; the page sets it as textContent
    for hostile in ("/etc/passwd", "../../etc/passwd", str(audit[0].parent / "outside.png"), "circle/link.png",
                    f"circle/{HOSTILE}.png"):
        assert issues[hostile]["thumb"] is None, hostile
    pair = items["duplicates"][0]
    numbers = [issues["circle/0.png"]["thumb"], pair["a"]["thumb"], pair["b"]["thumb"]]
    assert sorted(numbers) == [0, 1, 2]
    for number, expected in zip(numbers, ("circle/0.png", "square/0.png", "square/1.png")):
        response = client.get(f"/review/thumb/{number}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.getpixel((0, 0))[:3] == Image.open(audit[0] / expected).convert("RGB").getpixel((0, 0))
    for url in ("/review/thumb/3", "/review/thumb/-1", "/review/thumb/..%2F..%2Fetc%2Fpasswd",
                "/review/thumb/%2Fetc%2Fpasswd"):
        assert client.get(url).status_code in (404, 422), url


def test_a_decision_is_appended_and_fit_exclude_reads_it(client, audit):
    data, out = audit
    items = client.get("/review/items").json()
    issue = next(row for row in items["label_issues"] if row["path"] == "circle/0.png")
    pair = items["duplicates"][0]
    for body in ({"item": issue["id"], "decision": "relabel", "label": "square"},
                 {"item": pair["b"]["id"], "decision": "exclude"}):
        response = client.post("/review/decide", json=body)
        assert response.status_code == 200, response.text
    rows = list(csv.DictReader(open(out / "decisions.csv")))
    assert [(r["path"], r["decision"], r["label"]) for r in rows] == [("circle/0.png", "relabel", "square"),
                                                                      ("square/1.png", "exclude", "")]
    splits, record = apply_exclusions(discover(data), [str(out / "decisions.csv")])
    labels = {str(Path(path).relative_to(data)): splits.classes[label] for path, label in splits.train + splits.val}
    assert labels.get("circle/0.png") == "square" and "square/1.png" not in labels
    assert (record.count("exclude"), record.count("relabel")) == (1, 1)
    assert client.get("/review/items").json()["label_issues"][issue["id"]]["decision"] == "relabel square"


def test_bad_decisions_are_refused_and_write_nothing(client, audit):
    out = audit[1]
    items = client.get("/review/items").json()
    inside = next(row for row in items["label_issues"] if row["path"] == "circle/0.png")["id"]
    hostile = next(row for row in items["label_issues"] if row["path"] == "../../etc/passwd")["id"]
    refused = [
        (client.post("/review/decide", data={"item": inside, "decision": "exclude"}), 403),  # a cross-site form
        (client.post("/review/decide", json={"item": inside, "decision": "exclude"},
                     headers={"origin": "http://evil.example"}), 403),
        (client.post("/review/decide", json={"item": inside, "decision": "relabel", "label": "dog"}), 422),
        (client.post("/review/decide", json={"item": inside, "decision": "delete"}), 422),
        (client.post("/review/decide", json={"item": inside, "decision": "relabel", "label": ["red"]}), 422),
        (client.post("/review/decide", json={"item": hostile, "decision": "exclude"}), 422),
        (client.post("/review/decide", json={"item": 999, "decision": "exclude"}), 422),
        (client.post("/review/decide", content=b"[", headers={"content-type": "application/json"}), 400),
    ]
    assert [response.status_code for response, _ in refused] == [status for _, status in refused]
    assert not (out / "decisions.csv").exists()
