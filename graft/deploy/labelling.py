"""``graft serve RUN --label POOL``: label a pool's images in the browser, into a CSV manifest ``graft fit`` reads.

- ``GET /``: the page (graft/deploy/label_page.py).
- ``GET /label/items``: the run's classes and the images to label (the suggested ones in the order suggested, or the
  whole pool), each with an id, its name inside the pool and any label it already has.
- ``GET /label/image/N``: a JPEG preview of image N, only when it is one of the pool's images and, links followed, a
  file inside the pool's folder; anything else is 404. No URL names a path, so none can climb out.
- ``POST /label`` (JSON ``{"id": N, "label": CLASS}``): records the decision and rewrites the labels file whole
  (temp file + rename), so it is never half-written; labelling an image again replaces its label.

The labels file has the columns ``path,label`` (absolute paths), the CSV manifest format of ``graft fit``. graft
continues a labels file it wrote (or any file of exactly those two columns, keeping every row) and refuses anything
else. Nothing moves, renames or writes the pool's images.
"""

import csv  # no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime
import io
import os
import threading
from pathlib import Path

from graft.data.images import load_image
from graft.data.pool import Pool, inside, read_pool
from graft.deploy.label_page import LABEL_PAGE, LABEL_PAGE_HEADERS
from graft.deploy.labelsets import refuse_one_label_mode
from graft.deploy.page import SECURITY_HEADERS
from graft.errors import GraftError
from graft.evaluation.report import shown_path
from graft.models.run_folder import read_card
from graft.utils.files import atomic_write
from graft.utils.text import display_name

__all__ = [
    "LABEL_COLUMNS", "PREVIEW", "LabelBook", "create_label_app", "default_labels_file", "read_suggested",
    "serve_labelling"
]

LABEL_COLUMNS = ["path", "label"]
PREVIEW = 320  # pixels, longer side of the images the page shows


