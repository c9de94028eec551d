"""``graft serve``'s ``POST /explain``: Grad-CAM overlays of uploads, admitted through a ``Gate`` so that
explanations never crowd out ``/predict``."""

import asyncio
import base64
import contextlib
import io

from graft.data.images import ImageError, PixelLimitError, decode_image
from graft.deploy.uploads import ApiError
from graft.errors import GraftError
from graft.evaluation.explain import OVERLAY_SIDE, explain_prepared, prepare
from graft.utils.text import display_name

__all__ = ["Gate", "RETRY_AFTER_S", "explanations"]

RETRY_AFTER_S = 5  # what a 503 from a busy /explain tells the client to wait


class Gate:
    """At most ``running`` holders at a time and ``waiting`` more in line (FIFO); the next one is refused with 503.

    ``place`` is taken before the body is read, so at most running + waiting bodies are ever held; ``turn`` is then
    awaited for the work itself.
    """

    def __init__(self, running: int, waiting: int, what: str):
        self.capacity, self.what = running + waiting, what
        self.semaphore = asyncio.Semaphore(running)
        self.inside = 0

    @contextlib.asynccontextmanager
    async def place(self):
        if self.inside >= self.capacity:
            raise ApiError(503, f"busy: {self.capacity} {self.what} requests are already running or waiting; "
                                f"retry in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def turn(self):
        return self.semaphore


async def explanations(predictor, config, uploads: list[tuple[str, bytes]]) -> dict:
    """Grad-CAM of each upload (graft.evaluation.explain) as a PNG data URI, with the top-k it explains.

    The uploads are decoded one after another on an explain thread, each shrunk to its network input and an
    overlay-size copy at once, so a request holds one full-size image at a time. The gradient pass runs in the
    inference thread, between ``/predict`` batches, never beside one (its hooks are on the shared model). An ensemble
    is explained through its first member (a map per member would not be one picture).
    """
    loop = asyncio.get_running_loop()
    model = predictor.models[0]
    prepared = []
    for name, data in uploads:
        try:
            prepared.append(await loop.run_in_executor(predictor.explainer, _prepare_upload, model, data, name,
                                                       config.max_pixels))
        except PixelLimitError as exc:
            raise ApiError(413, str(exc)) from None
        except ImageError as exc:
            raise ApiError(415, str(exc)) from None
    names = [display_name(name) for name, _ in uploads]
    try:
        results = await loop.run_in_executor(predictor.worker, explain_prepared, model, prepared, config.top_k, None,
                                             names)
    except GraftError as exc:  # a trunk Grad-CAM does not apply to (a cut at a pooled vector)
        raise ApiError(422, str(exc)) from None
    overlays = await loop.run_in_executor(predictor.explainer, _png_data_uris, [row.overlay for row in results])
    predictor.counters.images += len(uploads)
    rows = [{"file": result.path, "labels": [display_name(label) for label in result.labels],
             "probabilities": result.probabilities, "target": display_name(result.target),
             "overlay": overlay, "note": result.note} for result, overlay in zip(results, overlays)]
    return {"explanations": rows}


def _prepare_upload(model, data: bytes, name: str, max_pixels: int):
    """An upload decoded and prepared for Grad-CAM; the full-size image is dropped when this returns."""
    return prepare(model, decode_image(data, name, max_pixels), OVERLAY_SIDE)


def _png_data_uris(images) -> list[str]:
    """PNG data URIs of the overlays (already at most ``OVERLAY_SIDE`` pixels on their longer side)."""
    uris = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return uris
