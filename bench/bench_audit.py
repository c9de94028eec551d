"""`graft audit` on data with known noise: are the flipped labels and the injected copies found, and what does it cost
against the probe it builds on? Plus the scaling of the duplicate search on synthetic vectors.

    python bench/bench_audit.py [--data flowers5,mnist_test10k] [--root ../shared/data] [--per-class N] [--work W1,W2]
    python bench/bench_audit.py --anchors [--data flowers5] [--per-class N] [--image-size S] [--cv-folds K]
        [--cv-epochs E] [--work W]
    python bench/bench_audit.py --scaling [--sizes 10000,100000,1000000] [--dim 256] [--methods "exact;graft;..."]

Accuracy mode: each dataset is copied into a temp folder (the shared data is never modified), 5% of the training
images are moved to another class folder (flipped labels) and 1% of the validation images are copied into their
class's train folder resized to 90% and JPEG re-encoded (injected duplicates, leaks). Then, on a cold feature
cache: the embedding pass (``graft features``), the probe on the cached features (``graft probe``'s work) and
``graft.audit`` on the warm cache. Reported: precision@N and recall@2N of the flagged flips (N = number flipped;
cleanlab's ranking), the share of injected copies found in duplicates.csv and the other pairs among its top rows
(listed: the shared flowers5 holds real duplicates of its own), the validation accuracy of the probe trained
without the flagged training images against the noisy baseline, audit time / probe time (goal ≤ 1.5) and the
peak resident memory after the embedding pass and after the audit.

Anchors mode (one dataset, the same noisy copy): each measurement is a process of its own with its own feature
cache (``GRAFT_CACHE``), timed from outside (wall seconds, peak resident MiB from ``wait4``): ``graft fit DATA
--strategy probe`` on a cold cache, then ``graft audit DATA`` on the cache it left warm (goal: audit/probe ≤ 1.5),
``graft audit`` on a cold cache (a from-scratch embedding pass, what fastdup and cleanvision cost), and the anchor
cleanlab documents: a K-fold cross-validated fine-tune of the same pretrained backbone (plain torch + timm, not
graft's trainer), then ``cleanlab.filter.find_label_issues`` on its out-of-sample probabilities. precision@N and
recall@2N of the flipped labels for each label check.

Scaling mode: planted near-duplicate pairs among N random unit vectors; each method runs in its own process so its
peak resident memory (ru_maxrss) is its own (also shown over the imports and vectors): ``exact`` (graft's blocked
products, up to --exact-max), ``graft`` (the approximate index graft uses above EXACT_LIMIT) and any library index
with its parameters (--methods, see ``index_search``): seconds, peak MiB, the share of planted pairs found and the
share of the true 10 nearest neighbours found for 500 rows (what the outlier scores read).
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


# ------------------------------------------------------------------------------------------------------------- anchors


def timed(command: list[str], cache: Path, log: Path) -> tuple[float, float]:
    """Runs ``command`` (a CLI call, what a user runs) with its own feature cache; its wall seconds and the peak
    resident MiB of that process and the children it waited for (``wait4``: this command's own, not the bench's)."""
    env = dict(os.environ, GRAFT_CACHE=str(cache), GRAFT_OFFLINE="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode}): see {log}")
    return seconds, usage.ru_maxrss / 1024


def ranked_issues(path: Path) -> list[str]:
    """The paths of a label_issues.csv, most suspicious first."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


def scores(flagged: list[str], flipped: list[str]) -> dict:
    """precision@N and recall@2N of a ranked list against the flipped paths (N = how many were flipped)."""
    flips, n = {os.path.abspath(p) for p in flipped}, len(flipped)
    flagged = [os.path.abspath(p) for p in flagged]
    return {"precision@N": len(flips & set(flagged[:n])) / n, "recall@2N": len(flips & set(flagged[:2 * n])) / n}


