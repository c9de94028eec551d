"""A small prediction server: FastAPI + uvicorn over a run folder (or an ensemble of them).

- ``POST /predict``: multipart upload of one or more images (any field name), or one image as the raw body with an
  ``image/*`` content type. Returns top-k labels and probabilities per image (a multi-label run: each image's label
  set and every class's sigmoid probability against its threshold, graft.deploy.labelsets).
- ``GET /health``: liveness and counters (requests, batches, the largest batch run).
- ``GET /metadata``: classes, preprocessing, limits, each run's facts (backbone, validation numbers, when trained),
  the endpoints served and whether there is a report.
- ``GET /``: a self-contained web page (graft/deploy/page.py) that sends dropped images to ``/predict``.
- ``GET /report``: the run's newest ``report.html`` (from ``graft evaluate``); nothing else from the file system.
- ``POST /explain`` (when the explain extra, Captum, is installed): the same upload as ``/predict``, at most
  ``explain_max_files`` images; each image's Grad-CAM overlay (at most 512 px) as a PNG data URI with the top-k it
  explains; the page shows it beside the thumbnail. At most ``explain_concurrency`` explanations run at once and
  ``explain_queue`` more wait; beyond that the answer is 503 with ``Retry-After``, so explanations never crowd out
  ``/predict``.

Concurrent requests are batched: a single inference task collects images until ``max_batch`` or ``max_wait_ms``
and runs them in one forward pass on one worker thread (with ``--runtime onnx``, on ``onnx_threads()`` of ONNX
Runtime's intra-op threads). Bad input never reaches the model and never crashes the
server: more bytes than ``max_upload_bytes`` → 413, more pixels than ``max_pixels`` (decompression bombs) → 413,
not an image → 415, no image → 400, more files than allowed → 413; every error is JSON ``{"error": "..."}``. A
client that goes away mid-upload is one log line and a count in ``/health`` (``disconnects``), not an error.
"""

import asyncio  # no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from graft.data.images import ImageError, PixelLimitError, decode_image
from graft.data.prefetch import usable_cores
from graft.data.transforms import TTAViews
from graft.deploy.explaining import RETRY_AFTER_S, Gate, explanations
from graft.deploy.labelsets import add_explain_refusal, label_set_metadata, label_set_row, refuse_one_label_mode
from graft.deploy.page import PAGE, PAGE_HEADERS, REPORT_HEADERS, latest_report, run_facts
from graft.deploy.review import add_review_routes, load_review
from graft.deploy.uploads import ApiError, read_uploads
from graft.errors import GraftError
from graft.evaluation.explain import OVERLAY_SIDE
from graft.evaluation.explain import available as explain_available
from graft.evaluation.inference import load_ensemble, runtime_members
from graft.utils.limits import SERVE_MAX_PIXELS
from graft.utils.text import display_name

__all__ = [
    "ApiError", "Counters", "EXPLAIN_MAX_FILES", "Gate", "MAX_FILES", "MAX_PIXELS", "MAX_UPLOAD_BYTES", "OVERLAY_SIDE",
    "Predictor", "RETRY_AFTER_S", "ServeConfig", "create_app", "onnx_threads", "serve"
]

log = logging.getLogger(__name__)


MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = SERVE_MAX_PIXELS
MAX_FILES = 64  # images per request
EXPLAIN_MAX_FILES = 4  # images per /explain request: each costs a gradient pass and an overlay


