"""`graft serve` under load (issue 24): requests/s and p50/p99 latency, torch vs onnx, 50 concurrent clients.

    python bench/bench_serve.py                       # a probe run of EfficientNet-Lite0 at 224 px on flowers5
    python bench/bench_serve.py --run runs/flowers    # an existing run
    python bench/bench_serve.py --smoke --backbone test_resnet --size 32   # proves the script works, in seconds

Each runtime gets a fresh ``graft serve RUN --runtime R --device cpu`` on 127.0.0.1 (its own process, started with
this Python; run from the checkout's root so ``-m graft`` is that checkout's graft). After /health answers and a
few warm-up requests, --clients asyncio clients (httpx) share --requests POSTs to /predict, one real validation image
each (the server batches concurrent requests itself, up to its --max-batch); every request and the whole row have
a hard time limit, so a stuck server costs at most --stop seconds. The table: requests/s over the row's wall time,
p50 and p99 latency of the answered requests, and how many failed. The ratio is onnx over torch in the same run.
When this graft's `serve` has no --runtime option yet, the torch row runs without it and the onnx row is skipped
with a note. --smoke: a few images, 10 clients, 40 requests; it checks the script, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_quantize import checked_data, probe_run, run_arguments, small_copy

from graft.data.discovery import discover
from graft.models.run_folder import read_card


def runtime_choices() -> set[str]:
    """The values this graft's `serve --runtime` names in its help (issue 24's ONNX path); empty without it."""
    shown = subprocess.run([sys.executable, "-m", "graft", "serve", "--help"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}).stdout
    if "--runtime" not in shown:
        return set()
    text = shown.split("--runtime", 1)[1].split(" --", 1)[0]  # the option's own help, up to the next option
    return {name for name in ("torch", "eager", "onnx", "auto") if name in text}


def runtime_value(name: str, choices: set[str]) -> str | None:
    """What to pass for the bench's row ``name``: the eager row is "torch" or "eager", whichever serve calls it."""
    if name == "torch" and "torch" not in choices and "eager" in choices:
        return "eager"
    return name if name in choices else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, runtime: str | None, port: int, extra: list[str], wait_s: float,
                 log: Path) -> subprocess.Popen:
    """``graft serve`` in its own process, once /health answers; its output goes to ``log`` (a pipe could fill)."""
    import httpx

    command = [sys.executable, "-m", "graft", "serve", str(run), "--port", str(port), "--device", "cpu", *extra]
    if runtime:
        command += ["--runtime", runtime]
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"graft serve ({runtime or 'default'}) exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    stop_server(server)
    raise SystemExit(f"graft serve ({runtime or 'default'}) did not answer /health within {wait_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)


async def load(url: str, images: list[bytes], clients: int, requests: int, timeout_s: float) -> tuple[list, int]:
    """(latencies of answered requests in s, failures): ``clients`` workers share ``requests`` POSTs."""
    import httpx

    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))

    async def worker(client) -> None:
        nonlocal failures
        for index in counter:  # one shared iterator: each request is taken by exactly one worker
            image = images[index % len(images)]
            start = time.perf_counter()
            try:
                answer = await client.post(url, files={"file": ("image.jpg", image)}, timeout=timeout_s)
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    continue
            except httpx.HTTPError:
                pass
            failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return latencies, failures


def measure(url: str, images: list[bytes], args) -> dict:
    asyncio.run(load(url, images, min(args.clients, 4), 8, args.request_timeout))  # warm-up, not counted
    start = time.perf_counter()
    try:
        latencies, failures = asyncio.run(asyncio.wait_for(
            load(url, images, args.clients, args.requests, args.request_timeout), args.stop))
    except asyncio.TimeoutError:
        return {"note": f"hard stop after {args.stop:.0f} s"}
    wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else float("nan"),
            "ok": len(latencies), "failed": failures, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--runtimes", default="torch,onnx")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--stop", type=float, default=300.0, help="hard stop for one row, seconds")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--serve-args", default="", help="more `graft serve` options, e.g. '--max-batch 8'")
    parser.add_argument("--smoke", action="store_true", help="a few images, 10 clients, 40 requests")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-serve-"))
    data = checked_data(args)
    if args.smoke:
        data, args.clients, args.requests = small_copy(data, root / "data", 4, 3), 10, 40
    run = Path(args.run) if args.run else probe_run(data, root, args.backbone, args.size)
    config = read_card(run)["config"]
    images = [Path(path).read_bytes() for path, _ in discover(config["data"]["path"] if args.run else data).val[:50]]
    choices = runtime_choices()
    rows, notes = {}, []
    for runtime in [name.strip() for name in args.runtimes.split(",") if name.strip()]:
        value = runtime_value(runtime, choices)
        if value is None and runtime != "torch":  # the eager row runs as serve's default when it has no --runtime
            notes.append(f"{runtime}: skipped, this graft's serve has no --runtime {runtime} (choices seen: "
                         f"{', '.join(sorted(choices)) or 'no --runtime option yet'})")
            continue
        port = free_port()
        server = start_server(run, value, port, args.serve_args.split(), args.stop, root / f"serve-{runtime}.log")
        try:
            rows[runtime] = measure(f"http://127.0.0.1:{port}/predict", images, args)
        finally:
            stop_server(server)
    print(f"graft serve, {config['model']['backbone']} at {config['data']['image_size']} px, {args.clients} clients, "
          f"{args.requests} requests of one image each, {os.cpu_count()} CPUs"
          f"{' (SMOKE: figures mean nothing)' if args.smoke else ''}")
    print(f"{'runtime':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ok':>5} {'failed':>6}")
    for name, row in rows.items():
        if "note" in row:
            print(f"{name:<8} {row['note']}")
            continue
        print(f"{name:<8} {row['rps']:>8.1f} {row['p50']:>8.1f} {row['p99']:>8.1f} {row['ok']:>5} {row['failed']:>6}")
    if "rps" in rows.get("torch", {}) and "rps" in rows.get("onnx", {}):
        print(f"onnx/torch: {rows['onnx']['rps'] / rows['torch']['rps']:.2f}x requests/s, p99 "
              f"{rows['onnx']['p99'] / rows['torch']['p99']:.2f}x")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