class LabelBook:
    """The labels file: {absolute path: class}, read at start and rewritten atomically on every decision."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise GraftError(f"{self.path}: --labels-out names a folder; name a CSV file, e.g. {self.path}/labels.csv")
        self.labels: dict[str, str] = self._read() if self.path.exists() else {}
        self.lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        refuse = (f"{self.path}: exists and is not a labels file graft wrote (columns path,label); choose another "
                  "--labels-out, graft does not write over it")
        try:
            text = self.path.read_text(encoding="utf-8", errors="surrogateescape")
            rows = list(csv.reader(io.StringIO(text)))
        except (OSError, csv.Error):
            raise GraftError(refuse) from None
        if not rows or rows[0] != LABEL_COLUMNS or any(len(row) != 2 for row in rows[1:]):
            raise GraftError(refuse)
        return dict((path, label) for path, label in rows[1:])

    def set(self, path: str, label: str) -> int:
        """Records ``label`` for ``path`` and rewrites the file; returns how many images are labelled."""
        with self.lock:
            self.labels[path] = label
            rows = list(self.labels.items())
            atomic_write(self.path, lambda temp: _write_rows(temp, rows))
            return len(rows)


def _write_rows(temp: str, rows: list[tuple[str, str]]) -> None:
    # raw names (no spreadsheet quoting): graft fit reads these labels back as class names, byte for byte
    with open(temp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)


def default_labels_file(pool: Pool) -> Path:
    """``labels.csv`` in the current folder, unless that folder lies in the pool's: graft writes inside a user's pool
    only where they said so."""
    if Path.cwd().resolve().is_relative_to(os.path.realpath(pool.root)):
        raise GraftError(f"the current folder lies inside the pool {pool.source}, and graft does not write into it "
                         "unasked: name the labels file with --labels-out FILE")
    return Path("labels.csv")


def read_suggested(path: str | os.PathLike, pool: Pool) -> tuple[list[str], dict[str, str]]:
    """(the pool's images a ``suggestions.csv`` lists, in its order; {path: predicted class}). The file is data: rows
    naming images outside the pool are skipped, never shown."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, csv.Error) as error:
        raise GraftError(f"{path}: could not be read as a suggestions CSV ({error}); pass the file graft suggest "
                         "wrote") from None
    if not rows or "path" not in rows[0]:
        raise GraftError(f"{path}: expected the columns path,predicted,score that graft suggest writes")
    listed = {os.path.abspath(row["path"] or ""): row.get("predicted") or "" for row in rows}
    chosen = [item for item in listed if item in pool.listed]
    if not chosen:
        raise GraftError(f"{path}: none of its {len(listed)} images is in the pool {pool.source}; pass the pool the "
                         "suggestions were made from")
    return chosen, {item: listed[item] for item in chosen}


def create_label_app(run: str | os.PathLike, pool: str | os.PathLike, labels_out: str | os.PathLike | None = None,
                     suggestions: str | os.PathLike | None = None):
    """The FastAPI application labelling ``pool`` (a folder, glob or CSV) with ``run``'s classes into ``labels_out``
    (default ``labels.csv`` in the current folder, refused when that folder lies in the pool's).

    Args:
        suggestions: a ``suggestions.csv`` from ``graft suggest``: only its images, in its order, with its predictions.
    """
    try:
        from fastapi import FastAPI
    except ImportError:
        raise GraftError("graft serve needs FastAPI and uvicorn: pip install 'graft[serve]'") from None
    refuse_one_label_mode(run, "--label")
    classes = list(read_card(run)["classes"])
    images = read_pool(pool)
    order, predicted = read_suggested(suggestions, images) if suggestions else (images.paths, {})
    book = LabelBook(labels_out if labels_out is not None else default_labels_file(images))
    app = FastAPI(title="graft label", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.book, app.state.count = book, len(order)
    _add_routes(app, classes, images, order, predicted, book)
    return app


def _add_routes(app, classes: list[str], pool: Pool, order: list[str], predicted: dict[str, str],
                book: LabelBook) -> None:
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    shown = {display_name(name): name for name in classes}  # the page sends back the names it was shown

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(LABEL_PAGE, headers=LABEL_PAGE_HEADERS)

    @app.get("/label/items")
    def items():
        return {"classes": list(shown), "pool": display_name(pool.source), "file": display_name(str(book.path)),
                "items": [{"id": index, "name": display_name(shown_path(path, pool.root)),
                           "predicted": display_name(predicted.get(path, "")),
                           "label": display_name(book.labels.get(path, ""))} for index, path in enumerate(order)]}

    @app.get("/label/image/{index}")
    def image(index: str):
        if not index.isdigit() or int(index) >= len(order) or not inside(pool, order[int(index)]):
            return JSONResponse({"error": "no such image in the pool"}, status_code=404)
        try:
            picture = load_image(order[int(index)])
        except Exception:  # noqa: BLE001 - unreadable or changed since listed: nothing to show, the server lives on
            return JSONResponse({"error": "the image could not be read"}, status_code=404)
        picture.thumbnail((PREVIEW, PREVIEW))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=85)
        return Response(buffer.getvalue(), media_type="image/jpeg", headers=SECURITY_HEADERS)

    @app.post("/label")
    async def label(request: Request):
        try:
            body = await request.json()
        except ValueError:
            body = None
        index, name = (body.get("id"), body.get("label")) if isinstance(body, dict) else (None, None)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(order):
            return JSONResponse({"error": "expected JSON {\"id\": N, \"label\": CLASS} with an id from "
                                          "/label/items"}, status_code=400)
        if name not in shown:
            return JSONResponse({"error": f"label must be one of the run's classes: {', '.join(shown)}"},
                                status_code=400)
        try:
            count = book.set(order[index], shown[name])
        except GraftError as error:
            return JSONResponse({"error": display_name(str(error))}, status_code=500)
        return {"labelled": count, "file": display_name(str(book.path))}


def serve_labelling(run: str | os.PathLike, pool: str | os.PathLike, labels_out: str | os.PathLike | None = None,
                    suggestions: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 8000,
                    log=None) -> None:
    """Runs the labelling server until interrupted (Ctrl-C); ``log`` gets one line saying what it serves."""
    try:
        import uvicorn
    except ImportError:
        raise GraftError("graft serve needs FastAPI and uvicorn: pip install 'graft[serve]'") from None
    app = create_label_app(run, pool, labels_out, suggestions)
    book: LabelBook = app.state.book
    if log:
        log(f"label: {app.state.count} images from {pool}; labels go to {book.path} ({len(book.labels)} already); "
            f"open http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="info")
