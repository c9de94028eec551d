"""Hostile data: every kind of bad or odd input a scraped folder holds, and what graft does with each.

Each kind is written into one class folder of a small clean dataset, then discovery and the scan run as `graft fit`
runs them. Bad files are skipped with a one-line message naming the file; odd-but-valid files load as 8-bit RGB and
survive both transforms; litter is ignored. ``KINDS`` is the count quoted in the README's reliability section.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from synthetic import make_shapes, shape_image

from graft.data.discovery import discover
from graft.data.images import load_image
from graft.data.scan import scan
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing

MAX_PIXELS = 50_000  # the scan's limit in these tests: the clean images are 48x48
PREPROCESSING = Preprocessing((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 0.875)


def _photo(size=(48, 48), mode="RGB") -> Image.Image:
    import random

    image = shape_image("circle", random.Random(0), max(size)).resize(size)
    return image.convert(mode)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _write(folder: Path, name: str | bytes, data: bytes) -> Path:
    path = Path(os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name))))
    path.write_bytes(data)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _animated(fmt: str) -> bytes:
    frames = [_photo(), _photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return _encoded(_photo((60, 30)), "JPEG", exif=exif.tobytes())


def _icc_tagged() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _encoded(_photo(), "JPEG", icc_profile=profile)


def _corrupt_png_data() -> bytes:
    data = bytearray(_encoded(_photo(), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = os.urandom(40)
    return bytes(data)


# kind → writer(folder) → path. Bad: must be skipped with a message naming the file.
BAD = {
    "truncated JPEG": lambda d: _write(d, "t.jpg", _encoded(_photo(), "JPEG")[:300]),
    "truncated PNG": lambda d: _write(d, "t.png", _encoded(_photo(), "PNG")[:200]),
    "JPEG header then garbage": lambda d: _write(d, "g.jpg", b"\xff\xd8\xff\xe0" + os.urandom(500)),
    "PNG with corrupt pixel data": lambda d: _write(d, "c.png", _corrupt_png_data()),
    "zero-byte file": lambda d: _write(d, "empty.jpg", b""),
    "text file named .jpg": lambda d: _write(d, "notes.jpg", b"just some text\n" * 10),
    "HTML page named .png": lambda d: _write(d, "page.png", b"<!doctype html><html><body>404</body></html>"),
    "PDF named .jpeg": lambda d: _write(d, "doc.jpeg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + os.urandom(200)),
    "broken symbolic link": lambda d: (d / "gone.jpg").symlink_to(d / "does-not-exist.jpg") or d / "gone.jpg",
    "named pipe named .png": lambda d: os.mkfifo(d / "pipe.png") or d / "pipe.png",
    "image over the pixel limit": lambda d: _write(d, "big.png", _encoded(_photo((300, 300)), "PNG")),
    "decompression bomb header": lambda d: _write(d, "bomb.png", _png_header_only(100_000, 100_000)),
    "unreadable permissions": lambda d: _unreadable(d),
}


def _unreadable(folder: Path) -> Path:
    path = _write(folder, "secret.png", _encoded(_photo(), "PNG"))
    path.chmod(0)
    return path


# Odd but valid: must load as RGB and pass through the training and evaluation transforms.
GOOD = {
    "upper-case .JPG": lambda d: _write(d, "UPPER.JPG", _encoded(_photo(), "JPEG")),
    "mixed-case .JpEg": lambda d: _write(d, "mixed.JpEg", _encoded(_photo(), "JPEG")),
    "no extension": lambda d: _write(d, "noext", _encoded(_photo(), "PNG")),
    "PNG named .jpg": lambda d: _write(d, "liar.jpg", _encoded(_photo(), "PNG")),
    "1x1 image": lambda d: _write(d, "dot.png", _encoded(_photo((1, 1)), "PNG")),
    "1x2000 strip": lambda d: _write(d, "tall.png", _encoded(_photo((1, 2000)), "PNG")),
    "2000x3 strip": lambda d: _write(d, "wide.png", _encoded(_photo((2000, 3)), "PNG")),
    "animated GIF": lambda d: _write(d, "anim.gif", _animated("GIF")),
    "animated WebP": lambda d: _write(d, "anim.webp", _animated("WEBP")),
    "16-bit PNG": lambda d: _write(d, "deep.png", _encoded(Image.new("I;16", (40, 40), 40000), "PNG")),
    "CMYK JPEG": lambda d: _write(d, "print.jpg", _encoded(_photo(mode="CMYK"), "JPEG")),
    "JPEG with an ICC profile": lambda d: _write(d, "icc.jpg", _icc_tagged()),
    "grayscale JPEG": lambda d: _write(d, "gray.jpg", _encoded(_photo(mode="L"), "JPEG")),
    "palette PNG with transparency": lambda d: _write(d, "pal.png", _encoded(_photo(mode="P"), "PNG",
                                                                             transparency=0)),
    "RGBA PNG": lambda d: _write(d, "alpha.png", _encoded(_photo(mode="RGBA"), "PNG")),
    "EXIF-rotated JPEG": lambda d: _write(d, "rotated.jpg", _exif_rotated()),
    "float TIFF": lambda d: _write(d, "float.tif", _encoded(Image.new("F", (20, 20), 3.5), "TIFF")),
    "BMP": lambda d: _write(d, "old.bmp", _encoded(_photo(), "BMP")),
    "non-UTF-8 file name": lambda d: _write(d, b"caf\xe9-latin1.png", _encoded(_photo(), "PNG")),
    "very long file name": lambda d: _write(d, "n" * 240 + ".png", _encoded(_photo(), "PNG")),
    "unicode and spaces in the name": lambda d: _write(d, "chat noir 🐈 été.png", _encoded(_photo(), "PNG")),
    "symbolic link to an image": lambda d: _linked_image(d),
}


def _linked_image(folder: Path) -> Path:
    target = folder.parent / "elsewhere.png"
    target.write_bytes(_encoded(_photo(), "PNG"))
    (folder / "link.png").symlink_to(target)
    return folder / "link.png"


# Litter: never becomes a sample.
IGNORED = {
    "hidden file": lambda d: _write(d, ".hidden.jpg", _encoded(_photo(), "JPEG")),
    "__MACOSX resource fork": lambda d: _macosx(d),
    ".DS_Store": lambda d: _write(d, ".DS_Store", b"\x00\x00\x00\x01Bud1" + os.urandom(100)),
    "Thumbs.db": lambda d: _write(d, "Thumbs.db", os.urandom(100)),
    "README.txt": lambda d: _write(d, "README.txt", b"images from the web\n"),
    "folder named like an image": lambda d: (d / "album.jpg").mkdir() or d / "album.jpg",
}


def _macosx(folder: Path) -> Path:
    (folder / "__MACOSX").mkdir()
    return _write(folder / "__MACOSX", "._001.png", b"\x00\x05\x16\x07" + os.urandom(50))


KINDS = len(BAD) + len(GOOD) + len(IGNORED)


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_shapes(tmp_path / "data", per_class=6, seed=3)


def _samples(splits) -> dict[str, int]:
    return dict(splits.train + splits.val + splits.test)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_are_skipped_with_a_message_naming_them(dataset, kind):
    if kind == "unreadable permissions" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path = BAD[kind](dataset / "circle")
    splits = discover(dataset, seed=0)
    report = scan(splits, max_pixels=MAX_PIXELS, workers=2)
    assert str(path) not in _samples(splits)
    reasons = [reason for skipped, reason in report.skipped if skipped == str(path)]
    assert len(reasons) == 1 and reasons[0].startswith(str(path)) and "\n" not in reasons[0]
    assert len(splits.train) + len(splits.val) == 18  # the run goes on with every clean image
    with pytest.raises(GraftError, match="^" + _escape(path)):
        load_image(path, MAX_PIXELS)


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_odd_but_valid_files_load_as_rgb(dataset, kind):
    path = GOOD[kind](dataset / "circle")
    splits = discover(dataset, seed=0)
    report = scan(splits, max_pixels=MAX_PIXELS, workers=2)
    assert _samples(splits).get(str(path)) == splits.classes.index("circle"), report.skipped
    image = load_image(path, MAX_PIXELS)
    assert image.mode == "RGB" and min(image.size) >= 1
    for train in (True, False):
        tensor = create_transform(PREPROCESSING, train=train)(image)
        assert tensor.shape == (3, 32, 32) and torch.isfinite(tensor).all()


@pytest.mark.parametrize("kind", sorted(IGNORED))
def test_litter_never_becomes_a_sample(dataset, kind):
    path = IGNORED[kind](dataset / "circle")
    splits = discover(dataset, seed=0)
    scan(splits, max_pixels=MAX_PIXELS, workers=2)
    assert str(path) not in _samples(splits) and len(_samples(splits)) == 18


def test_the_kind_count_quoted_in_the_readme():
    assert KINDS >= 30
    assert f"{KINDS} kinds of bad or odd file" in (Path(__file__).parents[1] / "README.md").read_text()


def _escape(path: Path) -> str:
    import re

    return re.escape(str(path))


def test_what_each_odd_file_becomes(tmp_path):
    rotated = _write(tmp_path, "r.jpg", _exif_rotated())
    assert load_image(rotated).size == (30, 60)  # displayed upright, as a viewer shows it
    deep = load_image(_write(tmp_path, "d.png", _encoded(Image.new("I;16", (4, 4), 65535), "PNG")))
    assert deep.getpixel((0, 0)) == (255, 255, 255)  # 16-bit full scale → 8-bit full scale, not clipped at 255/65535
    tall = create_transform(PREPROCESSING)(load_image(_write(tmp_path, "t.png", _encoded(_photo((4, 400)), "PNG"))))
    assert tall.shape == (3, 32, 32)  # capped at 8:1 and padded, not a 36x3600 intermediate


# ------------------------------------------------------------------------------------------------------ dataset level


def test_symbolic_link_loops_are_read_once_and_reported(dataset):
    (dataset / "circle" / "again").symlink_to(dataset / "circle", target_is_directory=True)
    splits = discover(dataset, seed=0)
    report = scan(splits, max_pixels=MAX_PIXELS, workers=2)
    assert len(_samples(splits)) == 18
    assert any("loop" in note for note in report.warnings)


def test_an_empty_class_folder_is_ignored_with_a_note(dataset):
    (dataset / "hexagon").mkdir()
    splits = discover(dataset, seed=0)
    assert splits.classes == ["circle", "square", "triangle"]
    assert any("empty class folder" in note and "hexagon" in note for note in scan(splits).warnings)


def test_non_image_files_are_counted_in_the_report(dataset):
    _write(dataset / "square", "labels.json", b"{}")
    assert any("without an image extension" in w for w in scan(discover(dataset, seed=0)).warnings)


def _manifest(tmp_path: Path, rows: list[str], header: str = "path,label,split") -> Path:
    make_shapes(tmp_path / "img", per_class=4, seed=5)
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_rows_pointing_to_missing_files_are_skipped_by_name(tmp_path):
    rows = [f"img/{c}/{i:03d}.png,{c},train" for c in ("circle", "square") for i in range(4)]
    csv = _manifest(tmp_path, rows + ["img/circle/missing.png,circle,train"])
    splits = discover(csv, seed=0)
    report = scan(splits)
    assert [Path(p).name for p, _ in report.skipped] == ["missing.png"]
    assert "missing.png: cannot read file" in report.skipped[0][1]


def test_csv_duplicate_rows_are_dropped_with_a_note(tmp_path):
    rows = [f"img/{c}/{i:03d}.png,{c},train" for c in ("circle", "square") for i in range(4)]
    splits = discover(_manifest(tmp_path, rows + rows[:2]), seed=0)
    assert len(splits.train) + len(splits.val) == 8
    assert any("duplicate row" in note for note in splits.notes)


@pytest.mark.parametrize("extra, message", [
    ("img/circle/000.png,square,train", "listed twice with different labels"),
    ("img/triangle/000.png,hexagon,val", "labels with no training rows"),
    ("img/square/001.png,,train", "empty path or label"),
    ("img/square/001.png,square,holdout", "is not one of train, val, test"),
])
def test_inconsistent_csv_rows_are_errors_naming_the_line(tmp_path, extra, message):
    rows = [f"img/{c}/{i:03d}.png,{c},train" for c in ("circle", "square") for i in range(4)]
    with pytest.raises(GraftError, match=message):
        discover(_manifest(tmp_path, rows + [extra]), seed=0)


def test_a_csv_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("path,label\ncafé.png,a\n".encode("utf-16"))
    with pytest.raises(GraftError, match="not UTF-8"):
        discover(path)


def test_fit_on_a_hostile_folder_finishes_and_lists_every_bad_file(dataset, tmp_path):
    from conftest import tiny_config

    from graft.training.fitting import fit

    bad = [BAD[kind](dataset / "square") for kind in ("truncated JPEG", "zero-byte file", "HTML page named .png",
                                                         "broken symbolic link", "decompression bomb header")]
    for kind in ("non-UTF-8 file name", "CMYK JPEG", "animated GIF", "1x2000 strip", "no extension"):
        GOOD[kind](dataset / "triangle")
    for kind in ("__MACOSX resource fork", ".DS_Store"):
        IGNORED[kind](dataset / "circle")
    config = tiny_config(dataset, tmp_path / "run", **{"train.strategy": "finetune", "train.epochs": 1})
    result = fit(config, verbose=False)
    skipped = (result.run_dir / "skipped_files.txt").read_bytes().decode("utf-8", "surrogateescape")
    assert sorted(line.split("\t")[0] for line in skipped.splitlines()) == sorted(map(str, bad))
    assert result.metrics["val"]["accuracy"] >= 0.0 and (result.run_dir / "model.safetensors").is_file()


def test_predict_writes_non_utf8_file_names_back_as_their_bytes(trained_run, tmp_path):
    from typer.testing import CliRunner

    from graft.cli.shared import app

    image = _write(tmp_path, b"caf\xe9.png", _encoded(_photo(), "PNG"))
    result = CliRunner().invoke(app, ["predict", str(trained_run), str(image), "--format", "csv",
                                      "--output", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    assert b"caf\xe9.png,circle," in (tmp_path / "out.csv").read_bytes()


def _matrix_trc_profile(colorants: list[tuple[float, float, float]], gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile: D50-adapted colorants (rXYZ, gXYZ, bXYZ), one gamma for the three
    curves, D50 white. Built by hand so the test needs no profile file and knows exactly what it describes."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(values) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(v) for v in values)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    description = b"desc\0\0\0\0" + struct.pack(">I", 5) + b"test\0" + b"\0" * 79
    tags = [(b"desc", description), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(colorants[0])),
            (b"gXYZ", xyz(colorants[1])), (b"bXYZ", xyz(colorants[2])), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve), (b"cprt", b"text\0\0\0\0none\0\0\0\0")]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I4sI4s4s4s", size, b"none", 0x02100000, b"mntr", b"RGB ", b"XYZ ") + b"\0" * 12
    header += b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48
    return header + struct.pack(">I", len(tags)) + table + body


ADOBE_RGB_D50 = [(0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457)]
SRGB_D50 = [(0.43607, 0.22250, 0.01393), (0.38507, 0.71688, 0.09710), (0.14308, 0.06062, 0.71417)]


def test_a_wide_gamut_icc_profile_moves_colours_to_srgb_as_the_matrices_say(tmp_path):
    """Adobe RGB (1998) pixels, converted by hand: decode gamma 2.2, Adobe's colorants to XYZ (D50), XYZ to linear
    sRGB, sRGB's curve. graft's loader must land within 2 levels of that; ignoring the profile is 10+ levels off."""
    pixel = (110, 170, 120)
    path = tmp_path / "adobe.png"
    Image.new("RGB", (8, 8), pixel).save(path, icc_profile=_matrix_trc_profile(ADOBE_RGB_D50, 563 / 256))
    linear = (np.array(pixel) / 255) ** (563 / 256)
    srgb_linear = np.linalg.solve(np.array(SRGB_D50).T, np.array(ADOBE_RGB_D50).T @ linear).clip(0, 1)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear, 1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    expected = np.round(encoded * 255)
    loaded = np.asarray(load_image(path))[4, 4].astype(float)
    assert np.abs(expected - np.array(pixel)).max() >= 10  # the profile matters for this colour
    np.testing.assert_allclose(loaded, expected, atol=2)
