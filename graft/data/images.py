"""Decoding images: the one guarded ``Image.open`` (allow-listed formats, size and pixel limits), RGB conversion."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import threading
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from graft.errors import GraftError
from graft.utils.limits import DEFAULT_MAX_PIXELS
from graft.utils.text import display_name

__all__ = [
    "ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "FORMAT_LIST", "ImageError", "MAX_FILE_BYTES", "OTHER_SIGNATURES",
    "PixelLimitError", "check_image_file", "decode_image", "load_image", "sniff_format", "to_rgb", "upright_rgb",
    "decoded_image", "to_srgb"
]

log = logging.getLogger(__name__)


# The formats graft decodes, by Pillow's names, and nothing else whatever a file is called: Pillow's other plugins
# include EPS, which runs Ghostscript on the file. A multi-picture JPEG (MPO) is opened by JPEG's own opener.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
FORMAT_LIST = ", ".join({"WEBP": "WebP"}.get(name, name) for name in ALLOWED_FORMATS)  # as messages spell them
OTHER_SIGNATURES = {b"%PDF": "PDF", b"%!": "PostScript"}  # formats Pillow cannot open, named in refusals
# Bytes per image file, from stat before a byte is read: room for an uncompressed 8-bit RGBA TIFF or BMP at the default
# pixel limit (358 MB), while a multi-GB file that only claims to be an image is refused without being read.
MAX_FILE_BYTES = 512 * 2**20
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # Pillow names a stream by its repr


class ImageError(GraftError):
    """An image file that cannot be decoded; the message names the file."""


class PixelLimitError(ImageError):
    """An image with more pixels than allowed (a decompression bomb, or simply too large)."""


# --------------------------------------------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens a JPEG, PNG, WebP, BMP, GIF or TIFF file and returns it as 8-bit RGB with EXIF orientation applied.

    Animated GIF/WebP give their first frame; grayscale, palette, RGBA (composited on white), CMYK, 16-bit and
    float images are converted. Any other format is refused, whatever the file's name (see ``ALLOWED_FORMATS``).

    Raises:
        ImageError: naming the file and why it could not be used.
    """
    check_image_file(path)
    return _decode(path, str(path), max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``load_image`` for bytes already in memory (an upload); errors name ``name``."""
    if not data:
        raise ImageError(_empty(name))
    return _decode(io.BytesIO(data), name, max_pixels)


def check_image_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> int:
    """Checks from ``stat`` alone, before reading a byte, that ``path`` is a regular file of 1 byte to ``max_bytes``;
    returns its size.

    Raises:
        ImageError: a missing, unreadable, empty or oversized file, or a pipe or device (whose read would block).
    """
    try:
        info = os.stat(path)
    except OSError as error:
        raise ImageError(f"{path}: cannot read file ({error.strerror or error}); check it exists and is readable") \
            from None
    except ValueError:  # os.stat's answer to a NUL byte in the name
        shown = display_name(os.fsdecode(path)).replace("\0", "\\0")
        raise ImageError(f"{shown}: the name holds a NUL byte, which no file name can; fix the path") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file (pipe, socket or device); remove it from the dataset")
    if info.st_size == 0:
        raise ImageError(_empty(path))
    if info.st_size > max_bytes:
        raise ImageError(f"{path}: {info.st_size / 2**20:,.0f} MB is more than graft reads from one image file "
                         f"({max_bytes // 2**20} MB); remove it or make it smaller")
    return info.st_size


def _empty(name) -> str:
    return f"{name}: empty file (0 bytes), not a readable image; remove or replace it"


def _decode(source, name: str, max_pixels: int | None) -> Image.Image:
    with decoded_image(source, name, max_pixels) as image:
        if image.mode == "RGB" and not image.info.get("icc_profile") and _orientation(image) == 1:
            # what upright_rgb would copy unchanged: leaving ``with`` closes only the file, the decoded pixels stay,
            # so a 40-megapixel upload is held once, not twice (Pillow keeps RGB at 4 bytes a pixel: 160 MB)
            return image
        return upright_rgb(image)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: upright_rgb's own handling decides
        return 0


def upright_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as graft feeds it to a network: colours to sRGB (ICC), EXIF orientation applied, 8-bit RGB.

    Exported deployment examples carry this function's source (and its helpers'), so they decode exactly as graft.
    """
    upright = ImageOps.exif_transpose(to_srgb(image))  # always a new image: a copy when there is nothing to turn
    return upright if upright.mode == "RGB" else to_rgb(upright)  # an RGB one is not copied again (40 MP: 160 MB)


@contextlib.contextmanager
def decoded_image(source, name: str, max_pixels: int | None, draft: tuple[int, int] | None = None):
    """Opens and fully decodes an image (first frame) of an allowed format, refusing more than ``max_pixels`` before
    decoding; Pillow's many error types (OSError, SyntaxError, ValueError, struct.error, ...) become one
    ``ImageError`` naming ``name``, and its warnings (corrupt EXIF data) are logged with ``name``. ``draft`` lets
    JPEG decode at reduced scale (the whole stream is still read).

    This is graft's only call of ``Image.open``: every reader (training, the scan, predict, evaluate, serve,
    precise-bn, diagnose, report thumbnails) comes through here, so the allow-list holds everywhere.
    """
    try:
        with _DECODER_WARNINGS.collect(name):
            with Image.open(source, formats=ALLOWED_FORMATS) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise PixelLimitError(
                        f"{name}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels}; "
                        "raise data.max_image_pixels if the image is genuine"
                    )
                if draft:
                    image.draft("RGB", draft)
                image.seek(0)
                image.load()
                yield image
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(_unidentified(source, name)) from None
    except Image.DecompressionBombError as error:  # Pillow's own hard limit (twice its default), before ours
        raise PixelLimitError(f"{name}: refused as a possible decompression bomb ({error}); remove the file") from None
    except Exception as error:
        raise ImageError(f"{name}: not a readable image ({_reason(error, name)}); remove or replace the file") from None


def _reason(error: Exception, name: str) -> str:
    """The first line of ``error``, with Pillow's ``<_io.BytesIO object at 0x...>`` replaced by the file's name."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _OBJECT_REPR.sub(name, text)[:300]


def _unidentified(source, name: str) -> str:
    """Why Pillow found no allowed format: the format the first bytes announce, if Pillow knows one, else unknown."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
            prefix = source.read(16)
        else:
            with open(source, "rb") as handle:
                prefix = handle.read(16)
    except (OSError, ValueError):
        prefix = b""
    if not prefix:
        return _empty(name)
    found = sniff_format(prefix)
    if found in ALLOWED_FORMATS:  # its signature is right, its header is not
        return f"{name}: not a readable image (damaged {found} header); remove or replace the file"
    if found:
        return f"{name}: not an allowed image format ({found}); graft reads {FORMAT_LIST}"
    return f"{name}: not a readable image (no known image format); graft reads {FORMAT_LIST}; remove or replace it"


def sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature ``prefix`` (a file's first 16 bytes) carries, or None.

    Only each plugin's signature test runs, never its parser, so naming a format costs nothing in safety.
    """
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):  # a signature test that fails on odd bytes simply did not match
            if accept is not None and accept(prefix):
                return name
    return next((name for signature, name in OTHER_SIGNATURES.items() if prefix.startswith(signature)), None)


class _DecoderWarnings:
    """Logs the warnings Pillow raises while decoding (``Corrupt EXIF data``, ...) with the name of the file at fault,
    each (file, message) once per process, not once per epoch.

    ``warnings.catch_warnings`` swaps process-wide state, so scan threads entering and leaving it at once would see
    each other's warnings and restore each other's filters. Here one catch is entered by the first decoding thread and
    left by the last, and each warning is routed to the thread that raised it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._catch: warnings.catch_warnings | None = None
        self._local = threading.local()
        self._logged: set[tuple[str, str]] = set()
        self._previous_show = warnings.showwarning

    @contextlib.contextmanager
    def collect(self, name: str):
        caught: list[str] = []
        self._local.caught = caught
        with self._lock:
            if self._users == 0:
                self._catch = warnings.catch_warnings()
                self._catch.__enter__()
                warnings.filterwarnings("always", module=r"PIL\.")  # every file's warning, not only the first one
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # graft enforces its own limit
                self._previous_show = warnings.showwarning
                warnings.showwarning = self._show  # restored by the catch's exit
            self._users += 1
        try:
            yield
        finally:
            self._local.caught = None
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._catch.__exit__(None, None, None)
        self._log(name, caught)  # reached only when the decode succeeded: a failure's reason says enough

    def _show(self, message, category, filename, lineno, file=None, line=None):
        caught = getattr(self._local, "caught", None)
        if caught is None:  # another thread's warning while a decode runs: shown as it would have been
            self._previous_show(message, category, filename, lineno, file, line)
        else:
            caught.append(" ".join(str(message).split()))

    def _log(self, name: str, caught: list[str]) -> None:
        for message in dict.fromkeys(caught):
            if (name, message) in self._logged:
                continue
            if len(self._logged) < 100_000:  # bounded: a server decodes strangers' files for weeks
                self._logged.add((name, message))
            log.warning("%s: %s (the image is still used)", name, message)


_DECODER_WARNINGS = _DecoderWarnings()


def to_srgb(image: Image.Image) -> Image.Image:
    """Applies an embedded ICC profile (Adobe RGB, Display P3, CMYK press profiles) so colours match what a viewer
    shows; pretrained networks saw sRGB. A broken profile is ignored rather than failing the image."""
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output_mode)
        converted.info = {k: v for k, v in image.info.items() if k != "icc_profile"}  # keeps EXIF orientation
        return converted
    except Exception:  # noqa: BLE001 - a damaged profile must not cost the image; fall back to plain conversion
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB, scaling 16-bit and float data instead of clipping them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) <= 65535 and array.min() >= 0):
            array = array / 257.0  # 16-bit → 8-bit keeps the full range (65535 → 255)
        else:  # float or out-of-range integers: stretch to the observed range
            low, high = float(array.min()), float(array.max())
            array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image.copy()
