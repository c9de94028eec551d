"""Does precise BN help? Validation accuracy of a trained run before and after recomputing its batch-norm statistics
over the whole training set (the lecture's "after training, get mean and variance over the entire training set").

    python bench/bench_precise_bn.py [--per-class 60] [--epochs 3]

Two cases, same seed each: EfficientNet-Lite0 (ImageNet) fine-tuned on flowers5 with batch-norm statistics updated
during training, and resnet10t trained from scratch on MNIST, where the running averages of a short run lag the
weights most.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench_lpft import subset_manifest

from graft.config import load_config
from graft.training.fitting import fit
from graft.training.precise_bn import precise_bn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-precise-bn-"))
    cases = {
        "finetune EfficientNet-Lite0, flowers5, 160px": (SHARED / "flowers5", {
            "model.backbone": "tf_efficientnet_lite0", "data.image_size": 160, "train.strategy": "finetune",
            "train.bn_stats": "update"}),
        "scratch resnet10t, MNIST, 32px": (SHARED / "mnist_test10k", {
            "model.backbone": "resnet10t", "model.pretrained": False, "data.image_size": 32,
            "train.strategy": "scratch", "data.hflip": False, "train.lr": 3e-3}),
    }
    rows = []
    for name, (data, overrides) in cases.items():
        folder = root / name.split(",")[0].replace(" ", "-")
        folder.mkdir()
        manifest = subset_manifest(str(data), args.per_class, folder)
        values = {"data.path": str(manifest), "output": str(folder / "run"), "train.epochs": args.epochs,
                  "train.patience": 0, "data.cache_dir": str(root / "cache"), **overrides}
        start = time.perf_counter()
        fit(load_config(None, values), verbose=False)
        trained = time.perf_counter() - start
        for augmented in (False, True):  # each from the trained weights (the backup precise_bn keeps)
            backup = folder / "run" / "model.before-precise-bn.safetensors"
            if backup.exists():
                shutil.copyfile(backup, folder / "run" / "model.safetensors")
            start = time.perf_counter()
            report = precise_bn(folder / "run", device="cpu", verbose=False, augmented=augmented)
            rows.append((f"{name}, {'train' if augmented else 'eval'} transform", trained,
                         time.perf_counter() - start, report))
    print(f"{args.per_class} training images per class, {args.epochs} epochs, full val split")
    print(f"{'case':<64} {'train s':>8} {'pbn s':>6} {'val acc before':>15} {'after':>7} {'val loss before':>16} "
          f"{'after':>7}")
    for name, trained, seconds, r in rows:
        print(f"{name:<64} {trained:>8.1f} {seconds:>6.1f} {r['before_val_acc']:>15.4f} {r['after_val_acc']:>7.4f} "
              f"{r['before_val_loss']:>16.4f} {r['after_val_loss']:>7.4f}")


if __name__ == "__main__":
    main()
