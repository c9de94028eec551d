"""Active learning curves: does labelling what `graft suggest` picks beat labelling at random?

    python bench/bench_active.py [--data ../shared/data/flowers5] [--seeds 0,1,2,3,4] [--rounds 5] [--per-round 20]
        [--strategies "random;graft suggest"]

EfficientNet-Lite0 (ImageNet, installed from PyPI) features of every training and validation photo, extracted once
into a feature cache (--cache; a rerun reads it). Each seed starts from 2 labelled photos per class; each round
graft's probe (fit_linear_probe: λ by CV, temperature) is solved on the labelled features and scored on the
validation photos, then --per-round more training photos are labelled, chosen by each strategy from the rest of the
training set (the pool; validation is never in it). Strategies: random; the most uncertain by margin alone (no
diversity); k-center greedy among the 5 x N most uncertain (margin or entropy; with the labelled photos as k-center's
starting centres or not); TypiClust's typical picks; "graft suggest" as the command runs (typical picks below 10
labels a class, then class-balanced k-center) and as it ran before class balance ("typical, then k-center"); and the
fifth session's variants (``variant``: class balance from the start, k-means of the uncertain half, density x margin,
typical/uncertain blends, TypiClust inside each predicted class). Prints validation accuracy per round (mean over
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
from graft.probing.acquisition import (COLD_START, balanced_k_center, k_center_greedy, normalised, quotas, select,
                                      uncertainty)
from graft.probing.leaderboard import stage_features
from graft.probing.linear import fit_linear_probe
from graft.probing.typical import kmeans, typical_picks

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
if not SHARED.is_dir():  # a worktree under /work/wt/NAME: the data lies beside the main checkout
    SHARED = Path(__file__).resolve().parents[3] / "shared/data"
STRATEGIES = ("random", "margin only", "suggest (margin)", "suggest (entropy)", "suggest, labelled as centres",
              "suggest, centres, x margin",  # k-center among 20 x N maximising distance x margin
              "typical", "typical x margin",  # TypiClust: the most typical image of each uncovered k-means cluster
              "graft suggest",  # as the command runs: typical below COLD_START labels a class, then class-balanced
              "typical, then k-center",  # `graft suggest` before class balance (labelled as centres)
              # the fifth session's variants (issue 26, flowers5): class balance, clusters, density, blends
              "balanced",  # an equal quota per predicted class; in each, k-center among its 5 x quota most uncertain
              "typical once, then balanced", "cluster-margin", "typical, then cluster-margin",
              "density x margin", "balanced, density x margin", "blend ramp", "blend half",
              "half typical, then balanced",
              "per-class typical, then k-center", "per-class typical, then balanced",
              "typical, per-class typical, then k-center", "per-class typical if CV >= 2x chance, then k-center")
NEIGHBOURS = 20  # density: mean distance to this many nearest pool images (as typicality)


def initial(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> list[int]:
    return [int(i) for label in np.unique(labels) for i in rng.choice(np.flatnonzero(labels == label), per_class,
                                                                      replace=False)]


def solve(x: np.ndarray, y: np.ndarray, classes: int, seed: int):
    return fit_linear_probe(x, y, classes=classes, seed=seed)


def probabilities(linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(linear(torch.as_tensor(x, dtype=torch.float32)), 1).numpy()


def balanced(p: np.ndarray, px: np.ndarray, lx: np.ndarray, n: int, scores: np.ndarray | None = None) -> list[int]:
    """The library's class-balanced k-center (``balanced_k_center``) on ``scores`` (default: margin)."""
    scores = uncertainty(p, "margin") if scores is None else scores
    return balanced_k_center(scores, p.argmax(1), normalised(px), n, labelled=normalised(lx))[0]


def class_typical(p: np.ndarray, px: np.ndarray, lx: np.ndarray, ly: np.ndarray, n: int) -> list[int]:
    """TypiClust inside each predicted class (equal quotas), that class's labelled images as covered clusters."""
    predicted, xn, ln, picks = p.argmax(1), normalised(px), normalised(lx), []
    for c, share in enumerate(quotas(n, np.bincount(predicted, minlength=p.shape[1]))):
        if share:
            rows = np.flatnonzero(predicted == c)
            picks += [int(rows[i]) for i in typical_picks(xn[rows], share, ln[ly == c])]
    return picks


