"""Does ``--strategy auto`` pay for itself (issue 14)? Probe, the default fine-tune and auto on each dataset: validation
(or held-out test) accuracy and whole-run seconds, each row from a cold feature cache of its own.

    python bench/bench_auto.py --only digits      # the demo's split (10 images per class), 64 px: about 1 minute
    python bench/bench_auto.py --only flowers     # flowers5 at 128 px, 8 fine-tuning epochs: about 15 minutes
    python bench/bench_auto.py --only mnist       # mnist_test10k at 64 px, no mirroring, light crops: ~25 minutes

The goal: auto's accuracy ≥ the probe's and its time ≤ the default fine-tune's, on every dataset. Run on a quiet
machine (the seconds are half the point). ``--smoke`` runs a tiny random backbone on generated images (tests).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.analysis.comparison import describe_choice
from graft.analysis.demo import DEMO_BACKBONE, write_digits
from graft.config import load_config
from graft.training.fitting import fit

SHARED = Path(__file__).resolve().parents[2] / "shared/data"

# dataset → (settings shared by its rows); the demo's settings for digits
DATASETS = {
    "digits": {"data.image_size": 64, "data.hflip": False, "data.augment": "light", "train.epochs": 12},
    "flowers": {"data.image_size": 128, "train.epochs": 8},
    "mnist": {"data.image_size": 64, "data.hflip": False, "data.augment": "light", "train.epochs": 8},
}
STRATEGIES = ("probe", "finetune", "auto")


def run(strategy: str, data: Path, settings: dict, args, out: Path) -> dict:
    folder = out / f"{data.name}-{strategy}"
    values = {"data.path": str(data), "output": str(folder), "model.backbone": args.backbone,
              "model.pretrained": args.pretrained, "data.cache_dir": str(folder) + "-cache", "train.strategy": strategy,
              **settings, **({"data.image_size": 32, "train.epochs": 1} if args.smoke else {})}
    start = time.perf_counter()
    result = fit(load_config(None, values), verbose=args.verbose)
    seconds = time.perf_counter() - start
    split = "test" if "test" in result.metrics else "val"
    row = {"data": data.name, "strategy": strategy, "split": split, "accuracy": result.metrics[split]["accuracy"],
           "seconds": seconds, "chose": describe_choice(result) or strategy}
    print(f"done: {row}", flush=True)  # a long run's rows as they come
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(DATASETS), action="append", help="datasets to run (default: all)")
    parser.add_argument("--flowers", type=Path, default=SHARED / "flowers5")
    parser.add_argument("--mnist", type=Path, default=SHARED / "mnist_test10k")
    parser.add_argument("--backbone", default=DEMO_BACKBONE)
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="32 px, one epoch: proves it runs, measures nothing")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all three)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-bench-auto-") as folder:
        out = Path(folder)
        for name in args.only or tuple(DATASETS):
            data = write_digits(out / "digits", 10) if name == "digits" else getattr(args, name)
            rows += [run(strategy, data, DATASETS[name], args, out) for strategy in args.strategies.split(",")]
    print(f"{'data':<14} {'strategy':<9} {'split':<5} {'accuracy':>8} {'seconds':>8}  kept")
    for row in rows:
        print(f"{row['data']:<14} {row['strategy']:<9} {row['split']:<5} {row['accuracy']:>8.3f} {row['seconds']:>8.1f}"
              f"  {row['chose']}")
    for name in {row["data"] for row in rows}:
        by = {row["strategy"]: row for row in rows if row["data"] == name}
        if not set(STRATEGIES) <= set(by):
            continue
        print(f"{name}: auto - probe accuracy {by['auto']['accuracy'] - by['probe']['accuracy']:+.3f}; "
              f"auto / finetune time {by['auto']['seconds'] / by['finetune']['seconds']:.2f}")


if __name__ == "__main__":
    main()
