"""Active learning curves: does labelling what `graft suggest` picks beat labelling at random?

    python bench/bench_active.py [--data ../shared/data/flowers5] [--seeds 0,1,2] [--rounds 5] [--per-round 20]

EfficientNet-Lite0 (ImageNet, installed from PyPI) features of every training and validation photo, extracted once
into a feature cache (--cache; a rerun reads it). Each seed starts from 2 labelled photos per class; each round
graft's probe (fit_linear_probe: λ by CV, temperature) is solved on the labelled features and scored on the
validation photos, then --per-round more training photos are labelled, chosen by each strategy from the rest of the
training set (the pool; validation is never in it). Strategies: random; the most uncertain by margin alone (no
diversity); suggest's selection (margin or entropy, k-center greedy among 5 x N candidates, as `graft suggest`);
and the same with the labelled photos as k-center's starting centres. Prints validation accuracy per round (mean over
seeds), the area under the curve (mean accuracy over the rounds, trapezoids) and whether each strategy is ahead of
random at every round. Accuracy, not time: the numbers do not depend on the machine being quiet.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from graft.data.discovery import discover
from graft.probing.acquisition import COLD_START, normalised, select, uncertainty
from graft.probing.leaderboard import stage_features
from graft.probing.linear import fit_linear_probe
from graft.probing.typical import typical_picks

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
if not SHARED.is_dir():  # a worktree under /work/wt/NAME: the data lies beside the main checkout
    SHARED = Path(__file__).resolve().parents[3] / "shared/data"
STRATEGIES = ("random", "margin only", "suggest (margin)", "suggest (entropy)", "suggest, labelled as centres",
              "suggest, centres, x margin",  # k-center among 20 x N maximising distance x margin
              "typical", "typical x margin",  # TypiClust: the most typical image of each uncovered k-means cluster
              "graft suggest")  # as `graft suggest` runs: labelled as centres, typical picks below COLD_START a class


def initial(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> list[int]:
    return [int(i) for label in np.unique(labels) for i in rng.choice(np.flatnonzero(labels == label), per_class,
                                                                      replace=False)]


def solve(x: np.ndarray, y: np.ndarray, classes: int, seed: int):
    return fit_linear_probe(x, y, classes=classes, seed=seed).linear


def probabilities(linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(linear(torch.as_tensor(x, dtype=torch.float32)), 1).numpy()


def choose(strategy: str, linear, train_x: np.ndarray, labelled: list[int], n: int, rng: np.random.Generator):
    pool = np.setdiff1d(np.arange(len(train_x)), labelled)
    if strategy == "random":
        return [int(i) for i in rng.choice(pool, n, replace=False)]
    p = probabilities(linear, train_x[pool])
    if strategy.startswith("typical"):
        weights = uncertainty(p, "margin") if "margin" in strategy else None
        return [int(pool[i]) for i in typical_picks(normalised(train_x[pool]), n, normalised(train_x[labelled]),
                                                    weights=weights)]
    if strategy == "margin only":
        return [int(pool[i]) for i in np.argsort(-uncertainty(p, "margin"), kind="stable")[:n]]
    by = "entropy" if "entropy" in strategy else "margin"
    centres = train_x[labelled] if "centres" in strategy or strategy == "graft suggest" else None
    weighted = "x margin" in strategy
    cold_start = COLD_START if strategy == "graft suggest" else 0  # the older strategies: uncertainty from the start
    return [int(pool[i]) for i in select(p, train_x[pool], n, by=by, labelled=centres, weighted=weighted,
                                         candidates=20 if weighted else 5, cold_start=cold_start).indices]


def curve(strategy: str, train: tuple, val: tuple, classes: int, args, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    labelled = initial(train[1], args.start, rng)
    accuracies = []
    for round_ in range(args.rounds + 1):
        linear = solve(train[0][labelled], train[1][labelled], classes, seed)
        accuracies.append(float((probabilities(linear, val[0]).argmax(1) == val[1]).mean()))
        if round_ < args.rounds:
            labelled += choose(strategy, linear, train[0], labelled, args.per_round, rng)
    print(f"{strategy}, seed {seed}: " + " ".join(f"{a:.3f}" for a in accuracies), flush=True)  # a partial run counts
    return accuracies


def area(accuracies: list[float]) -> float:
    """Mean accuracy under the curve (trapezoids over equally spaced rounds)."""
    values = np.asarray(accuracies)
    return float(((values[1:] + values[:-1]) / 2).mean()) if len(values) > 1 else float(values[0])


def features(args):
    splits = discover(args.data)
    cache = args.cache or str(Path(tempfile.gettempdir()) / "graft-bench-active-cache")
    start = time.perf_counter()
    _, _, sets = stage_features(splits, "tf_efficientnet_lite0", "default", args.size, device=args.device,
                                cache_dir=cache, log=print)
    found = next(iter(sets.values()))
    print(f"features of {len(splits.train)} train + {len(splits.val)} val photos in {time.perf_counter() - start:.0f}"
          f" s ({found.stats['extracted']} extracted, {found.stats['cached']} from the cache {cache})")
    train = (np.asarray(found.features["train"], dtype=np.float32), found.labels["train"])
    val = (np.asarray(found.features["val"], dtype=np.float32), found.labels["val"])
    if args.pool_size and args.pool_size < len(train[1]):  # a smoke run: a seeded sample of the training photos
        keep = np.sort(np.random.default_rng(0).choice(len(train[1]), args.pool_size, replace=False))
        train = (train[0][keep], train[1][keep])
    return train, val, len(splits.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "flowers5"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--start", type=int, default=2, help="labelled photos per class at the start")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=None, help="feature cache folder (default: a fixed one under the temp dir)")
    parser.add_argument("--pool-size", type=int, default=0, help="smoke runs: use a sample of this many train photos")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    train, val, classes = features(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = [s.strip() for s in args.strategies.split(",")]
    curves = {s: np.mean([curve(s, train, val, classes, args, seed) for seed in seeds], axis=0) for s in strategies}
    counts = [args.start * classes + args.per_round * r for r in range(args.rounds + 1)]
    print(f"validation accuracy ({len(val[1])} photos), mean over seeds {seeds}; pool {len(train[1])} training photos")
    print(f"{'strategy':<30}" + "".join(f"{c:>7}" for c in counts) + f"{'AUC':>8}{'ahead of random':>17}")
    for strategy, values in curves.items():
        ahead = "" if strategy == "random" or "random" not in curves else \
            ("every round" if all(v > r for v, r in zip(values[1:], curves["random"][1:])) else "not always")
        print(f"{strategy:<30}" + "".join(f"{v:>7.3f}" for v in values) + f"{area(values):>8.3f}{ahead:>17}")


if __name__ == "__main__":
    main()