def cluster_margin(p: np.ndarray, px: np.ndarray, n: int) -> list[int]:
    """k-means (k = n) over the more uncertain half of the pool; from each cluster the image nearest its centre."""
    scores = uncertainty(p, "margin")
    rows = np.lexsort((np.arange(len(scores)), -scores))[:max(n, len(scores) // 2)]
    xn = normalised(px[rows])
    clusters, picks = kmeans(xn, n), []
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        picks.append(int(rows[members[np.argmin(((xn[members] - xn[members].mean(0)) ** 2).sum(1))]]))
    return picks + [int(r) for r in rows if int(r) not in set(picks)][:n - len(picks)]


def density(px: np.ndarray) -> np.ndarray:
    """One over the mean distance to the NEIGHBOURS nearest pool images (L2-normalised), scaled to a maximum of 1."""
    x = normalised(px)
    squares, out = (x * x).sum(1), np.empty(len(x))
    for start in range(0, len(x), 1024):
        d = np.maximum(squares[start:start + 1024, None] - 2 * x[start:start + 1024] @ x.T + squares[None], 0)
        out[start:start + 1024] = NEIGHBOURS / np.sqrt(np.partition(d, NEIGHBOURS, axis=1)[:, :NEIGHBOURS + 1]).sum(1)
    return out / out.max()


def blend(p: np.ndarray, px: np.ndarray, lx: np.ndarray, n: int, share: float) -> list[int]:
    """round(share x n) typical picks, the rest balanced (keeping away from the typical ones too)."""
    typical = round(n * share)
    picks = typical_picks(normalised(px), typical, normalised(lx)) if typical else []
    rest = np.setdiff1d(np.arange(len(px)), picks)
    return picks + [int(rest[i]) for i in balanced(p[rest], px[rest], np.concatenate([lx, px[picks]]), n - typical)]


def density_margin(p: np.ndarray, px: np.ndarray, lx: np.ndarray, n: int) -> list[int]:
    """k-center greedy among the 5 x n highest margin x density (keeping away from the labelled images)."""
    scores = uncertainty(p, "margin") * density(px)
    rows = np.lexsort((np.arange(len(scores)), -scores))[:5 * n]
    return [int(rows[i]) for i in k_center_greedy(normalised(px[rows]), n, 0, normalised(lx))]


def variant(strategy: str, probe, p: np.ndarray, px: np.ndarray, lx: np.ndarray, ly: np.ndarray, n: int) -> list[int]:
    """The fifth session's strategies. "cold": fewer than COLD_START labelled images a class (as `graft suggest`);
    "first": the first round (2 labels a class or fewer); "skill": the probe's CV accuracy is at least twice chance."""
    classes = p.shape[1]
    cold, first = len(lx) < COLD_START * classes, len(lx) <= 2 * classes
    skill = probe.cv_accuracy == probe.cv_accuracy and probe.cv_accuracy >= 2.0 / classes  # NaN: no CV was possible
    typical = lambda: typical_picks(normalised(px), n, normalised(lx))  # built only when used
    per_class = lambda: class_typical(p, px, lx, ly, n)
    kcenter = lambda: select(p, px, n, labelled=lx, cold_start=0, balance=False).indices
    spread = lambda: balanced(p, px, lx, n)
    later = {"typical, then cluster-margin": lambda: cluster_margin(p, px, n),
             "per-class typical, then k-center": kcenter, "per-class typical, then balanced": spread,
             "typical, per-class typical, then k-center": kcenter,
             "per-class typical if CV >= 2x chance, then k-center": kcenter}
    if strategy in later and not cold:
        return later[strategy]()
    return {"balanced": spread,
            "typical once, then balanced": typical if first else spread,
            "cluster-margin": lambda: cluster_margin(p, px, n), "typical, then cluster-margin": typical,
            "density x margin": lambda: density_margin(p, px, lx, n),
            "balanced, density x margin": lambda: balanced(p, px, lx, n, uncertainty(p, "margin") * density(px)),
            "blend ramp": lambda: blend(p, px, lx, n, max(0.0, 1 - len(lx) / (COLD_START * classes))),
            "blend half": lambda: blend(p, px, lx, n, 0.5),
            "half typical, then balanced": lambda: blend(p, px, lx, n, 0.5 if cold else 0.0),
            "per-class typical, then k-center": per_class, "per-class typical, then balanced": per_class,
            "typical, per-class typical, then k-center": typical if first else per_class,
            "per-class typical if CV >= 2x chance, then k-center": per_class if skill else typical}[strategy]()


def choose(strategy: str, probe, train: tuple, labelled: list[int], n: int, rng: np.random.Generator):
    train_x, train_y = train
    pool = np.setdiff1d(np.arange(len(train_x)), labelled)
    if strategy == "random":
        return [int(i) for i in rng.choice(pool, n, replace=False)]
    p = probabilities(probe.linear, train_x[pool])
    if strategy in STRATEGIES[STRATEGIES.index("balanced"):]:
        picks = variant(strategy, probe, p, train_x[pool], train_x[labelled], train_y[labelled], n)
        return [int(pool[i]) for i in picks]
    if strategy in ("typical", "typical x margin"):
        weights = uncertainty(p, "margin") if "margin" in strategy else None
        return [int(pool[i]) for i in typical_picks(normalised(train_x[pool]), n, normalised(train_x[labelled]),
                                                    weights=weights)]
    if strategy == "margin only":
        return [int(pool[i]) for i in np.argsort(-uncertainty(p, "margin"), kind="stable")[:n]]
    by = "entropy" if "entropy" in strategy else "margin"
    now = strategy in ("graft suggest", "typical, then k-center")
    centres = train_x[labelled] if "centres" in strategy or now else None
    weighted = "x margin" in strategy
    cold_start = COLD_START if now else 0  # the older strategies: uncertainty from the start
    return [int(pool[i]) for i in select(p, train_x[pool], n, by=by, labelled=centres, weighted=weighted,
                                         candidates=20 if weighted else 5, cold_start=cold_start,
                                         balance=strategy == "graft suggest").indices]


def curve(strategy: str, train: tuple, val: tuple, classes: int, args, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    labelled = initial(train[1], args.start, rng)
    accuracies = []
    for round_ in range(args.rounds + 1):
        probe = solve(train[0][labelled], train[1][labelled], classes, seed)
        accuracies.append(float((probabilities(probe.linear, val[0]).argmax(1) == val[1]).mean()))
        if round_ < args.rounds:
            labelled += choose(strategy, probe, train, labelled, args.per_round, rng)
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
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--start", type=int, default=2, help="labelled photos per class at the start")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=None, help="feature cache folder (default: a fixed one under the temp dir)")
    parser.add_argument("--pool-size", type=int, default=0, help="smoke runs: use a sample of this many train photos")
    parser.add_argument("--strategies", default=";".join(STRATEGIES),
                        help="separated by ';' (names hold commas); one name, or a list without ';' split at commas")
    args = parser.parse_args()
    train, val, classes = features(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = [args.strategies.strip()] if args.strategies.strip() in STRATEGIES else \
        [s.strip() for s in args.strategies.split(";" if ";" in args.strategies else ",")]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}: choose from {list(STRATEGIES)}")
    curves = {s: np.mean([curve(s, train, val, classes, args, seed) for seed in seeds], axis=0) for s in strategies}
    counts = [args.start * classes + args.per_round * r for r in range(args.rounds + 1)]
    print(f"validation accuracy ({len(val[1])} photos), mean over seeds {seeds}; pool {len(train[1])} training photos")
    print(f"{'strategy':<52}" + "".join(f"{c:>7}" for c in counts) + f"{'AUC':>8}{'ahead of random':>17}")
    for strategy, values in curves.items():
        ahead = "" if strategy == "random" or "random" not in curves else \
            ("every round" if all(v > r for v, r in zip(values[1:], curves["random"][1:])) else "not always")
        print(f"{strategy:<52}" + "".join(f"{v:>7.3f}" for v in values) + f"{area(values):>8.3f}{ahead:>17}")


if __name__ == "__main__":
    main()
