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
machine).

fastai's multi-label recipe runs in a subprocess with ``--fastai-libs`` (default /tmp/fastai-libs) on its
PYTHONPATH only, so fastai never changes the venv's torch. Install it there with

    pip install --target /tmp/fastai-libs --no-deps fastai fastcore "fastprogress==1.0.3" fasttransform \
        plum-dispatch fastdownload beartype

(fastprogress 1.1 imports python-fasthtml; 1.0.3 does not). Without it the bench prints "fastai not installed:
skipped". The recipe: the same backbone and ImageNet weights as graft's (``create_backbone``; the body is timm's
``forward_features``), fastai's ``create_head``, ``MultiCategoryBlock`` with space-separated labels,
``BCEWithLogitsLossFlat``, ``fine_tune(--epochs)`` (one frozen epoch, then all layers) at fastai's default rate;
scored at 0.5 (fastai's ``accuracy_multi`` threshold) and at thresholds chosen on val as graft chooses them.
``--finetune`` also runs ``graft fit --strategy finetune --epochs N`` on the same mosaics.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
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


FASTAI_MISSING = 3  # the worker's exit status when fastai cannot be imported


def fastai_worker(manifest: str, out: str, backbone: str, size: int, epochs: int, batch: int) -> None:
    """Runs in the subprocess: fastai's multi-label recipe on the mosaics; writes the val and test probabilities."""
    try:
        from fastai.vision.all import (BCEWithLogitsLossFlat, ColReader, DataBlock, ImageBlock, Learner,
                                       MultiCategoryBlock, Normalize, Resize, accuracy_multi, create_head, params)
    except ImportError:
        sys.exit(FASTAI_MISSING)
    import pandas as pd
    import torch
    from torch import nn

    from graft.models.backbones.registry import create_backbone

    torch.manual_seed(0)
    frame = pd.read_csv(manifest)
    frame["path"] = [str(Path(manifest).parent / path) for path in frame["path"]]
    trained = frame[frame["split"] != "test"].reset_index(drop=True)
    backbone_ = create_backbone(backbone)
    prep = backbone_.preprocessing

    class Body(nn.Module):  # timm's feature maps, as fastai's create_body keeps them
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_features(x)

    block = DataBlock(blocks=(ImageBlock, MultiCategoryBlock(encoded=False)), get_x=ColReader("path"),
                      get_y=ColReader("label", label_delim=" "),
                      splitter=lambda items: (list(items.index[items["split"] == "train"]),
                                              list(items.index[items["split"] == "val"])),
                      item_tfms=Resize(size), batch_tfms=Normalize.from_stats(list(prep.mean), list(prep.std)))
    dls = block.dataloaders(trained, bs=batch, num_workers=0)
    vocab = list(dls.vocab)
    model = nn.Sequential(Body(backbone_.net), create_head(backbone_.net.num_features, len(vocab)))
    learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat(), metrics=[accuracy_multi],
                    splitter=lambda m: [params(m[0]), params(m[1])])
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs)
        val, _ = learn.get_preds(dl=dls.test_dl(frame[frame["split"] == "val"], with_labels=False))
        test, _ = learn.get_preds(dl=dls.test_dl(frame[frame["split"] == "test"], with_labels=False))
    paths = {split: np.array(list(frame[frame["split"] == split]["path"]), dtype=str) for split in ("val", "test")}
    np.savez(out, vocab=np.array([str(name) for name in vocab], dtype=str), val=val.numpy(), test=test.numpy(),
             seconds=time.perf_counter() - start, val_paths=paths["val"], test_paths=paths["test"])


