"""The pre-training scan's cache (a rerun decodes nothing) and its sampled mode above the size threshold."""

import os

import pytest
from PIL import Image
from synthetic import make_shapes

from graft.data.discovery import discover
from graft.data.scan import ScanCache, scan


@pytest.fixture
def data(tmp_path):
    return make_shapes(tmp_path / "data", per_class=8, size=16)


@pytest.fixture
def opens(monkeypatch):
    """Counts Image.open calls (the only way graft decodes a file)."""
    calls = []
    real = Image.open

    def counting(*args, **kwargs):
        calls.append(str(getattr(args[0], "name", args[0])))
        return real(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def test_a_second_scan_opens_no_image(data, tmp_path, opens):
    cache = ScanCache(tmp_path / "scan")
    first = scan(discover(data), cache=cache)
    assert len(opens) == 24
    second = scan(discover(data), cache=cache)
    assert len(opens) == 24  # nothing decoded again
    assert second.counts == first.counts and second.skipped == first.skipped == []


def test_a_changed_or_broken_file_is_decoded_again_and_a_bad_one_stays_bad(data, tmp_path, opens):
    cache = ScanCache(tmp_path / "scan")
    scan(discover(data), cache=cache)
    changed = data / "circle" / "000.png"
    Image.new("RGB", (20, 20), "red").save(changed)  # new size and mtime: a new key
    broken = data / "square" / "001.png"
    broken.write_bytes(b"not an image at all")
    opens.clear()
    report = scan(discover(data), cache=cache)
    assert str(changed) in opens and set(opens) <= {str(changed), str(broken)}  # only the two changed files
    assert [path for path, _ in report.skipped] == [str(broken)]
    opens.clear()
    again = scan(discover(data), cache=cache)
    assert opens == [] and again.skipped == report.skipped  # the bad verdict is cached too


def test_the_pixel_limit_is_part_of_the_key(data, tmp_path):
    cache = ScanCache(tmp_path / "scan")
    big = data / "circle" / "003.png"
    Image.new("RGB", (40, 40), "red").save(big)  # 1,600 pixels; the others 256
    assert scan(discover(data), cache=cache).skipped == []
    limited = scan(discover(data), max_pixels=1000, cache=cache)
    assert [path for path, _ in limited.skipped] == [str(big)]
    assert scan(discover(data), cache=cache).skipped == []  # and the default limit's verdict is still cached


def test_cache_false_decodes_every_time(data, opens):
    scan(discover(data), cache=False)
    scan(discover(data), cache=False)
    assert len(opens) == 48


def test_above_the_threshold_a_seeded_sample_is_checked_and_the_report_says_so(data, tmp_path, opens, monkeypatch):
    monkeypatch.setattr("graft.data.scan.SCAN_SAMPLE", 5)
    (data / "triangle" / "002.png").write_bytes(b"broken")
    splits = discover(data, seed=0)
    before = len(splits.train) + len(splits.val)
    report = scan(splits, limit=10, cache=False, seed=3)
    assert len(opens) <= 5
    assert any("more than the scan decodes in full (--scan-all-up-to 10)" in note and "sample of 5" in note
               for note in report.warnings)
    kept = len(splits.train) + len(splits.val)
    assert kept == before - len(report.skipped)  # only the sampled bad files were dropped; the rest load-time
    again = discover(data, seed=0)
    scan(again, limit=10, cache=False, seed=3)
    assert again.train == splits.train and again.val == splits.val  # the sample is seeded


def test_the_default_cache_lives_under_graft_cache(data, opens):
    scan(discover(data))
    assert (os.path.join(os.environ["GRAFT_CACHE"], "scan", "scan.sqlite"))
    assert os.path.isfile(os.path.join(os.environ["GRAFT_CACHE"], "scan", "scan.sqlite"))
    opens.clear()
    scan(discover(data))
    assert opens == []
