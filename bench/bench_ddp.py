"""One process vs two gloo processes (torchrun) fine-tuning on the same data: images/s, val accuracy, and the
communication overhead (the two-process run's step time over one process's, at the same per-process batch).

    python bench/bench_ddp.py [--data ../shared/data/flowers5] [--backbone resnet10t] [--size 64] [--epochs 2]
    python bench/bench_ddp.py --synthetic   # a smoke run on generated shapes

Both arms train the same recipe with the same per-process batch, so the two-process arm's global batch is twice
the size (graft applies --lr as given; see docs/decisions.md). On two CPU cores two processes share the cores with
each other, so they can be slower than one: the table reports what it measures. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _arm(processes: int, data: str, out: Path, args) -> dict:
    fit = ["-m", "graft", "fit", data, "--backbone", args.backbone, "--image-size", str(args.size), "--epochs",
           str(args.epochs), "--batch-size", str(args.batch), "--strategy", "finetune", "--head-fit", "epochs",
           "--head-epochs", "0", "--patience", "0", "--device", "cpu", "--workers", "0", "-o", str(out)]
    if not args.pretrained:
        fit.append("--no-pretrained")
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(_port())]
    command = [sys.executable, *(launcher if processes > 1 else []), *fit]
    threads = max(1, (os.cpu_count() or 1) // processes)  # the cores split between the processes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "GRAFT_PROGRESS_SECONDS": "0"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
    columns = history[0]
    rows = [dict(zip(columns, row)) for row in history[1:]]
    rows = rows[1:] or rows  # the first epoch carries one-time costs (allocator, thread pools): left out when others exist
    metrics = json.loads((out / "metrics.json").read_text())
    return {"processes": processes, "images_per_s": sum(float(r["images_per_s"]) for r in rows) / len(rows),
            "epoch_seconds": sum(float(r["seconds"]) for r in rows) / len(rows),
            "val_acc": metrics["val"]["accuracy"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "flowers5"))
    parser.add_argument("--synthetic", action="store_true", help="generated shapes instead of --data (smoke run)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--epochs", type=int, default=3, help="the first is left out of the rates")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-ddp-"))
    data = args.data
    if args.synthetic:
        sys.path.insert(0, str(ROOT))
        from tests.synthetic import make_shapes

        data = str(make_shapes(root / "shapes", splits={"train": 24, "val": 10}, seed=1))
    one, two = (_arm(n, data, root / f"run-{n}", args) for n in (1, 2))
    # the same images per epoch in both arms: the two-process epoch's extra time per image is communication and
    # core sharing, which one CPU machine cannot tell apart
    overhead = two["epoch_seconds"] / max(one["epoch_seconds"], 1e-9)
    print("| processes | images/s | epoch s | val acc | wall s |\n|---|---|---|---|---|")
    for row in (one, two):
        print(f"| {row['processes']} | {row['images_per_s']:.1f} | {row['epoch_seconds']:.2f} | {row['val_acc']:.3f} |"
              f" {row['wall_s']:.1f} |")
    print(f"\ntwo processes' epoch time / one process's: {overhead:.2f}x ({args.backbone}, {args.size} px, batch "
          f"{args.batch} per process, {args.epochs} epochs, data {data})")


if __name__ == "__main__":
    main()
