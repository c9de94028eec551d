"""Peak memory of ``graft serve`` (and ``graft explain``) on 40-megapixel uploads (issue 22): the server's peak RSS.

Each row starts a fresh ``graft serve`` in its own process, waits for ``/health``, sends its requests (concurrent ones
from threads), then reads the server's ``VmHWM`` (peak resident set) from ``/proc/PID/status``. The CLI row runs
``graft explain`` in a subprocess and reads its peak RSS from ``getrusage``. Linux only.

    python bench/bench_serve_memory.py              # EfficientNet-Lite0 (installed weights), a probe on shapes
    python bench/bench_serve_memory.py --tiny       # timm's test_resnet at 32 px: the decoding and overlay costs alone
    python bench/bench_serve_memory.py --only explain   # the /explain rows and the CLI's

The servers and the CLI run in the bench's temporary folder, so ``python -m graft`` is the graft this script imports
(``PYTHONPATH`` decides; run from another checkout's root, ``-m`` would pick that checkout's ``graft/`` instead).

The images: a flat 6300 x 6300 PNG with a few shapes (the issue's 131 KB upload), and an 8000 x 5000 (40 M pixels,
the server's default limit) PNG and JPEG. The goal: two concurrent 40-megapixel uploads under ~2 GB.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw


def _image(size: tuple[int, int]) -> Image.Image:
    """A smooth gradient with a few shapes: compresses to little (an upload under the 20 MB limit), decodes big."""
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_180), gradient.rotate(90)))
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(230, 40, 40))
    draw.rectangle((width // 2, height // 2, width * 7 // 8, height * 7 // 8), fill=(40, 200, 60))
    return image


def make_images(folder: Path) -> dict[str, Path]:
    flat = Image.new("RGB", (6300, 6300), (128, 128, 128))
    ImageDraw.Draw(flat).rectangle((1000, 1000, 3000, 3000), fill=(230, 40, 40))
    paths = {"flat 6300x6300 PNG": folder / "flat.png", "40 MP PNG": folder / "big.png",
             "40 MP JPEG": folder / "big.jpg"}
    flat.save(paths["flat 6300x6300 PNG"])
    big = _image((8000, 5000))
    big.save(paths["40 MP PNG"])
    big.save(paths["40 MP JPEG"], quality=85)
    return paths


def make_run(folder: Path, tiny: bool) -> Path:
    """A probe on generated shapes: a real run folder whose only purpose is to be served."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from synthetic import make_shapes

    from graft.config import load_config
    from graft.training.fitting import fit

    data = make_shapes(folder / "shapes", splits={"train": 8, "val": 4}, seed=0, size=64)
    values = {"data.path": str(data), "output": str(folder / "run"), "data.workers": 0, "data.batch_size": 8,
              "train.strategy": "probe", "train.epochs": 2, "data.cache_dir": str(folder / "cache")}
    if tiny:
        values.update({"model.backbone": "test_resnet", "model.pretrained": False, "data.image_size": 32})
    return fit(load_config(None, values), verbose=False).run_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(pid: int, key: str) -> float:
    """A ``/proc/PID/status`` figure (``VmHWM``, ``VmRSS``) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def serve_row(run: Path, path: str, files: list[Path], concurrent: int) -> tuple[float, float, float, str]:
    """(idle MB, peak MB, seconds, statuses) of ``concurrent`` requests at once, each uploading ``files``."""
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "graft", "serve", str(run), "--port", str(port), "--device",
                               "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=run.parent)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        idle = _status(server.pid, "VmHWM")

        def one(_):
            uploads = [("file", (file.name, file.read_bytes())) for file in files]
            return httpx.post(f"{base}{path}", files=uploads, timeout=600).status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            statuses = list(pool.map(one, range(concurrent)))
        seconds = time.perf_counter() - start
        return idle, _status(server.pid, "VmHWM"), seconds, " ".join(map(str, statuses))
    finally:
        server.terminate()
        server.wait(30)


_PEAK_OF = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def cli_row(run: Path, image: Path, out: Path) -> tuple[float, float]:
    """(peak MB, seconds) of ``graft explain RUN IMAGE``, measured by a process whose only child it is."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_OF, sys.executable, "-m", "graft", "explain", str(run),
                           str(image), "-o", str(out), "--device", "cpu"], check=True, capture_output=True, text=True,
                          cwd=run.parent)
    return float(done.stdout.split()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="timm's test_resnet at 32 px instead of EfficientNet-Lite0")
    parser.add_argument("--copies", type=int, default=4, help="copies of the flat PNG in one /explain request")
    parser.add_argument("--only", default="", help="the rows whose name contains this (e.g. explain)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        images = make_images(folder)
        run = make_run(folder, args.tiny)
        sizes = {name: path.stat().st_size for name, path in images.items()}
        print(f"model: {'test_resnet 32 px' if args.tiny else 'tf_efficientnet_lite0 224 px'}; "
              + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items()) + f"; {os.cpu_count()} CPUs")
        print("| what | requests at once x images each | idle RSS (MB) | peak RSS (MB) | seconds | statuses |")
        print("|---|---|---:|---:|---:|---|")
        flat = images["flat 6300x6300 PNG"]
        rows = [("/predict", "40 MP PNG", 2, 1), ("/explain", "40 MP PNG", 2, 1), ("/predict", "40 MP JPEG", 2, 1),
                ("/explain", "40 MP JPEG", 2, 1), ("/explain", "flat 6300x6300 PNG", 1, args.copies)]
        for path, name, concurrent, copies in [row for row in rows if args.only in f"{row[0]} {row[1]}"]:
            idle, peak, seconds, statuses = serve_row(run, path, [images[name]] * copies, concurrent)
            print(f"| `{path}` {name} | {concurrent} x {copies} | {idle:.0f} | {peak:.0f} | {seconds:.1f} | "
                  f"{statuses} |", flush=True)
        if args.only not in "graft explain flat 6300x6300 PNG":
            return
        peak, seconds = cli_row(run, flat, folder / "explained")
        print(f"| `graft explain` flat 6300x6300 PNG | 1 x 1 | | {peak:.0f} | {seconds:.1f} | exit 0 |")


if __name__ == "__main__":
    main()
