"""Reading what a client sends ``graft serve``: the body within its byte limit, then the images in it.

Every refusal is an ``ApiError`` carrying its HTTP status (413 too large, 415 not an image type, 400 malformed or
empty), which the server turns into JSON ``{"error": ...}``.
"""

from __future__ import annotations

__all__ = ["ApiError", "read_limited", "read_uploads"]


class ApiError(Exception):
    """A refusal answered with ``status`` and JSON ``{"error": message}`` (plus ``headers``, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


async def read_limited(request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (starlette's ``ClientDisconnect`` when the client goes away)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_uploads(request, max_bytes: int, max_files: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of every uploaded image: multipart files (at most ``max_files``), or the raw body for an image/*
    content type."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_limited(request, max_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [("body", body)]
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, f"expected multipart/form-data or an image/* body, got '{content_type or 'nothing'}'")

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_files, max_fields=max_files).parse()
    except MultiPartException as error:
        if str(error).startswith("Too many"):  # starlette's words for max_files and max_fields
            raise ApiError(413, f"more than {max_files} files or fields in one request to {request.url.path} (its "
                                "limit); send the images in several requests") from None
        raise ApiError(400, f"malformed multipart body: {error}") from None
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
             if isinstance(value, UploadFile)]
    if not files:
        raise ApiError(400, "no image in the request: send multipart files (e.g. curl -F file=@cat.jpg)")
    return files
