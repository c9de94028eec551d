"""The served page and the report in headless Chromium (Debian's, driven by Playwright): no console errors, no
request leaving 127.0.0.1, the upload flow names the trained class, a bad file shows its one-line error, and a class
named as markup stays text. Screenshots land in each test's tmp folder (the README's come from a real run:
docs/screenshots.py).

Skipped, with the reason, where no Chromium or no Playwright is found (tests/browser_support.py: find_chromium).
"""

from __future__ import annotations

import io
import os
import random
from urllib.parse import urlsplit

import pytest
from browser_support import HOSTILE, TWO_COLOURS, colour_image, find_chromium, live_server, make_two_colours
from conftest import tiny_config

from graft.deploy.serve import ServeConfig, create_app

CHROMIUM, FOUND = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=FOUND)
# What Chromium itself logs for a 4xx answer to fetch(); the bad-file test expects exactly this one.
REFUSED = "Failed to load resource: the server responded with a status of 415 (Unsupported Media Type)"


@pytest.fixture(scope="module")
def colours_run(tmp_path_factory):
    """A tiny run probed on two flat colours (the second class named as markup), with an evaluation report.

    A linear probe (L-BFGS on frozen random features) is deterministic and learns the colours at once; a few
    fine-tuning steps of a random trunk did not reliably separate them."""
    from graft.evaluation.scoring import evaluate
    from graft.training.fitting import fit

    data = make_two_colours(tmp_path_factory.mktemp("colours") / "colours", train=16, val=4)
    config = tiny_config(data, tmp_path_factory.mktemp("runs") / "colours",
                         **{"train.strategy": "probe", "data.batch_size": 8})
    run = fit(config, verbose=False).run_dir
    evaluate(run, data, device="cpu")
    return run


@pytest.fixture(scope="module")
def server(colours_run):
    with live_server(create_app(colours_run, "cpu", ServeConfig(top_k=2))) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with playwright_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root: no user namespace
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