def anchors(args) -> list[dict]:
    """The audit's cost against what it replaces, on one noisy dataset, each in its own process and cache:
    ``graft fit --strategy probe`` (cold), ``graft audit`` after it (warm), ``graft audit`` alone (cold: a
    from-scratch embedding pass, what fastdup/cleanvision do) and a K-fold cross-validated fine-tune with cleanlab
    (its documented way of getting out-of-sample probabilities)."""
    name = args.data.split(",")[0]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"graft-bench-anchors-{name}-"))
    if not (work / "data").is_dir():
        noisy_copy(Path(args.root) / name, work / "data", args.per_class, args.seed)
    data, truth = work / "data", truth_of(work / "data")
    common = ["--backbone", args.backbone] + (["--image-size", str(args.image_size)] if args.image_size else []) + (
        ["--no-pretrained"] if args.no_pretrained else [])
    graft = [sys.executable, "-m", "graft"]
    print(f"anchors on {name}: {sum(1 for _ in data.glob('*/*/*'))} images ({args.per_class or 'all'} train per "
          f"class), {len(truth['flipped'])} flipped; {args.backbone} at {args.image_size or 'its default'} px; "
          f"K-fold fine-tune: {args.cv_folds} folds x {args.cv_epochs} epoch(s); work folder {work}", flush=True)
    fit = graft + ["fit", str(data), "--strategy", "probe", "-o", str(work / "run"), *common]
    cv = [sys.executable, __file__, "--cv-finetune", str(data), str(work / "cv.json"), "--backbone", args.backbone,
          "--cv-folds", str(args.cv_folds), "--cv-epochs", str(args.cv_epochs), "--seed", str(args.seed), *common[2:]]
    plan = [("graft fit --strategy probe (cold cache)", fit, "cache-probe", "run", True),
            ("graft audit after the probe (warm cache)", graft + ["audit", str(data), "-o", str(work / "audit-warm"),
                                                                  *common], "cache-probe", "audit-warm", False),
            ("graft audit alone (cold cache: its own embedding pass)", graft + [
                "audit", str(data), "-o", str(work / "audit-cold"), *common], "cache-cold", "audit-cold", True),
            (f"{args.cv_folds}-fold fine-tune x {args.cv_epochs} epoch(s) + cleanlab", cv, "cache-cv", "cv.json", True)]
    rows = []
    for label, command, cache, output, cold in plan:
        for stale in [work / output] + ([work / cache] if cold else []):  # a reused work folder: cold again
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        seconds, peak = timed(command, work / cache, work / f"{output}.log")
        rows.append({"method": label, "seconds": seconds, "peak MiB": peak})
        print(rows[-1], flush=True)
    for row, ranked in zip(rows[1:], (ranked_issues(work / "audit-warm" / "label_issues.csv"),
                                      ranked_issues(work / "audit-cold" / "label_issues.csv"),
                                      json.loads((work / "cv.json").read_text())["ranked"])):
        row.update(scores(ranked, truth["flipped"]))
    rows[0].update({"precision@N": "-", "recall@2N": "-"})
    for row in rows:
        row["ratio to the probe"] = row["seconds"] / rows[0]["seconds"]
    return rows


