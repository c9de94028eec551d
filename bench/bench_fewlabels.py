"""Few labels (issue 26): the labelled-only probe vs ``fit --unlabeled`` when only 1%, 5% or 10% of the training
labels are kept and the rest of the training images are the unlabelled pool. Validation is the dataset's own val/
split, untouched (never pseudo-labelled, never in the pool).

    python bench/bench_fewlabels.py --only flowers            # flowers5 at 224 px, 3 fractions x 2 seeds: ~40 min
    python bench/bench_fewlabels.py --only mnist              # mnist_test10k at 64 px: ~30 min
    python bench/bench_fewlabels.py --only flowers --fractions 0.05 --seeds 0   # one row pair: ~6 min

Each row pair uses one seeded, stratified choice of the kept labels (at least 2 a class, for the folds); each run
starts from a cold feature cache of its own, so the seconds compare whole runs (the pool's extraction included).
Goal: >= +5 points at 5% labels on both datasets, at <= 2x the labelled-only probe's time. ``--smoke`` runs a tiny
random backbone on generated shapes at 32 px: proves the script runs, measures nothing.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from graft.config import load_config
from graft.data.discovery import discover
from graft.training.fitting import fit

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
DATASETS = {  # name → (settings); flowers at the README's 224 px, mnist as bench_auto runs it
    "flowers": {"data.image_size": 224},
    "mnist": {"data.image_size": 64, "data.hflip": False},
}


def write_split(data: Path, fraction: float, seed: int, out: Path) -> tuple[Path, Path, int]:
    """A labelled manifest (the kept train labels + every val image) and a pool CSV (the other train images), by
    absolute path; returns (manifest, pool, labels kept)."""
    splits = discover(data)
    by_class = defaultdict(list)
    for path, label in splits.train:
        by_class[label].append(path)
    rng = random.Random(seed)
    kept, pool = [], []
    for label, paths in sorted(by_class.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        count = max(2, round(len(paths) * fraction))
        kept += [(path, label) for path in paths[:count]]
        pool += paths[count:]
    out.mkdir(parents=True, exist_ok=True)
    manifest, pool_csv = out / "labelled.csv", out / "pool.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows([str(Path(p).resolve()), splits.classes[label], "train"] for p, label in kept)
        writer.writerows([str(Path(p).resolve()), splits.classes[label], "val"] for p, label in splits.val)
    with open(pool_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"])
        writer.writerows([str(Path(p).resolve())] for p in pool)
    return manifest, pool_csv, len(kept)


def run(manifest: Path, pool: Path | None, settings: dict, args, folder: Path) -> dict:
    values = {"data.path": str(manifest), "output": str(folder), "model.backbone": args.backbone,
              "model.pretrained": args.pretrained, "data.cache_dir": args.cache or str(folder) + "-cache",
              "train.strategy": "probe",
              **settings, **({"data.unlabeled": str(pool)} if pool else {})}
    start = time.perf_counter()
    result = fit(load_config(None, values), verbose=args.verbose)
    seconds = time.perf_counter() - start
    semi = result.metrics.get("semi_supervised", {})
    return {"accuracy": result.metrics["val"]["accuracy"], "seconds": seconds, "kept": semi.get("kept", ""),
            "method": semi.get("method", ""), "used": semi.get("used", 0), "pool": semi.get("pool", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(DATASETS), action="append", help="datasets to run (default: both)")
    parser.add_argument("--flowers", type=Path, default=SHARED / "flowers5")
    parser.add_argument("--mnist", type=Path, default=SHARED / "mnist_test10k")
    parser.add_argument("--fractions", default="0.01,0.05,0.1")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny random backbone on generated shapes, 32 px")
    parser.add_argument("--cache", help="one feature cache for every run (accuracy only: the seconds then no longer "
                        "compare whole runs from a cold cache)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-bench-fewlabels-") as temp:
        out = Path(temp)
        datasets = {name: (getattr(args, name), settings) for name, settings in DATASETS.items()
                    if name in (args.only or DATASETS)}
        if args.smoke:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from synthetic import make_shapes

            shapes = make_shapes(out / "shapes", splits={"train": 30, "val": 10}, seed=1)
            datasets = {"shapes": (shapes, {"data.image_size": 32, "data.workers": 0})}
            args.backbone, args.pretrained = "test_resnet", False
        for name, (data, settings) in datasets.items():
            for fraction in (float(f) for f in args.fractions.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    where = out / f"{name}-{fraction:g}-{seed}"
                    manifest, pool, labels = write_split(data, fraction, seed, where)
                    settings = {**settings, "train.seed": seed}
                    alone = run(manifest, None, settings, args, where / "labelled")
                    semi = run(manifest, pool, settings, args, where / "unlabeled")
                    rows.append({"data": name, "fraction": fraction, "seed": seed, "labels": labels,
                                 "alone": alone, "semi": semi})
                    print(f"done: {rows[-1]}", flush=True)
    report(rows)


def report(rows: list[dict]) -> None:
    print(f"{'data':<8} {'labels':>9} {'seed':>4} {'probe acc':>9} {'+pool acc':>9} {'points':>7} {'probe s':>8} "
          f"{'+pool s':>8} {'time x':>6}  used / pool, method, kept")
    for row in rows:
        alone, semi = row["alone"], row["semi"]
        print(f"{row['data']:<8} {row['fraction']:>4.0%} {row['labels']:>4} {row['seed']:>4} {alone['accuracy']:>9.4f} "
              f"{semi['accuracy']:>9.4f} {100 * (semi['accuracy'] - alone['accuracy']):>+7.1f} "
              f"{alone['seconds']:>8.1f} {semi['seconds']:>8.1f} {semi['seconds'] / alone['seconds']:>6.2f}  "
              f"{semi['used']:,} / {semi['pool']:,}, {semi['method']}, {semi['kept']}")
    groups = defaultdict(list)
    for row in rows:
        groups[(row["data"], row["fraction"])].append(row)
    for (name, fraction), members in groups.items():
        gain = statistics.mean(100 * (r["semi"]["accuracy"] - r["alone"]["accuracy"]) for r in members)
        ratio = statistics.mean(r["semi"]["seconds"] / r["alone"]["seconds"] for r in members)
        print(f"{name} at {fraction:.0%} labels: {gain:+.1f} points, {ratio:.2f}x the labelled-only probe's time "
              f"(mean of {len(members)} seed(s))")


if __name__ == "__main__":
    main()
