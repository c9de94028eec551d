"""The lecture's table on real data at an equal wall-clock budget: the small convnets from scratch vs the real
ImageNet EfficientNet-Lite0 as a probe and fine-tuned (`graft compare` machinery).

    python bench/bench_compare.py [--data ../shared/data/flowers5] [--budget 180]

Every run gets the same training budget in seconds (its schedule re-planned to end annealed within it), the same
split, seed and batch size; accuracy is on the full val split. Wall time includes the scan, feature extraction
and evaluation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from graft.analysis.comparison import compare_strategies, write_comparison

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "flowers5"))
    parser.add_argument("--budget", type=float, default=180.0)
    parser.add_argument("--size", type=int, default=128, help="input size for EfficientNet-Lite0 and the 150-px net")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-compare-"))
    common = {"data.batch_size": 32, "train.lr": 1e-3}
    arms = [  # (label, backbone, strategy, extra overrides)
        ("small-cnn-cifar, scratch, 32 px", "small-cnn-cifar", "scratch", {"data.image_size": 32}),
        ("small-cnn-catsdogs, scratch", "small-cnn-catsdogs", "scratch", {"data.image_size": args.size}),
        ("EfficientNet-Lite0 random init, scratch", "tf_efficientnet_lite0", "scratch", {"data.image_size": args.size}),
        ("EfficientNet-Lite0 ImageNet, probe", "tf_efficientnet_lite0", "probe", {"data.image_size": args.size}),
        ("EfficientNet-Lite0 ImageNet, finetune", "tf_efficientnet_lite0", "finetune", {"data.image_size": args.size}),
        ("EfficientNet-Lite0 ImageNet, finetune, BN frozen", "tf_efficientnet_lite0", "finetune",
         {"data.image_size": args.size, "train.bn_stats": "frozen"}),
    ]
    rows = []
    for index, (label, backbone, strategy, extra) in enumerate(arms):
        cold = {"data.cache_dir": str(root / str(index) / "cache")}  # every arm extracts its own features
        (row,) = compare_strategies(args.data, backbone, root / str(index), (strategy,), epochs=100,
                                    budget=args.budget, overrides={**common, **extra, **cold}, verbose=False)
        rows.append((label, row))
        print(f"{label}: {row.accuracy:.4f} in {row.seconds:.0f}s, {row.epochs} epochs", flush=True)
    write_comparison([row for _, row in rows], root)
    print(f"\n{args.data}, equal training budget of {args.budget:.0f}s per run (2 CPU cores); {root}")
    print(f"{'network and strategy':<50} {'val acc':>8} {'wall s':>7} {'epochs':>7} {'img/s':>7}")
    for label, row in rows:
        print(f"{label:<50} {row.accuracy:>8.4f} {row.seconds:>7.0f} {row.epochs:>7} {row.images_per_s:>7.0f}")


if __name__ == "__main__":
    main()
