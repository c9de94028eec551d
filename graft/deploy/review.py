"""`graft serve RUN --audit OUT`: a page where a person confirms or rejects what `graft audit` suspects.

It reads only these parts of an audit folder (the formats other tools read too):

- ``OUT/label_issues.csv``: ``path,given,suggested,score`` (most suspicious first);
- ``OUT/duplicates.csv``: ``path_a,path_b,similarity,kind``;
- ``OUT/audit.json``: its ``data`` field, the dataset the audit read (``--data`` when it has none, or to override it).

Each decision is one row appended to ``OUT/decisions.csv`` (``path,decision,label``: what ``graft fit --exclude``
reads; the path as the audit wrote it), rewritten atomically. The user's images are never moved or edited.

Thumbnails are served by number, never by a path in the URL, and only for files that a listed row names AND that lie
inside the dataset's folder (resolved, links included): a row naming ``/etc/passwd`` or ``../../x`` is listed as text
and gets no thumbnail. A thumbnail is the image decoded and re-encoded small, so a file that is not an image is never
sent.
"""

import io  # no `from __future__ import annotations` here: FastAPI reads the routes' annotations at runtime
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from graft.data.exclusions import DECISIONS, append_decision, read_csv_rows, read_listed
from graft.data.images import load_image
from graft.errors import GraftError
from graft.utils.files import read_json_object
from graft.utils.limits import SERVE_MAX_PIXELS
from graft.utils.outputs import contained
from graft.utils.text import display_name

__all__ = ["AUDIT_FILES", "DECISIONS_FILE", "MAX_ROWS", "Review", "THUMBNAIL_SIDE", "add_review_routes", "load_review"]

AUDIT_FILES = ("label_issues.csv", "duplicates.csv")
DECISIONS_FILE = "decisions.csv"
MAX_ROWS = 2000  # suspects shown per list: the most suspicious first, as the audit sorts them
THUMBNAIL_SIDE = 160


@dataclass
class Review:
    """An audit folder's suspects, the files a thumbnail may be made of, and the decisions file."""

    out: Path
    root: Path  # the dataset's folder, resolved
    classes: list[str]
    issues: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # thumbnail id → file inside ``root``
    paths: list[str] = field(default_factory=list)  # decision id → the path as the audit wrote it
    inside: list[bool] = field(default_factory=list)  # decision id → whether it names a file inside ``root``
    lock: threading.Lock = field(default_factory=threading.Lock)  # one append at a time

    @property
    def decisions(self) -> Path:
        return self.out / DECISIONS_FILE

    def items(self) -> dict:
        """What the page shows (every name through ``display_name``: JSON must be valid Unicode)."""
        last = self._last_decisions()
        for row in self.issues + [side for pair in self.pairs for side in (pair["a"], pair["b"])]:
            row["decision"] = last.get(self.paths[row["id"]])
        return {"classes": [display_name(name) for name in self.classes], "label_issues": self.issues,
                "duplicates": self.pairs, "decisions": display_name(str(self.decisions)),
                "data": display_name(str(self.root))}

    def _last_decisions(self) -> dict[str, str]:
        if not self.decisions.is_file():
            return {}
        try:
            return {item.path: item.decision + (f" {display_name(item.label)}" if item.label else "")
                    for item in read_listed(self.decisions)}
        except GraftError:  # a hand-edited decisions.csv: the page still works; --exclude will say what is wrong
            return {}

    def decide(self, item: object, decision: object, label: object) -> None:
        """Appends one decision for suspect ``item`` (a number from ``items``) to the decisions CSV."""
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < len(self.paths):
            raise GraftError("no such suspect: 'item' must be a number the page listed")
        if not self.inside[item]:  # --exclude would refuse a list naming it (``..``) or find nothing to change
            raise GraftError("this listed path is not a file inside the dataset; nothing to decide")
        if decision not in DECISIONS:
            raise GraftError(f"'decision' must be one of {', '.join(DECISIONS)}")
        names = {display_name(name): name for name in self.classes}
        if decision == "relabel" and (not isinstance(label, str) or label not in names):
            raise GraftError("'label' must be one of the model's classes")
        with self.lock:
            append_decision(self.decisions, self.paths[item], decision, names[label] if decision == "relabel" else "")

    def thumbnail(self, number: int) -> bytes:
        """A small PNG of thumbnail ``number``'s file; GraftError when there is no such thumbnail or no image."""
        if not 0 <= number < len(self.files):
            raise GraftError("no such thumbnail")
        image = load_image(self.files[number], SERVE_MAX_PIXELS)  # ImageError for a non-image or a bomb
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def _root(out: Path, data: str | os.PathLike | None) -> Path:
    """The dataset's folder: ``data`` if given, else audit.json's ``data``; a CSV manifest stands for its folder."""
    if data is None:
        data = read_json_object(out / "audit.json").get("data")
        if not isinstance(data, str) or not data:
            raise GraftError(f"{out}: no audit.json with a data field; pass --data DATA (the dataset the audit read)")
    root = Path(data)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise GraftError(f"{data}: the audit's dataset folder is not here; pass --data DATA")
    return root.resolve()


