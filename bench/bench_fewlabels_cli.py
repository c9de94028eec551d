"""Few labels (issue 26), the user's view: the wall time of the ``graft fit`` command with and without ``--unlabeled``.

``bench_fewlabels.py`` times the solve on features in memory; this script times what a user waits for: the whole
``graft fit LABELLED.csv --strategy probe`` process against ``graft fit LABELLED.csv --unlabeled POOL --strategy
probe`` (start-up, reading the cache, the probe, the search, writing the run and its report), first with an empty
feature cache (cold: the pool's features are extracted) and then warm (every feature cached: a rerun, or the next run
on the same pool), the median of ``--repeats`` warm runs each.

    python bench/bench_fewlabels_cli.py                                  # flowers5 at 5% labels, seed 0: ~5 min
    python bench/bench_fewlabels_cli.py --data ../shared/data/mnist_test10k --size 64

The labelled set is the same seeded, stratified 5% as ``bench_fewlabels.py`` (``keep_labels``) in a CSV manifest with
the data's own val split; the pool is the rest of the training images, COPIED into a temporary folder (a pool CSV may
only list images inside its own folder, and the shared data folder is not ours to write into).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fewlabels import SHARED, keep_labels  # noqa: E402  (the same label choice as the solve bench)

from graft.data.discovery import discover  # noqa: E402


def write_sets(data: Path, fraction: float, seed: int, folder: Path) -> tuple[Path, Path, int, int]:
    """The labelled manifest (kept train + all val) and the pool folder (the other train images, copied)."""
    splits = discover(data)
    labels = np.array([label for _, label in splits.train])
    kept = set(keep_labels(labels, fraction, seed).tolist())
    manifest = folder / "labelled.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for i, (path, label) in enumerate(splits.train):
            if i in kept:
                writer.writerow([os.path.abspath(path), splits.classes[label], "train"])
        for path, label in splits.val:
            writer.writerow([os.path.abspath(path), splits.classes[label], "val"])
    pool = folder / "pool"
    pool.mkdir()
    for i, (path, _) in enumerate(splits.train):
        if i not in kept:
            shutil.copyfile(path, pool / f"{i:06d}{Path(path).suffix}")
    return manifest, pool, len(kept), len(splits.train) - len(kept)


def run_fit(args, manifest: Path, out: Path, cache: Path, pool: Path | None) -> tuple[float, dict]:
    """Wall seconds of one ``graft fit`` process and its metrics.json."""
    command = [sys.executable, "-m", "graft", "fit", str(manifest), "--strategy", "probe", "-b", args.backbone,
               "--image-size", str(args.size), "--cache", str(cache), "--seed", str(args.seed), "-o", str(out)]
    if pool is not None:
        command += ["--unlabeled", str(pool)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GRAFT_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"graft fit failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, json.loads((out / "metrics.json").read_text())


def accuracy(metrics: dict) -> float:
    return metrics.get("val", {}).get("accuracy", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "flowers5")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-bench-fewcli-") as temp:
        folder = Path(temp)
        manifest, pool, labelled, pooled = write_sets(args.data, args.fraction, args.seed, folder)
        print(f"{args.data.name}: {labelled} labelled + val, pool of {pooled:,} copied; {args.backbone} at "
              f"{args.size} px", flush=True)
        cache, rows = folder / "cache", {}
        for name, with_pool in (("labelled-only", None), ("--unlabeled", pool)):
            cold, metrics = run_fit(args, manifest, folder / f"{name}-cold", cache, with_pool)
            warm = [run_fit(args, manifest, folder / f"{name}-warm{i}", cache, with_pool)[0]
                    for i in range(args.repeats)]
            rows[name] = (cold, statistics.median(warm), metrics)
            print(f"{name}: cold {cold:.1f} s, warm {' / '.join(f'{w:.1f}' for w in warm)} s", flush=True)
    alone_cold, alone_warm, alone = rows["labelled-only"]
    print(f"\n{'run':<16} {'cold s':>7} {'warm s':>7} {'val acc':>8}  semi_supervised")
    for name, (cold, warm, metrics) in rows.items():
        semi = metrics.get("semi_supervised", {})
        said = f"{semi.get('used', 0):,} of {semi.get('pool', 0):,} used, kept {semi.get('kept')}" if semi else "-"
        print(f"{name:<16} {cold:>7.1f} {warm:>7.1f} {accuracy(metrics):>8.4f}  {said}")
    cold, warm, _ = rows["--unlabeled"]
    print(f"\n--unlabeled / labelled-only: cold {cold / alone_cold:.2f}x (the pool's features extracted), warm "
          f"{warm / alone_warm:.2f}x (goal: at most 2x)")


if __name__ == "__main__":
    main()
