"""What the page and browser tests share: the Chromium lookup, a two-colour data set, a tiny run, a live server.

The Chromium lookup is the one place that decides whether the browser tests run: ``GRAFT_CHROMIUM`` (a path), then
``chromium``, ``chromium-browser`` and ``google-chrome`` on PATH. ``make test`` installs Debian's ``chromium`` first
when it runs as root and none is found.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

__all__ = ["HOSTILE", "TWO_COLOURS", "colour_image", "find_chromium", "live_server", "make_two_colours"]

# The second class is a folder whose name is markup: the page must show it as text and run nothing.
HOSTILE = "<img src=x onerror=alert(1)>"
TWO_COLOURS = {"red": (215, 35, 35), HOSTILE: (35, 70, 220)}
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> tuple[str | None, str]:
    """(path to a Chromium binary or None, how it was found or why none was)."""
    configured = os.environ.get("GRAFT_CHROMIUM")
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured, f"GRAFT_CHROMIUM={configured}"
        return None, f"GRAFT_CHROMIUM={configured} is not an executable file"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found, f"{name} on PATH"
    return None, ("no Chromium found (GRAFT_CHROMIUM, or chromium / chromium-browser / google-chrome on PATH); "
                  "as root `make test` installs Debian's: apt-get install -y --no-install-recommends chromium")


def colour_image(colour: tuple[int, int, int], rng: random.Random, size: int = 40) -> Image.Image:
    """A flat ``colour`` with per-pixel noise: two such classes are learnt in one or two epochs."""
    noise = bytes(max(0, min(255, c + rng.randint(-25, 25))) for _ in range(size * size) for c in colour)
    return Image.frombytes("RGB", (size, size), noise)


def make_two_colours(root: Path, train: int = 16, val: int = 6, seed: int = 0) -> Path:
    """root/{train,val}/{red,HOSTILE}/NNN.png."""
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        for name, colour in TWO_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                colour_image(colour, rng).save(folder / f"{index:03d}.png")
    return root


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def live_server(app):
    """Runs ``app`` under uvicorn on a free loopback port in a thread; yields its base URL."""
    import httpx
    import uvicorn

    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
