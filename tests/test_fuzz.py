"""Fuzzing the image-loading path: random bytes behind real format signatures never raise anything but graft's own
error type (and never hang or exhaust memory). ``GRAFT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`` runs longer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graft.data.images import ImageError, load_image
from graft.data.scan import _check_file

SIGNATURES = [
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"GIF89a", b"GIF87a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00",  # ICO
    b"P6\n", b"\x0a\x05\x01\x08",  # PPM, PCX
]
EXAMPLES = int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "1000"))
FUZZ_LIMIT = 4_000_000  # pixels: a forged header may claim any size; the limit must refuse it before decoding


def check_bytes(data: bytes, folder: Path) -> None:
    """Loads ``data`` both ways graft does; fails if anything but ImageError escapes."""
    path = folder / "fuzz.img"
    path.write_bytes(data)
    try:
        image = load_image(path, FUZZ_LIMIT)
        assert image.mode == "RGB"
    except ImageError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    digest, reason = _check_file(str(path), FUZZ_LIMIT)
    assert (digest is None) != (reason is None)


fuzz_input = st.tuples(st.sampled_from(SIGNATURES), st.binary(max_size=2048)).map(lambda parts: parts[0] + parts[1])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(fuzz_input)
def test_random_bytes_with_image_signatures_raise_only_graft_errors(data):
    with tempfile.TemporaryDirectory() as folder:
        check_bytes(data, Path(folder))


@settings(max_examples=max(100, EXAMPLES // 3), deadline=None, database=None)
@given(st.binary(min_size=0, max_size=4096), st.integers(min_value=0, max_value=4095))
def test_bit_flips_in_a_valid_png_raise_only_graft_errors(noise, position):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 30)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    for offset, byte in enumerate(noise[:16]):
        data[(position + offset * 7) % len(data)] ^= byte
    with tempfile.TemporaryDirectory() as folder:
        check_bytes(bytes(data), Path(folder))