class Watched:
    """A page whose console errors, uncaught exceptions, dialogs and off-machine requests are recorded."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.page = self.context.new_page()
        self.errors, self.dialogs, self.elsewhere = [], [], []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.context.route("**/*", self._route)

    def _route(self, route):
        url = urlsplit(route.request.url)
        if url.scheme in ("data", "blob") or url.hostname == "127.0.0.1":
            route.continue_()
        else:
            self.elsewhere.append(route.request.url)
            route.abort()

    def check(self, allowed_errors=()):
        assert self.elsewhere == [], "a request left the machine"
        assert self.dialogs == [], "markup in a class name ran as script"
        assert [e for e in self.errors if e not in allowed_errors] == []


@pytest.fixture
def watched(browser):
    watched = Watched(browser)
    yield watched
    watched.context.close()


def png(colour, seed: int = 5) -> bytes:
    buffer = io.BytesIO()
    colour_image(colour, random.Random(seed)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(page, files):
    page.set_input_files("#picker", files)
    page.locator(".card.done").nth(len(files) - 1).wait_for(timeout=15_000)  # a locator: the CSP forbids eval
    return {card.query_selector(".name").inner_text(): card for card in page.query_selector_all(".card")}


def test_the_page_shows_the_model_and_names_uploads_right(server, watched, tmp_path):
    page = watched.page
    page.goto(f"{server}/")
    page.wait_for_selector("#facts dl")
    facts = page.inner_text("#facts")
    assert "test_resnet" in facts and "probe" in facts and "val accuracy" in facts and "2 classes" in facts
    assert HOSTILE in facts, "the markup class name is shown as text"
    cards = upload(page, [{"name": "red.png", "mimeType": "image/png", "buffer": png(TWO_COLOURS["red"])},
                          {"name": "blue.png", "mimeType": "image/png", "buffer": png(TWO_COLOURS[HOSTILE])}])
    assert cards["red.png"].query_selector(".top1").inner_text() == "red"
    assert cards["blue.png"].query_selector(".top1").inner_text() == HOSTILE
    assert len(cards["red.png"].query_selector_all(".label")) == 2  # top_k=2: both classes with their bars
    assert page.query_selector_all("img[src='x']") == [], "no element was made from a class name"
    from graft.evaluation.explain import available

    # the "where it looked" switch shows exactly when the server answers /explain (the explain extra, Captum)
    assert page.is_visible("#report-link") and page.is_visible("#explain-switch") == available()
    page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
    watched.check()


def test_a_bad_file_shows_its_one_line_error_beside_a_good_one(server, watched, tmp_path):
    page = watched.page
    page.goto(f"{server}/")
    cards = upload(page, [{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"just text, not a picture"},
                          {"name": "red.png", "mimeType": "image/png", "buffer": png(TWO_COLOURS["red"], 9)}])
    error = cards["notes.jpg"].query_selector(".error").inner_text()
    assert error.startswith("notes.jpg: not a readable") and "\n" not in error and "Traceback" not in error
    assert cards["notes.jpg"].query_selector(".top1") is None
    assert cards["red.png"].query_selector(".top1").inner_text() == "red"
    page.screenshot(path=str(tmp_path / "serve-page-error.png"), full_page=True)
    watched.check(allowed_errors=(REFUSED,))


def test_a_dropped_file_is_classified_like_a_picked_one(server, watched):
    page = watched.page
    page.goto(f"{server}/")
    transfer = page.evaluate_handle("""bytes => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        return transfer;
    }""", list(png(TWO_COLOURS["red"], 11)))
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.locator(".card.done").wait_for(timeout=15_000)
    assert page.inner_text(".card .name") == "dropped.png" and page.inner_text(".card .top1") == "red"
    watched.check()


def test_the_explain_switch_puts_the_overlay_beside_the_thumbnail(server, watched, tmp_path):
    from graft.evaluation.explain import available

    if not available():
        pytest.skip("the explain extra (Captum) is not installed: the server has no /explain")
    page = watched.page
    page.goto(f"{server}/")
    page.wait_for_selector("#facts dl")
    page.check("#explain")
    cards = upload(page, [{"name": "red.png", "mimeType": "image/png", "buffer": png(TWO_COLOURS["red"], 13)}])
    card = cards["red.png"]
    assert card.query_selector(".top1").inner_text() == "red"
    overlay = card.query_selector("img.overlay")
    assert overlay is not None and overlay.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("() => document.querySelector('img.overlay').complete")  # decoding is asynchronous
    assert overlay.evaluate("i => i.naturalWidth > 0"), "the overlay decodes"
    page.screenshot(path=str(tmp_path / "serve-page-explain.png"), full_page=True)
    watched.check()


def test_the_report_renders_offline(server, watched, tmp_path):
    page = watched.page
    response = page.goto(f"{server}/report")
    assert response.status == 200
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all("img", "all => all.map(i => [i.complete, i.naturalWidth])")
    assert images and all(complete and width > 0 for complete, width in images), "every plot decodes"
    assert HOSTILE in page.inner_text("body")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 1000
    watched.check()


def test_the_review_page_shows_hostile_names_as_text_and_a_click_writes_the_decision(colours_run, watched, tmp_path):
    """`graft serve RUN --audit OUT`: suspects with thumbnails, markup in paths and labels shown as text, a confirm
    click appended to OUT/decisions.csv (graft.deploy.review)."""
    import csv
    import json
    from pathlib import Path

    data = Path(json.loads((colours_run / "graft.json").read_text())["config"]["data"]["path"])
    suspect, twin = f"train/{HOSTILE}/000.png", f"train/{HOSTILE}/001.png"
    out = tmp_path / "audit"
    out.mkdir()
    (out / "audit.json").write_text(json.dumps({"data": str(data)}))
    with open(out / "label_issues.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "given", "suggested", "score"], [suspect, HOSTILE, "red", "0.9"],
                                      ["../../etc/passwd", "red", HOSTILE, "0.5"]])
    with open(out / "duplicates.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path_a", "path_b", "similarity", "kind"], [suspect, twin, "0.99", "near"]])
    with live_server(create_app(colours_run, "cpu", audit=out)) as base:
        page = watched.page
        page.goto(f"{base}/review")
        page.wait_for_selector("#issues .card")
        cards = page.query_selector_all("#issues .card")
        assert len(cards) == 2 and len(page.query_selector_all("#pairs .card img")) == 2
        assert f"given: {HOSTILE}" in cards[0].inner_text() and suspect in cards[0].inner_text()
        # the thumbnail loaded: wait until the browser has finished with it (a loaded machine is slow), then look
        page.wait_for_function("() => document.querySelector('#issues .card img').complete")
        assert cards[0].eval_on_selector("img", "image => image.naturalWidth") > 0
        assert cards[1].query_selector("img") is None and "no thumbnail" in cards[1].inner_text()
        assert cards[1].query_selector("button") is None  # nothing to decide for a path outside the dataset
        assert page.query_selector_all("img[src='x']") == [], "no element was made from a name"
        cards[0].query_selector("button").click()  # confirm: relabel to the suggestion
        page.wait_for_selector("#issues .card .decided:has-text('decided: relabel red')")
        page.screenshot(path=str(tmp_path / "review-page.png"), full_page=True)
    rows = list(csv.DictReader(open(out / "decisions.csv")))
    assert [(row["path"], row["decision"], row["label"]) for row in rows] == [(suspect, "relabel", "red")]
    watched.check()
