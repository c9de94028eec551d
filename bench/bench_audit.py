"""`graft audit` on data with known noise: are the flipped labels and the injected copies found, and what does it cost
against the probe it builds on? Plus the scaling of the duplicate search on synthetic vectors.

    python bench/bench_audit.py [--data flowers5,mnist_test10k] [--root ../shared/data] [--per-class N] [--work W1,W2]
    python bench/bench_audit.py --scaling [--sizes 10000,100000,1000000] [--dim 256]

Accuracy mode: each dataset is copied into a temp folder (the shared data is never modified), 5% of the training
images are moved to another class folder (flipped labels) and 1% of the validation images are copied into their
class's train folder resized to 90% and JPEG re-encoded (injected duplicates, leaks). Then, on a cold feature
cache: the embedding pass (``graft features``), the probe on the cached features (``graft probe``'s work) and
``graft.audit`` on the warm cache. Reported: precision@N and recall@2N of the flagged flips (N = number flipped;
cleanlab's ranking), the share of injected copies found in duplicates.csv and the other pairs among its top rows
(listed: the shared flowers5 holds real duplicates of its own), the validation accuracy of the probe trained
without the flagged training images against the noisy baseline, audit time / probe time (goal ≤ 1.5) and the
peak resident memory after the embedding pass and after the audit.

Scaling mode: planted near-duplicate pairs among N random unit vectors; each method runs in its own process so its
peak resident memory (ru_maxrss) is its own (also shown over the imports and vectors): blocked exact products (up to
100k), usearch HNSW (graft's choice above 100k) and faiss HNSW for comparison: seconds, peak MiB and the share of
planted pairs found.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ accuracy


def noisy_copy(source: Path, target: Path, per_class: int | None, seed: int = 0) -> dict:
    """Copies ``source`` (train/CLASS, val/CLASS) into ``target`` with flipped labels and injected copies; returns
    the truth: {"flipped": [paths], "copies": [(copy path, original path)]}."""
    from PIL import Image

    rng = random.Random(seed)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for split in ("train", "val"):
        for name in classes:
            files = sorted((source / split / name).iterdir())
            files = files[:per_class if split == "train" else max(1, per_class // 4)] if per_class else files
            (target / split / name).mkdir(parents=True)
            for file in files:
                shutil.copy2(file, target / split / name / file.name)
    train = sorted((target / "train").glob("*/*"))
    flipped = []
    for path in rng.sample(train, max(1, round(0.05 * len(train)))):
        other = rng.choice([name for name in classes if name != path.parent.name])
        moved = target / "train" / other / f"flipped-{path.name}"
        path.rename(moved)
        flipped.append(str(moved.resolve()))
    copies = []
    for path in rng.sample(sorted((target / "val").glob("*/*")), max(1, round(0.01 * len(list((target / "val")
                                                                                                   .glob("*/*")))))):
        with Image.open(path) as image:
            image = image.convert("RGB")
            image = image.resize((max(1, int(image.width * 0.9)), max(1, int(image.height * 0.9))), Image.BICUBIC)
            copy = target / "train" / path.parent.name / f"copy-{path.stem}.jpg"
            image.save(copy, "JPEG", quality=80)
        copies.append((str(copy.resolve()), str(path.resolve())))
    return {"flipped": flipped, "copies": copies}


def truth_of(data: Path) -> dict:
    """The injected noise of a noisy copy, read back from its file names (``flipped-*``, ``copy-*``): a reused work
    folder needs no record of its own."""
    flipped = [os.path.abspath(p) for p in sorted((data / "train").glob("*/flipped-*"))]
    copies = []
    for copy in sorted((data / "train").glob("*/copy-*")):
        original = [p for p in (data / "val" / copy.parent.name).glob(copy.stem[len("copy-"):] + ".*")]
        copies.append((os.path.abspath(copy), os.path.abspath(original[0])))
    return {"flipped": flipped, "copies": copies}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accuracy_run(name: str, source: Path, args, work: str | None = None) -> dict:
    import graft
    from graft.data.discovery import discover
    from graft.probing.leaderboard import stage_features
    from graft.probing.linear import fit_linear_probe

    work = Path(work) if work else Path(tempfile.mkdtemp(prefix=f"graft-bench-audit-{name}-"))
    if not (work / "data").is_dir():  # a reused work folder keeps its noisy copy and its warm cache
        noisy_copy(source, work / "data", args.per_class, args.seed)
    truth = truth_of(work / "data")
    cache = str(work / "cache")
    options = dict(image_size=args.image_size, pretrained=not args.no_pretrained)
    start = time.perf_counter()
    splits = discover(work / "data")
    _, _, sets = stage_features(splits, args.backbone, "default", args.image_size, "avg", options["pretrained"],
                                cache, "auto", workers=args.workers)
    embed, embed_mib = time.perf_counter() - start, peak_mib()  # cold cache only on a fresh work folder
    start = time.perf_counter()  # the probe on the warm cache: what `graft probe` does after the features exist
    splits = discover(work / "data")
    _, _, sets = stage_features(splits, args.backbone, "default", args.image_size, "avg", options["pretrained"],
                                cache, "auto", workers=args.workers)
    features = next(iter(sets.values()))
    noisy = fit_linear_probe(features.features["train"], features.labels["train"], features.features["val"],
                             features.labels["val"], classes=len(features.classes))
    probe = time.perf_counter() - start
    start = time.perf_counter()
    result = graft.audit(work / "data", backbone=args.backbone, output=work / "audit", cache=cache,
                         workers=args.workers, **options)
    audit_seconds, audit_mib = time.perf_counter() - start, peak_mib()
    flagged = [row["path"] for row in result.label_issues]
    flips, n = set(truth["flipped"]), len(truth["flipped"])
    injected = {frozenset(pair) for pair in truth["copies"]}
    pairs = [frozenset((row["path_a"], row["path_b"])) for row in result.duplicates]
    top = pairs[:len(injected)]
    cleaned = _without(features, set(flagged))
    return {"data": name, "images": sum(result.summary["images"].values()), "flipped": n,
            "flagged": len(flagged), "precision@N": len(flips & set(flagged[:n])) / n,
            "recall@2N": len(flips & set(flagged[:2 * n])) / n, "copies": len(injected),
            "copies found": len(injected & set(pairs)) / len(injected),
            "other pairs in top": sum(pair not in injected for pair in top),
            "val acc noisy": noisy.val_accuracy, "val acc without flagged": cleaned,
            "embed s": embed, "probe s": probe, "audit s": audit_seconds, "audit/probe": audit_seconds / probe,
            "peak MiB after embed": embed_mib, "peak MiB after audit": audit_mib,
            "held-out acc": result.summary["label_check"]["held_out_accuracy"], "work": str(work),
            "other pairs": [sorted(pair) for pair in top if pair not in injected]}


def _without(features, flagged: set) -> float:
    """Validation accuracy of the probe trained without the flagged training images (the noisy baseline's recipe)."""
    from graft.probing.linear import fit_linear_probe

    keep = np.array([os.path.abspath(p) not in flagged for p in features.paths["train"]])
    return fit_linear_probe(features.features["train"][keep], features.labels["train"][keep],
                            features.features["val"], features.labels["val"],
                            classes=len(features.classes)).val_accuracy


# ------------------------------------------------------------------------------------------------------------- scaling


def planted(size: int, dim: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((size, dim), dtype=np.float32)
    chosen = rng.choice(size, 2 * pairs, replace=False)
    for a, b in zip(chosen[:pairs], chosen[pairs:]):
        vectors[b] = vectors[a] + 0.05 * rng.standard_normal(dim, dtype=np.float32)
    return vectors, {(int(min(a, b)), int(max(a, b))) for a, b in zip(chosen[:pairs], chosen[pairs:])}


def one(method: str, size: int, dim: int) -> dict:
    """One method on one size (run in its own process: ru_maxrss is then this method's peak)."""
    from graft.data.duplicates import centred_unit, neighbours

    vectors, truth = planted(size, dim, pairs=100)
    unit = centred_unit(vectors)
    del vectors
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports and the vectors themselves
    start = time.perf_counter()
    if method == "faiss":
        import faiss

        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.add(unit)
        sims, keys = index.search(unit, 11)
        rows = np.repeat(np.arange(size)[:, None], keys.shape[1], 1)
        keep = (keys != rows) & (keys >= 0) & (sims >= 0.95)
        found = {(int(min(a, b)), int(max(a, b))) for a, b in zip(rows[keep], keys[keep])}
    else:
        result = neighbours(unit, 0.95, 10, exact_limit=size if method == "exact" else 0)
        found = {tuple(pair) for pair in result.pairs.tolist()}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "vectors": size, "dim": dim, "seconds": seconds, "peak MiB": peak,
            "search MiB (peak over imports + vectors)": max(0.0, peak - before),
            "planted found": len(truth & found) / len(truth), "other pairs": len(found - truth)}


def scaling(args) -> list[dict]:
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for method in ("exact", "usearch", "faiss"):
            if method == "exact" and size > args.exact_max:
                continue
            done = subprocess.run([sys.executable, __file__, "--one", method, str(size), "--dim", str(args.dim)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="flowers5,mnist_test10k")
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default=None, help="work folders, one per --data name (comma-separated): an "
                        "earlier run's folder is reused (its noisy copy and warm cache: no embedding pass)")
    parser.add_argument("--per-class", type=int, default=None, help="smoke runs: at most N train images per class")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--no-pretrained", action="store_true")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--exact-max", type=int, default=100_000)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.dim)))
        return
    if args.scaling:
        table(scaling(args))
        return
    names = args.data.split(",")
    works = args.work.split(",") if args.work else [None] * len(names)
    if len(works) != len(names):
        parser.error("--work: one folder per --data name")
    rows = [accuracy_run(name, Path(args.root) / name, args, work) for name, work in zip(names, works)]
    table([{k: v for k, v in row.items() if k not in ("work", "other pairs")} for row in rows])
    for row in rows:
        print(f"{row['data']}: audit files in {row['work']}/audit; top pairs that are not injected copies (look at "
              f"them: the shared data has real duplicates): {row['other pairs']}")


if __name__ == "__main__":
    main()
