"""Multi-label: graft's one-vs-rest probe against scikit-learn's one-vs-rest logistic regression on the same features.

    python bench/bench_multilabel.py [--data ../shared/data/mnist_test10k] [--train 2000 --val 500 --test 1000]
                                     [--size 64] [--backbone tf_efficientnet_lite0]

A real multi-label set: mosaics of two MNIST digits side by side (the label set is the digits shown: one label when
both are the same digit), written to a temporary folder with a CSV manifest whose labels are space-separated (fastai's
convention, read with --multi-label). Train and val mosaics are made from the data's train/ digits, test mosaics from
its val/ digits, so no digit image is in two splits. ``graft fit --strategy probe`` runs end to end; then the same
cached features go to sklearn's ``OneVsRestClassifier(LogisticRegression)`` (default C = 1, and C chosen by 5-fold CV
on the log-loss with ``LogisticRegressionCV``) with thresholds 0.5 and thresholds chosen on val as graft chooses them.
Prints test mAP, micro/macro F1 and exact match of each, and the solve seconds (timings only meaningful on a quiet
machine). fastai's multi-label recipe is not compared: fastai is not installed here.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def digits(root: Path, split: str) -> list[tuple[Path, str]]:
    return [(path, folder.name) for folder in sorted((root / split).iterdir()) if folder.is_dir()
            for path in sorted(folder.iterdir())]


def mosaics(pool: list[tuple[Path, str]], count: int, folder: Path, split: str, rng: random.Random) -> list[str]:
    """``count`` images of two digits side by side; the CSV rows (path,label,split)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        (left, a), (right, b) = rng.sample(pool, 2)
        image = Image.new("L", (56, 28))
        image.paste(Image.open(left).convert("L").resize((28, 28)), (0, 0))
        image.paste(Image.open(right).convert("L").resize((28, 28)), (28, 0))
        name = f"{split}/{index:05d}.png"
        image.convert("RGB").save(folder / f"{index:05d}.png")
        rows.append(f"{name},{' '.join(sorted({a, b}))},{split}")
    return rows


def build(data: Path, out: Path, sizes: dict[str, int], seed: int) -> Path:
    rng = random.Random(seed)
    train_pool, test_pool = digits(data, "train"), digits(data, "val")
    rng.shuffle(train_pool)
    cut = len(train_pool) * 4 // 5  # val mosaics from digits train mosaics never use
    rows = ["path,label,split"]
    rows += mosaics(train_pool[:cut], sizes["train"], out / "train", "train", rng)
    rows += mosaics(train_pool[cut:], sizes["val"], out / "val", "val", rng)
    rows += mosaics(test_pool, sizes["test"], out / "test", "test", rng)
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out / "labels.csv"


def sklearn_rows(features, splits, classes):
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from graft.evaluation.multilabel import multilabel_metrics
    from graft.probing.multilabel import choose_thresholds

    x = {split: features.features[split].astype(np.float32) for split in ("train", "val", "test")}
    y = {split: splits.targets(features.paths[split]) for split in ("train", "val", "test")}
    scaler = StandardScaler().fit(x["train"])
    z = {split: scaler.transform(values) for split, values in x.items()}
    rows = []
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn 1.8's notices about LogisticRegressionCV
    for name, estimator in (("sklearn OvR LogisticRegression C=1", LogisticRegression(max_iter=2000)),
                            ("sklearn OvR LogisticRegressionCV (5-fold, log-loss)",
                             LogisticRegressionCV(Cs=10, cv=5, scoring="neg_log_loss", max_iter=2000))):
        start = time.perf_counter()
        model = OneVsRestClassifier(estimator).fit(z["train"], y["train"])
        seconds = time.perf_counter() - start
        test = model.predict_proba(z["test"])
        rows.append((f"{name}, thresholds 0.5", seconds, multilabel_metrics(test, y["test"], classes,
                                                                           [0.5] * len(classes))))
        chosen = choose_thresholds(model.predict_proba(z["val"]), y["val"])
        rows.append((f"{name}, thresholds on val", seconds, multilabel_metrics(test, y["test"], classes, chosen)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist_test10k"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from graft.config import load_config
    from graft.data.discovery import discover
    from graft.probing.extraction import extract_features
    from graft.training.fitting import fit

    root = Path(tempfile.mkdtemp(prefix="graft-bench-multilabel-"))
    manifest = build(Path(args.data), root / "mosaics", {"train": args.train, "val": args.val, "test": args.test},
                     args.seed)
    config = load_config(None, {"data.path": str(manifest), "data.multi_label": True, "output": str(root / "run"),
                                "model.backbone": args.backbone, "data.image_size": args.size,
                                "train.strategy": "probe", "data.cache_dir": str(root / "cache"),
                                "data.hflip": False, "train.extract_engine": "eager"})
    start = time.perf_counter()
    result = fit(config, verbose=False)
    fit_seconds = time.perf_counter() - start
    splits = discover(manifest, labels="multi")
    features = extract_features(splits, result.model.trunk, result.model.preprocessing, args.backbone,
                                root / "cache", workers=0, hflip=False, engine="eager")[result.model.trunk.node]
    from graft.probing.multilabel import fit_multilabel_probe

    start = time.perf_counter()  # the solve alone, on the features sklearn gets
    fit_multilabel_probe(features.features["train"], splits.targets(features.paths["train"]),
                         features.features["val"], splits.targets(features.paths["val"]))
    solve_seconds = time.perf_counter() - start
    rows = [("graft fit --multi-label --strategy probe (thresholds on val)", solve_seconds, result.metrics["test"])]
    rows += sklearn_rows(features, splits, result.model.classes)
    print(f"{args.backbone} at {args.size}px; two-digit mosaics from {args.data}: {args.train} train / {args.val} val "
          f"/ {args.test} test; graft fit end to end {fit_seconds:.1f}s (extraction included)")
    print("fastai's multi-label recipe: not compared (fastai is not installed)")
    print(f"{'method':<70} {'solve s':>8} {'test mAP':>9} {'micro F1':>9} {'macro F1':>9} {'exact':>7} "
          f"{'time vs graft':>14}")
    for name, seconds, metrics in rows:
        print(f"{name:<70} {seconds:>8.2f} {metrics['mAP']:>9.4f} {metrics['micro_f1']:>9.4f} "
              f"{metrics['macro_f1']:>9.4f} {metrics['exact_match']:>7.4f} {seconds / solve_seconds:>14.2f}")


if __name__ == "__main__":
    main()
