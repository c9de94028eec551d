"""Few labels (issue 26): the labelled-only probe vs ``fit --unlabeled`` when only 1%, 5% or 10% of the training
labels are kept and the rest of the training images are the unlabelled pool. Validation is the dataset's own val/
split, untouched (never pseudo-labelled, never in the pool).

    python bench/bench_fewlabels.py                        # both datasets, 1/5/10%, seeds 0,1,2: ~15-25 min
    python bench/bench_fewlabels.py --only flowers --fractions 0.05 --seeds 0   # one row pair: ~2 min once cached

Each dataset's features (train + val) are extracted ONCE into a feature cache (``--cache``; a rerun reads them) and
every arm reuses them: a fraction and seed choose the kept labels (seeded, stratified, at least 2 a class for the
folds) and the pool is the rest of the training features. The two arms are the library functions ``graft fit``
runs on those features: the labelled-only probe (``fit_linear_probe``, λ by CV, temperature-calibrated, as
``fit --strategy probe``) and ``fit --unlabeled``'s ``semi_supervised_probe`` (method and threshold by CV on the
labels, kept only when it beats the probe on val). Accuracy is what ``fit`` would report on val.

Time: ``probe s`` and ``+pool s`` are the solve seconds on cached features (the rerun case: the pool's features
already in the cache). ``cold x`` estimates whole cold runs from the extraction speed measured here (or
``--extract-rate``): (extract labelled + val + pool, solve both) over (extract labelled + val, solve the probe).
Goal: >= +5 points at 5% labels on both datasets, at <= 2x the labelled-only probe's time. ``--smoke`` runs a tiny
random backbone on generated shapes at 32 px: proves the script runs, measures nothing.

``--second NODE`` (e.g. ``blocks.4``) also extracts an earlier stage as a second view of every image: co-training
(``graft.probing.cotrain``) joins the search, and ``2nd alone`` prints the labelled-only probe on that stage by
itself (what ``--cut-at NODE`` would give without the pool), the honest yardstick for what the pool added.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from graft.data.discovery import discover
from graft.models.surgery import DEFAULT_NODE
from graft.probing.cotrain import second_view
from graft.probing.leaderboard import stage_features
from graft.probing.linear import fit_linear_probe
from graft.training.semi import semi_supervised_probe

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
if not SHARED.is_dir():  # a worktree under /work/wt/NAME: the data lies beside the main checkout
    SHARED = Path(__file__).resolve().parents[3] / "shared/data"
DATASETS = {"flowers": ("flowers5", 224), "mnist": ("mnist_test10k", 64)}  # flowers at the README's 224 px


def features(data: Path, size: int, args) -> dict:
    """Train and val features of ``data`` (through the cache) and the extraction speed when anything was extracted."""
    splits = discover(data)
    start = time.perf_counter()
    nodes = [args.second, DEFAULT_NODE] if args.second else "default"
    _, _, sets = stage_features(splits, args.backbone, nodes, size, pretrained=args.pretrained, device="cpu",
                                cache_dir=args.cache, log=print if args.verbose else None)
    seconds = time.perf_counter() - start
    found = sets[DEFAULT_NODE]
    second = sets.get(args.second) if args.second else None
    extracted = found.stats.get("extracted", 0)
    rate = args.extract_rate or (extracted / seconds if extracted > 50 else 0.0)
    print(f"{data.name}: {len(splits.train)} train + {len(splits.val)} val features in {seconds:.0f} s "
          f"({extracted} extracted{f', {rate:.1f} img/s' if rate else ''})", flush=True)
    return {"train": (np.asarray(found.features["train"], np.float32), np.asarray(found.labels["train"])),
            "val": (np.asarray(found.features["val"], np.float32), np.asarray(found.labels["val"])),
            "classes": len(splits.classes), "rate": rate,
            "second": None if second is None else (np.asarray(second.features["train"], np.float32),
                                                   np.asarray(second.features["val"], np.float32))}


def keep_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the kept labels: a seeded ``fraction`` of each class (at least 2, for the folds)."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        kept.append(members[:max(2, round(len(members) * fraction))])
    return np.sort(np.concatenate(kept))


def accuracy(linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((linear(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


def arms(data: dict, fraction: float, seed: int) -> dict:
    """The labelled-only probe and ``--unlabeled`` on one choice of kept labels."""
    (x, y), (vx, vy) = data["train"], data["val"]
    kept = keep_labels(y, fraction, seed)
    pool = np.setdiff1d(np.arange(len(y)), kept)
    start = time.perf_counter()
    base = fit_linear_probe(x[kept], y[kept], vx, vy, data["classes"], seed=seed)
    probe_seconds = time.perf_counter() - start
    start = time.perf_counter()
    view = None if data["second"] is None else second_view(data["second"][0][kept], y[kept], data["second"][0][pool],
                                                           data["classes"], seed=seed)
    record, linear = semi_supervised_probe(x[kept], y[kept], x[pool], vx, vy, base.linear, base.l2, base.temperature,
                                           seed=seed, second=view)
    semi_seconds = time.perf_counter() - start
    alone = accuracy(base.linear, vx, vy)
    # the second stage's labelled-only probe alone (its λ and temperature by CV, as the view's fit has them)
    second_alone = (None if view is None else
                    accuracy(view.fit(view.x, y[kept]), data["second"][1], vy))
    search = {f"{row['method']}{'' if row['threshold'] is None else ' ' + format(row['threshold'], 'g')}":
              row["cv_accuracy"] for row in record["search"]}
    return {"labels": len(kept), "pool": len(pool), "val": len(vy), "alone": alone,
            "semi": accuracy(linear, vx, vy) if linear is not None else alone, "probe_s": probe_seconds,
            "semi_s": semi_seconds, "method": record["method"], "kept": record["kept"], "used": record["used"],
            "with_pool_val": record.get("with_pool_val_acc"), "search": search, "second_alone": second_alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(DATASETS), action="append", help="datasets to run (default: both)")
    parser.add_argument("--data", type=Path, default=SHARED, help="the folder holding flowers5 and mnist_test10k")
    parser.add_argument("--fractions", default="0.01,0.05,0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    parser.add_argument("--second", default="", help="an earlier stage's node (blocks.4) as co-training's second view")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "graft-bench-active-cache"),
                        help="feature cache folder (shared with bench_active.py; a rerun reads it)")
    parser.add_argument("--extract-rate", type=float, default=0.0,
                        help="images/s of a cold extraction, for the cold-run estimate when the cache was warm")
    parser.add_argument("--smoke", action="store_true", help="tiny random backbone on generated shapes, 32 px")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    datasets = {name: (args.data / folder, size) for name, (folder, size) in DATASETS.items()
                if name in (args.only or DATASETS)}
    with tempfile.TemporaryDirectory(prefix="graft-bench-fewlabels-") as temp:
        if args.smoke:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from synthetic import make_shapes

            datasets = {"shapes": (make_shapes(Path(temp) / "shapes", splits={"train": 60, "val": 20}, seed=1), 32)}
            args.backbone, args.pretrained, args.cache = "test_resnet", False, str(Path(temp) / "cache")
            args.second = args.second and "layer1"
        rows = []
        for name, (folder, size) in datasets.items():
            data = features(folder, size, args)
            for fraction in (float(f) for f in args.fractions.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    rows.append({"data": name, "fraction": fraction, "seed": seed, "rate": data["rate"],
                                 **arms(data, fraction, seed)})
                    print(f"done: {rows[-1]}", flush=True)
    report(rows)


def cold_ratio(row: dict) -> float:
    """Whole cold runs, estimated: with the pool over labelled-only (0: no extraction speed known)."""
    if not row["rate"]:
        return 0.0
    alone = (row["labels"] + row["val"]) / row["rate"] + row["probe_s"]
    return (alone + row["pool"] / row["rate"] + row["semi_s"]) / alone


def report(rows: list[dict]) -> None:
    print(f"{'data':<8} {'labels':>10} {'seed':>4} {'probe acc':>9} {'+pool acc':>9} {'points':>7} {'probe s':>8} "
          f"{'+pool s':>8} {'cold x':>6} {'2nd alone':>9}  used / pool, method (CV), kept")
    for row in rows:
        print(f"{row['data']:<8} {row['fraction']:>4.0%} {row['labels']:>5} {row['seed']:>4} {row['alone']:>9.4f} "
              f"{row['semi']:>9.4f} {100 * (row['semi'] - row['alone']):>+7.1f} {row['probe_s']:>8.1f} "
              f"{row['semi_s']:>8.1f} {cold_ratio(row):>6.2f} {row['second_alone'] or 0:>9.4f}  {row['used']:,} / "
              f"{row['pool']:,}, {row['method']}, "
              f"{row['kept']}")
    groups = defaultdict(list)
    for row in rows:
        groups[(row["data"], row["fraction"])].append(row)
    print("\nmean over seeds (times: busy shared machine unless run alone)")
    for (name, fraction), members in groups.items():
        mean = {key: statistics.mean(r[key] for r in members) for key in ("alone", "semi", "probe_s", "semi_s")}
        gain = statistics.mean(100 * (r["semi"] - r["alone"]) for r in members)
        print(f"{name} at {fraction:.0%} labels ({members[0]['labels']} labels, {members[0]['pool']:,} pool): probe "
              f"{mean['alone']:.4f}, +pool {mean['semi']:.4f}, {gain:+.1f} points; solve {mean['probe_s']:.1f} s + "
              f"{mean['semi_s']:.1f} s with the pool; cold runs {statistics.mean(cold_ratio(r) for r in members):.2f}x "
              f"(mean of {len(members)} seed(s))")
        cv = defaultdict(list)
        for r in members:
            for candidate, value in r["search"].items():
                cv[candidate].append(value)
        print("  CV on the labels: " + ", ".join(f"{c} {statistics.mean(v):.3f}" for c, v in cv.items()))


if __name__ == "__main__":
    main()
