"""Fine-tuning's first stage: a head trained for a few epochs on the frozen trunk (classic) vs the cached L-BFGS
probe (linear-probe-then-fine-tune, Kumar et al. 2022). Same backbone, data, schedule and seed.

    python bench/bench_lpft.py [--data ../shared/data/flowers5] [--per-class 60] [--size 160] [--epochs 4]

A few training images per class (a CSV manifest picks them) keeps the run short on a CPU; val is the full val split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.config import load_config
from graft.data.discovery import discover
from graft.training.fitting import fit


def subset_manifest(data: str, per_class: int, folder: Path) -> Path:
    splits = discover(data)
    taken: dict[int, int] = {}
    lines = ["path,label,split"]
    for path, label in splits.train:
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            lines.append(f"{path},{splits.classes[label]},train")
    lines += [f"{path},{splits.classes[label]},val" for path, label in splits.val]
    manifest = folder / "subset.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/flowers5"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-lpft-"))
    manifest = subset_manifest(args.data, args.per_class, root)
    rows = []
    for head_fit in ("epochs", "lbfgs"):
        values = {"data.path": str(manifest), "output": str(root / head_fit), "model.backbone": "tf_efficientnet_lite0",
                  "data.image_size": args.size, "train.strategy": "finetune", "train.epochs": args.epochs,
                  "train.head_fit": head_fit, "train.patience": 0, "data.cache_dir": str(root / "cache")}
        start = time.perf_counter()
        result = fit(load_config(None, values), verbose=False)
        rows.append((head_fit, time.perf_counter() - start, result.metrics["val"]["accuracy"]))
    print(f"finetune EfficientNet-Lite0 at {args.size}px, {args.per_class} train images/class of {args.data}, "
          f"{args.epochs} fine-tuning epochs")
    print(f"{'stage 1':<46} {'seconds':>8} {'val acc':>8}")
    names = {"epochs": "head trained 2 epochs on the frozen trunk", "lbfgs": "cached L-BFGS probe (LP-FT)"}
    for head_fit, seconds, accuracy in rows:
        print(f"{names[head_fit]:<46} {seconds:>8.1f} {accuracy:>8.4f}")
    print(f"accuracy difference (LP-FT - classic): {rows[1][2] - rows[0][2]:+.4f}")


if __name__ == "__main__":
    main()