def fastai_rows(manifest: Path, args, splits, classes: list[str]) -> tuple[list, str]:
    """fastai's rows (at 0.5 and at thresholds chosen on val) and a note; none when fastai is not installed."""
    from graft.evaluation.multilabel import multilabel_metrics
    from graft.probing.multilabel import choose_thresholds

    out = manifest.parent.parent / "fastai.npz"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.fastai_libs, root])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--fastai-worker", str(manifest), str(out), "--backbone",
                           args.backbone, "--size", str(args.size), "--epochs", str(args.epochs), "--batch",
                           str(args.batch)], env=env)
    wall = time.perf_counter() - start
    if done.returncode == FASTAI_MISSING:
        return [], f"fastai not installed: skipped (install it under {args.fastai_libs}; see the docstring)"
    if done.returncode:
        return [], f"fastai's run failed (exit {done.returncode}): skipped"
    saved = np.load(out)
    order = [list(saved["vocab"]).index(name) for name in classes]  # fastai's vocab to graft's class order
    val, test = saved["val"][:, order], saved["test"][:, order]
    val_y, test_y = splits.targets(list(saved["val_paths"])), splits.targets(list(saved["test_paths"]))
    name = f"fastai fine_tune({args.epochs}) BCE"
    rows = [(f"{name}, thresholds 0.5", wall, multilabel_metrics(test, test_y, classes, [0.5] * len(classes))),
            (f"{name}, thresholds on val", wall, multilabel_metrics(test, test_y, classes,
                                                                    choose_thresholds(val, val_y)))]
    return rows, f"fastai: {wall:.1f}s end to end in its subprocess (training {float(saved['seconds']):.1f}s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist_test10k"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4, help="fastai's fine_tune epochs (and --finetune's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--finetune", action="store_true", help="also graft fit --strategy finetune --epochs N")
    parser.add_argument("--fastai-libs", default="/tmp/fastai-libs", help="fastai installed with pip --target")
    parser.add_argument("--fastai-worker", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fastai_worker:
        fastai_worker(*args.fastai_worker, args.backbone, args.size, args.epochs, args.batch)
        return

    from graft.config import load_config
    from graft.data.discovery import discover
    from graft.probing.extraction import extract_features
    from graft.training.fitting import fit

    root = Path(tempfile.mkdtemp(prefix="graft-bench-multilabel-"))
    manifest = build(Path(args.data), root / "mosaics", {"train": args.train, "val": args.val, "test": args.test},
                     args.seed)
    values = {"data.path": str(manifest), "data.multi_label": True, "output": str(root / "run"),
              "model.backbone": args.backbone, "data.image_size": args.size, "train.strategy": "probe",
              "data.cache_dir": str(root / "cache"), "data.hflip": False, "train.extract_engine": "eager"}
    config = load_config(None, values)
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
    classes = result.model.classes
    solve = [("graft one-vs-rest probe (thresholds on val)", solve_seconds, result.metrics["test"])]
    solve += sklearn_rows(features, splits, classes)
    whole = [("graft fit --multi-label --strategy probe", fit_seconds, result.metrics["test"])]
    if args.finetune:
        tuned_config = load_config(None, {**values, "output": str(root / "finetuned"), "train.strategy": "finetune",
                                          "train.epochs": args.epochs, "data.batch_size": args.batch})
        start = time.perf_counter()
        tuned = fit(tuned_config, verbose=False)
        whole.append((f"graft fit --multi-label --strategy finetune --epochs {args.epochs}",
                      time.perf_counter() - start, tuned.metrics["test"]))
    fastai, note = fastai_rows(manifest, args, splits, classes)
    whole += fastai
    print(f"{args.backbone} at {args.size}px; two-digit mosaics from {args.data}: {args.train} train / {args.val} val "
          f"/ {args.test} test ({len(classes)} labels); {os.cpu_count()} CPUs")
    print(note)
    for title, rows in (("on the same cached features: the solve's seconds", solve),
                        ("end to end from the images: wall seconds (extraction, training, prediction)", whole)):
        print(f"\n{title}")
        print(f"{'method':<62} {'seconds':>8} {'test mAP':>9} {'micro F1':>9} {'macro F1':>9} {'exact':>7} "
              f"{'time vs graft':>14}")
        for name, seconds, metrics in rows:
            print(f"{name:<62} {seconds:>8.2f} {metrics['mAP']:>9.4f} {metrics['micro_f1']:>9.4f} "
                  f"{metrics['macro_f1']:>9.4f} {metrics['exact_match']:>7.4f} {seconds / rows[0][1]:>14.2f}")

if __name__ == "__main__":
    main()