def labelled_images(data: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Every image of a train/val[/test] class-folder tree with its (given) class index, and the class names."""
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    paths, labels = [], []
    for split in ("train", "val", "test"):
        for index, name in enumerate(classes):
            for path in sorted((data / split / name).glob("*")) if (data / split / name).is_dir() else []:
                paths.append(os.path.abspath(path))
                labels.append(index)
    return paths, np.array(labels), classes


def cv_finetune(data: Path, out: Path, args) -> None:
    """The anchor, in plain torch + timm (not graft's trainer): for each of K stratified folds, fine-tune the same
    pretrained backbone (graft's loader only supplies the weights) on the other folds and predict the held-out fold;
    then cleanlab.filter.find_label_issues on those out-of-sample probabilities. Recipe: AdamW, head lr 1e-3, trunk
    lr 1e-4, one-cycle schedule, batch 32, random-resized crop + flip, batch-norm statistics frozen (better on small
    data), channels-last."""
    import torch
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    torch.manual_seed(args.seed)
    paths, labels, classes = labelled_images(data)
    probabilities = np.zeros((len(paths), len(classes)), dtype=np.float64)
    folds = StratifiedKFold(args.cv_folds, shuffle=True, random_state=args.seed).split(paths, labels)
    for fold, (train, held) in enumerate(folds):
        start = time.perf_counter()
        model, train_tf, eval_tf = _finetune_model(args, len(classes))
        _train(model, [paths[i] for i in train], labels[train], train_tf, args.cv_epochs)
        probabilities[held] = _predict(model, [paths[i] for i in held], eval_tf)
        print(f"fold {fold + 1}/{args.cv_folds}: {len(train)} trained, {len(held)} predicted, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    out.write_text(json.dumps({"ranked": [paths[i] for i in ranked], "images": len(paths),
                               "held_out_accuracy": float(np.mean(probabilities.argmax(1) == labels))}))


def _finetune_model(args, classes: int):
    import torch
    from torch import nn
    from torchvision import transforms

    from graft.models.backbones import create_backbone

    backbone = create_backbone(args.backbone, pretrained=not args.no_pretrained)
    pre = backbone.preprocessing
    size = args.image_size or pre.input_size[0]
    model = nn.Sequential(backbone.net, nn.Linear(backbone.net.num_features, classes))
    model = model.to(memory_format=torch.channels_last)
    normalise = [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    mode = transforms.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else \
        transforms.InterpolationMode.BILINEAR
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size, interpolation=mode),
                                   transforms.RandomHorizontalFlip(), *normalise])
    eval_tf = transforms.Compose([transforms.Resize(int(size / pre.crop_pct), interpolation=mode),
                                  transforms.CenterCrop(size), *normalise])
    return model, train_tf, eval_tf


def _batches(paths: list[str], transform, order: list[int], size: int = 32):
    import torch
    from PIL import Image

    for start in range(0, len(order), size):
        chosen = order[start:start + size]
        images = []
        for i in chosen:
            with Image.open(paths[i]) as image:
                images.append(transform(image.convert("RGB")))
        yield chosen, torch.stack(images).contiguous(memory_format=torch.channels_last)


def _train(model, paths: list[str], labels: np.ndarray, transform, epochs: int) -> None:
    import torch
    from torch import nn

    head, trunk = model[1], model[0]
    optimiser = torch.optim.AdamW([{"params": trunk.parameters(), "lr": 1e-4},
                                   {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    steps = epochs * -(-len(paths) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=[1e-4, 1e-3], total_steps=steps, pct_start=0.1)
    target = torch.as_tensor(labels, dtype=torch.long)
    for _ in range(epochs):
        model.train()
        for module in model.modules():  # frozen batch-norm statistics
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.eval()
        for chosen, x in _batches(paths, transform, torch.randperm(len(paths)).tolist()):
            loss = nn.functional.cross_entropy(model(x), target[chosen])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()


def _predict(model, paths: list[str], transform) -> np.ndarray:
    import torch

    model.eval()
    out = np.zeros((len(paths), model[1].out_features))
    with torch.inference_mode():
        for chosen, x in _batches(paths, transform, list(range(len(paths)))):
            out[chosen] = torch.softmax(model(x).float(), 1).numpy()
    return out


# ------------------------------------------------------------------------------------------------------------- scaling


def planted(size: int, dim: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((size, dim), dtype=np.float32)
    chosen = rng.choice(size, 2 * pairs, replace=False)
    for a, b in zip(chosen[:pairs], chosen[pairs:]):
        vectors[b] = vectors[a] + 0.05 * rng.standard_normal(dim, dtype=np.float32)
    return vectors, {(int(min(a, b)), int(max(a, b))) for a, b in zip(chosen[:pairs], chosen[pairs:])}


def index_search(method: str, unit: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, cosines), each (N, count), of a library index searched for every row: ``usearch:connectivity=16,
    expansion_add=128,expansion_search=64,dtype=f32``, ``faiss-hnsw:M=32,efc=40,efs=16`` or
    ``faiss-ivf:nlist=1024,nprobe=8`` (any parameter left out takes the value shown)."""
    name, _, spec = method.partition(":")
    given = dict(item.split("=") for item in spec.split(",") if item)
    dim = unit.shape[1]
    if name == "usearch":
        from usearch.index import Index

        index = Index(ndim=dim, metric="cos", dtype=given.get("dtype", "f32"),
                      connectivity=int(given.get("connectivity", 16)),
                      expansion_add=int(given.get("expansion_add", 128)),
                      expansion_search=int(given.get("expansion_search", 64)))
        index.add(np.arange(len(unit), dtype=np.uint64), unit)
        matches = index.search(unit, count)
        return matches.keys.astype(np.int64), (1.0 - matches.distances).astype(np.float32)
    import faiss

    if name == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dim, int(given.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(given.get("efc", 40))
        index.add(unit)
        index.hnsw.efSearch = int(given.get("efs", 16))
    elif name == "faiss-ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(given.get("nlist", 1024)),
                                   faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(unit), min(len(unit), 64 * index.nlist), replace=False)
        index.train(unit[np.sort(sample)])
        index.add(unit)
        index.nprobe = int(given.get("nprobe", 8))
    else:
        raise SystemExit(f"unknown method {method}")
    sims, keys = index.search(unit, count)
    return keys.astype(np.int64), sims.astype(np.float32)


def one(method: str, size: int, dim: int, k: int = 10) -> dict:
    """One method on one size (run in its own process: ru_maxrss is then this method's peak): ``exact`` and
    ``graft`` are graft's own search (blocked products; the approximate index graft uses above EXACT_LIMIT), the
    others a library index with the parameters given (``index_search``), searched for k + 1 neighbours. Also the
    share of the true 10 nearest neighbours found for 500 rows (the outlier scores' input)."""
    from graft.data.duplicates import centred_unit, neighbours

    vectors, truth = planted(size, dim, pairs=100)
    unit = centred_unit(vectors)
    del vectors
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports and the vectors themselves
    start = time.perf_counter()
    if method in ("exact", "graft"):
        result = neighbours(unit, 0.95, k, exact_limit=size if method == "exact" else 0)
        found, nearest = {tuple(pair) for pair in result.pairs.tolist()}, result.nearest_index
    else:
        keys, sims = index_search(method, unit, k + 1)
        rows = np.repeat(np.arange(size)[:, None], keys.shape[1], 1)
        keep = (keys != rows) & (keys >= 0) & (sims >= 0.95)
        found = {(int(min(a, b)), int(max(a, b))) for a, b in zip(rows[keep], keys[keep])}
        nearest = keys
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "vectors": size, "dim": dim, "seconds": seconds, "peak MiB": peak,
            "search MiB (peak over imports + vectors)": max(0.0, peak - before),
            "planted found": len(truth & found) / len(truth), "other pairs": len(found - truth),
            "10-NN recall": knn_recall(unit, nearest, 10)}


def knn_recall(unit: np.ndarray, nearest: np.ndarray, k: int, rows: int = 500) -> float:
    """The share of the true k nearest others (brute force) among ``nearest``'s, over ``rows`` random rows."""
    chosen = np.random.default_rng(1).choice(len(unit), min(rows, len(unit)), replace=False)
    similarity = unit[chosen] @ unit.T
    similarity[np.arange(len(chosen)), chosen] = -np.inf
    true = np.argpartition(-similarity, k, 1)[:, :k]
    return float(np.mean([len(set(t.tolist()) & (set(n.tolist()) - {c})) / k
                          for t, n, c in zip(true, nearest[chosen], chosen)]))


def scaling(args) -> list[dict]:
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for method in args.methods.split(";"):
            if method == "exact" and size > args.exact_max:
                continue
            done = subprocess.run([sys.executable, __file__, "--one", method, str(size), "--dim", str(args.dim)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{method} at {size} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
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
    parser.add_argument("--methods", default="exact;graft;faiss-hnsw:M=32,efc=40,efs=16",
                        help="scaling: methods separated by ';' (exact, graft, or a library index with parameters: "
                        "usearch:connectivity=16,expansion_add=128,expansion_search=64,dtype=f32, "
                        "faiss-hnsw:M=32,efc=40,efs=16, faiss-ivf:nlist=1024,nprobe=8)")
    parser.add_argument("--anchors", action="store_true", help="time and memory against the probe, a cold audit and "
                        "a K-fold fine-tune with cleanlab, on the first --data name")
    parser.add_argument("--cv-folds", type=int, default=3)
    parser.add_argument("--cv-epochs", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--cv-finetune", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cv_finetune:
        cv_finetune(Path(args.cv_finetune[0]), Path(args.cv_finetune[1]), args)
        return
    if args.anchors:
        table(anchors(args))
        return
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