def _inside(root: Path, raw: str) -> Path | None:
    """The file a listed path names when it lies inside ``root`` (after resolving links), else None."""
    if not raw or "\0" in raw:
        return None
    try:
        path = Path(raw) if Path(raw).is_absolute() else contained(root, raw, nested=True, links=True)
        resolved = path.resolve()
    except (GraftError, OSError, RuntimeError):
        return None
    return resolved if resolved.is_relative_to(root) and resolved.is_file() else None


def _suspect(review: Review, raw: str, extra: dict) -> dict:
    """One listed file: its decision id, its thumbnail id (None outside the dataset) and what the page shows."""
    file = _inside(review.root, raw)
    review.paths.append(raw)
    review.inside.append(file is not None)
    thumb = None
    if file is not None:
        review.files.append(file)
        thumb = len(review.files) - 1
    return {"id": len(review.paths) - 1, "path": display_name(raw), "thumb": thumb, **extra}


def load_review(out: str | os.PathLike, classes: list[str], data: str | os.PathLike | None = None) -> Review:
    """Reads an audit folder (at least one of its CSVs) for the review page.

    Raises:
        GraftError: no audit CSV in ``out``, a malformed one (file and line), or no dataset folder.
    """
    out = Path(out)
    present = [name for name in AUDIT_FILES if (out / name).is_file()]
    if not present:
        raise GraftError(f"{out}: no {' or '.join(AUDIT_FILES)}; pass the folder graft audit -o wrote")
    review = Review(out, _root(out, data), list(classes))
    if "label_issues.csv" in present:
        rows = read_csv_rows(out / "label_issues.csv", ("path", "given", "suggested", "score"),
                             "graft audit's label_issues.csv (path,given,suggested,score)")
        for row in rows[:MAX_ROWS]:
            review.issues.append(_suspect(review, row["path"].strip(), {
                "given": display_name(row["given"]), "suggested": display_name(row["suggested"]),
                "score": display_name(row["score"])}))
    if "duplicates.csv" in present:
        rows = read_csv_rows(out / "duplicates.csv", ("path_a", "path_b", "similarity", "kind"),
                             "graft audit's duplicates.csv (path_a,path_b,similarity,kind)")
        for row in rows[:MAX_ROWS]:
            review.pairs.append({"a": _suspect(review, row["path_a"].strip(), {}),
                                 "b": _suspect(review, row["path_b"].strip(), {}),
                                 "similarity": display_name(row["similarity"]), "kind": display_name(row["kind"])})
    return review


def _same_origin(request) -> bool:
    """A decision comes from this server's own page: a JSON body (a cross-site form cannot send one without a CORS
    preflight, which this server never grants) and, where the browser names it, this server's origin."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def add_review_routes(app, review: Review) -> None:
    """``GET /review`` (the page), ``GET /review/items``, ``GET /review/thumb/N`` and ``POST /review/decide``."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from graft.deploy.page import SECURITY_HEADERS
    from graft.deploy.review_page import REVIEW_HEADERS, REVIEW_PAGE

    @app.get("/review", include_in_schema=False)
    async def page():
        return HTMLResponse(REVIEW_PAGE, headers=REVIEW_HEADERS)

    @app.get("/review/items")
    def items():
        return JSONResponse(review.items(), headers=SECURITY_HEADERS)

    @app.get("/review/thumb/{number}", include_in_schema=False)
    def thumbnail(number: int):
        try:
            return Response(review.thumbnail(number), media_type="image/png", headers=SECURITY_HEADERS)
        except GraftError:
            return JSONResponse({"error": f"no thumbnail {number}"}, status_code=404)

    @app.post("/review/decide")
    async def decide(request: Request):
        if not _same_origin(request):
            return JSONResponse({"error": "decisions are JSON from this server's own page"}, status_code=403)
        body = await request.body()
        if len(body) > 64 * 1024:
            return JSONResponse({"error": "a decision is a small JSON object"}, status_code=413)
        try:
            answer = json.loads(body)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
            review.decide(answer.get("item"), answer.get("decision"), answer.get("label"))
        except ValueError:
            return JSONResponse({"error": "expected JSON {item, decision, label}"}, status_code=400)
        except GraftError as error:
            return JSONResponse({"error": display_name(str(error))}, status_code=422)
        return {"saved": display_name(str(review.decisions))}
