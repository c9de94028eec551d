"""Is the probe's confidence worth reading? ECE of the linear probe on real photos with few labels, before and after
issue 23's calibration (λ chosen by CV log-loss, temperature scaling on out-of-fold logits).

    python bench/bench_calibration.py [--data ../shared/data/flowers5] [--per-class 40] [--size 224]

EfficientNet-Lite0 (ImageNet, installed from PyPI) features of a seeded sample of --per-class training photos per
class; every validation photo is scored. Rows: the previous rule (λ by CV accuracy, no temperature), λ by CV log-loss
without temperature, and graft's probe now (the default of fit_linear_probe). Target: ECE <= 0.08.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from graft.data.discovery import discover
from graft.evaluation.metrics import calibration
from graft.probing.leaderboard import stage_features
from graft.probing.linear import fit_linear_probe


def sampled(data: str, per_class: int, seed: int):
    splits = discover(data, seed=seed)
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in splits.train:
        by_class.setdefault(sample[1], []).append(sample)
    splits.train = [s for label in sorted(by_class) for s in rng.sample(by_class[label], per_class)]
    return splits


def score(linear, x: np.ndarray, y: np.ndarray) -> dict:
    with torch.no_grad():
        probabilities = torch.softmax(linear(torch.as_tensor(x, dtype=torch.float32)), 1)
    labels = torch.as_tensor(y)
    return {"accuracy": (probabilities.argmax(1) == labels).float().mean().item(), **calibration(probabilities, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/flowers5"))
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    splits = sampled(args.data, args.per_class, args.seed)
    start = time.perf_counter()
    _, _, sets = stage_features(splits, "tf_efficientnet_lite0", "default", args.size, device="cpu",
                                cache_dir=tempfile.mkdtemp(prefix="graft-bench-calibration-"))
    features = next(iter(sets.values()))
    print(f"extracted {len(splits.train)} train + {len(splits.val)} val photos in {time.perf_counter() - start:.0f} s")
    train = (features.features["train"], features.labels["train"])
    val = (features.features["val"], features.labels["val"])
    now = fit_linear_probe(*train, *val)
    by_loss = fit_linear_probe(*train, *val, grid=(now.l2,), cv=0, calibrate=False)
    by_accuracy_l2 = max(now.grid, key=lambda row: (row["cv_acc"], -row["cv_loss"]))["l2"]  # the previous rule
    before = fit_linear_probe(*train, *val, grid=(by_accuracy_l2,), cv=0, calibrate=False)
    rows = [("before: λ by CV accuracy, no temperature", by_accuracy_l2, 1.0, score(before.linear, *val)),
            ("λ by CV log-loss, no temperature", now.l2, 1.0, score(by_loss.linear, *val)),
            ("graft now: λ by CV log-loss + temperature", now.l2, now.temperature, score(now.linear, *val))]
    print(f"flowers5, {args.per_class} training photos per class, {len(val[1])} val photos, {args.size} px")
    print(f"{'probe':<44} {'λ':>7} {'T':>6} {'val acc':>8} {'mean conf':>10} {'ECE':>7}  verdict")
    for name, l2, temperature, found in rows:
        print(f"{name:<44} {l2:>7.0e} {temperature:>6.3f} {found['accuracy']:>8.4f} {found['mean_confidence']:>10.4f} "
              f"{found['ece']:>7.4f}  {found['calibration']}")
    print(f"ECE ratio, now / before: {rows[2][3]['ece'] / rows[0][3]['ece']:.2f}")


if __name__ == "__main__":
    main()