@dataclass
class ServeConfig:
    """Limits and batching; the defaults suit one CPU or GPU box behind a proxy."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    max_files: int = MAX_FILES
    max_batch: int = 32
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for company
    top_k: int = 5
    tta: str | None = None
    runtime: str = "torch"  # torch, onnx (ONNX Runtime on each run's verified export) or auto
    explain_max_files: int = EXPLAIN_MAX_FILES
    explain_concurrency: int = 2  # /explain requests decoding and explaining at once
    explain_queue: int = 8  # more /explain requests waiting for a turn (their bodies read); beyond that 503


@dataclass
class _Pending:
    images: torch.Tensor  # (n, views, 3, H, W)
    future: asyncio.Future


@dataclass
class Counters:
    requests: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0
    disconnects: int = 0  # clients gone before their upload was read: neither an answer nor an error
    errors: dict[int, int] = field(default_factory=dict)


def onnx_threads(cores: int | None = None) -> int:
    """ONNX Runtime's intra-op threads under ``graft serve`` (``--runtime onnx``): the usable cores less a third.

    Unlike ``predict``, a server decodes while it computes: the decoder threads, the event loop reading uploads and
    the batching task run beside every forward. ONNX Runtime's default (a thread per core, spinning while idle) keeps
    every core busy between batches too, so each decode and each answer waits behind it, which is the tail latency
    under many clients. So a third of the cores (at least one) is left to decoding and HTTP, and since a count is
    given the session's idle threads sleep instead of spinning (``graft.models.onnx_engine``). On two cores: one.
    """
    cores = max(1, cores or usable_cores())
    return max(1, cores - max(1, cores // 3))


class Predictor:
    """Models, their preprocessing and the batching queue."""

    def __init__(self, run_dirs, device: str, config: ServeConfig):
        self.runs, self.device, self.models = load_ensemble(run_dirs, device, label_sets=True, command="graft serve")
        self.thresholds = self.models[0].thresholds  # a multi-label run's (one run, never an ensemble); else None
        self.config = config
        self.views = TTAViews(self.models[0].preprocessing, config.tta)
        self.per_view = runtime_members(self.runs, self.models, self.device, config.runtime, log.warning,
                                        onnx_threads())
        self.classes = self.models[0].classes
        self.labels = [display_name(name) for name in self.classes]  # JSON answers must be valid Unicode
        self.facts = [run_facts(run) for run in self.runs]
        self.counters = Counters()
        self.explain_gate: Gate | None = None  # made on the serving loop, like the queue (asyncio binds to it)
        self.queue: asyncio.Queue[_Pending] | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="graft-infer")  # one forward pass at a time
        self.decoder = ThreadPoolExecutor(4, thread_name_prefix="graft-decode")
        # /explain decodes and draws on threads of its own: it never holds /predict's decoders, and the memory a
        # thread's allocator keeps after a 40-megapixel decode is kept by at most explain_concurrency threads
        self.explainer = ThreadPoolExecutor(config.explain_concurrency, thread_name_prefix="graft-explain")

    def preprocess(self, data: bytes, name: str) -> torch.Tensor:
        return self.views(decode_image(data, name, self.config.max_pixels))

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        total = None
        for per_view in self.per_view:
            probabilities = per_view(images).reshape(len(images), len(self.views), -1).exp().mean(1)
            total = probabilities if total is None else total + probabilities
        return (total / len(self.per_view)).cpu()

    async def run_batches(self) -> None:
        """The batching loop: gathers pending requests, runs them together, hands each its rows."""
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            size = len(pending[0].images)
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while size < self.config.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                pending.append(item)
                size += len(item.images)
            batch = torch.cat([item.images for item in pending])
            try:
                result = await loop.run_in_executor(self.worker, self.probabilities, batch)
            except Exception as error:  # noqa: BLE001 - every waiting request gets the error; the loop lives on
                log.exception("inference failed")
                for item in pending:
                    if not item.future.done():
                        item.future.set_exception(ApiError(500, f"inference failed: {error}"))
                continue
            self.counters.batches += 1
            self.counters.largest_batch = max(self.counters.largest_batch, len(batch))
            start = 0
            for item in pending:
                if not item.future.done():
                    item.future.set_result(result[start:start + len(item.images)])
                start += len(item.images)

    async def predict(self, images: torch.Tensor) -> torch.Tensor:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(images, future))
        return await future

    def metadata(self) -> dict:
        model = self.models[0]
        return {"classes": self.labels, **label_set_metadata(self.thresholds),
                "runs": [display_name(str(r)) for r in self.runs],
                "facts": self.facts, "preprocessing": model.preprocessing.to_dict(), "tta_views": len(self.views),
                "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
                           "max_files": self.config.max_files, "explain_max_files": self.config.explain_max_files,
                           "explain_concurrency": self.config.explain_concurrency,
                           "explain_queue": self.config.explain_queue},
                "batching": {"max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms}}


def create_app(run_dirs, device: str = "auto", config: ServeConfig | None = None, audit=None, data=None):
    """The FastAPI application for ``run_dirs`` (one run folder or several: an ensemble); with ``audit`` (the folder
    `graft audit` wrote; ``data``: its dataset when audit.json does not say) also the review page on ``/review``
    (graft.deploy.review)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError:
        raise GraftError("graft serve needs FastAPI and uvicorn: pip install 'graft[serve]'") from None
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    predictor = Predictor(run_dirs, device, config)

    @asynccontextmanager
    async def lifespan(app):
        predictor.queue = asyncio.Queue()
        predictor.explain_gate = Gate(config.explain_concurrency, config.explain_queue, "/explain")
        task = asyncio.create_task(predictor.run_batches())
        yield
        task.cancel()
        predictor.worker.shutdown(wait=False)
        predictor.decoder.shutdown(wait=False)
        predictor.explainer.shutdown(wait=False)

    # no /openapi.json, /docs or /redoc: unknown paths answer 404, as documented, and nothing describes more
    app = FastAPI(title="graft", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.predictor = predictor

    _add_error_handlers(app, predictor, JSONResponse)

    @app.get("/health")
    async def health():
        counters = predictor.counters
        return {"status": "ok", "requests": counters.requests, "images": counters.images,
                "batches": counters.batches, "largest_batch": counters.largest_batch,
                "disconnects": counters.disconnects, "errors": counters.errors}

    @app.get("/metadata")
    async def metadata():
        endpoints = sorted({route.path for route in app.routes if getattr(route, "include_in_schema", False)})
        return {**predictor.metadata(), "endpoints": endpoints, "report": latest_report(predictor.runs) is not None}

    _add_page_routes(app, predictor)
    if audit is not None:
        refuse_one_label_mode(predictor.runs, "--audit")
        add_review_routes(app, load_review(audit, predictor.classes, data))

    @app.post("/predict")
    async def predict(request: Request):
        predictor.counters.requests += 1
        uploads = await read_uploads(request, config.max_upload_bytes, config.max_files)
        return await _predictions(predictor, config, uploads)

    if predictor.thresholds is not None:  # Grad-CAM of a label set: refused in one line (docs/decisions.md)
        add_explain_refusal(app)
    elif explain_available():  # the page offers its "where the model looked" switch only when this route exists
        @app.post("/explain")
        async def explain(request: Request):
            predictor.counters.requests += 1
            async with predictor.explain_gate.place():
                uploads = await read_uploads(request, config.max_upload_bytes, config.explain_max_files)
                async with predictor.explain_gate.turn():
                    return await explanations(predictor, config, uploads)

    return app


def _add_page_routes(app, predictor: Predictor) -> None:
    """``GET /`` (the page) and ``GET /report``: fixed paths, so no URL can name another file."""
    from fastapi.responses import HTMLResponse, Response

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/report", include_in_schema=False)
    async def report():
        path = latest_report(predictor.runs)
        if path is None:
            raise ApiError(404, "no report.html in the run folder: run `graft evaluate RUN DATA` to write one")
        try:
            return HTMLResponse(path.read_bytes(), headers=REPORT_HEADERS)
        except OSError as error:
            raise ApiError(404, f"report.html could not be read ({error.strerror or error})") from None

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it on their own; an empty answer keeps their consoles free of 404s
        return Response(status_code=204)


def _add_error_handlers(app, predictor: Predictor, response_type) -> None:
    """Every failure becomes a JSON ``{"error": ...}`` with its status, counted in ``/health``."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    def error(status: int, message: str):
        predictor.counters.errors[status] = predictor.counters.errors.get(status, 0) + 1
        return response_type({"error": display_name(message)}, status_code=status)

    async def api_error(request, exc: ApiError):
        response = error(exc.status, exc.message)
        response.headers.update(exc.headers or {})
        return response

    async def disconnected(request, exc):  # the client hung up mid-upload: nobody to answer, nothing went wrong here
        predictor.counters.disconnects += 1
        log.info("%s %s: the client disconnected before its upload was read", request.method, request.url.path)
        return Response(status_code=400)

    async def http_error(request, exc):  # unknown paths (404) and methods (405): the same JSON shape as the rest
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def unexpected(request, exc: Exception):
        log.exception("unexpected error")
        return error(500, f"internal error ({type(exc).__name__}); the server keeps running")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


async def _predictions(predictor: Predictor, config: ServeConfig, uploads: list[tuple[str, bytes]]) -> dict:
    """Decodes the uploads in the decoder threads, predicts them in one micro-batch, returns the top-k per file."""
    loop = asyncio.get_running_loop()
    try:
        tensors = await asyncio.gather(*[loop.run_in_executor(predictor.decoder, predictor.preprocess, data, name)
                                         for name, data in uploads])
    except PixelLimitError as exc:
        raise ApiError(413, str(exc)) from None
    except ImageError as exc:
        raise ApiError(415, str(exc)) from None
    probabilities = await predictor.predict(torch.stack(tensors))
    predictor.counters.images += len(uploads)
    if predictor.thresholds is not None:  # a label set per image (graft.deploy.labelsets), sigmoid probabilities
        return {"predictions": [label_set_row(name, row, predictor.labels, predictor.thresholds)
                                for (name, _), row in zip(uploads, probabilities)]}
    k = min(config.top_k, len(predictor.classes))
    rows = []
    for (name, _), row in zip(uploads, probabilities):
        values, indices = row.topk(k)
        rows.append({"file": display_name(name), "labels": [predictor.labels[i] for i in indices.tolist()],
                     "probabilities": [round(v, 6) for v in values.tolist()]})
    return {"predictions": rows}


def serve(run_dirs, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          config: ServeConfig | None = None, audit=None, data=None) -> None:
    """Runs the server until interrupted (Ctrl-C); ``audit``: also the review page of that audit folder."""
    try:
        import uvicorn
    except ImportError:
        raise GraftError("graft serve needs FastAPI and uvicorn: pip install 'graft[serve]'") from None
    uvicorn.run(create_app(run_dirs, device, config, audit, data), host=host, port=port, log_level="info")
