"""Issue 28, "Measure": the same data trained from a folder and from the equivalent Hugging Face dataset (written by
``datasets``' ``save_to_disk``, built here from the folder) gives the same metrics.

    python bench/bench_hfdatasets.py                         # flowers5, EfficientNet-Lite0 (ImageNet), 224 px, probe
    python bench/bench_hfdatasets.py --limit 50 --size 128   # 50 images a class a split, 128 px: a few minutes
    python bench/bench_hfdatasets.py --smoke                 # tiny random backbone on generated shapes: runs, no more

The dataset holds each image's stored bytes (an ``Image`` column) and its class (a ``ClassLabel`` with the folder's
class names), train and validation splits, rows in the order graft lists the folder. Both runs are ``graft fit
--strategy probe`` with the same seed and a fresh feature cache each (so both extract: the dataset's images are read
from graft's copy of their bytes, another path). It prints each run's val accuracy and loss, whether they are equal
(and the confusion matrices), and each run's wall time: on a shared machine the times are "busy machine" numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
if not SHARED.is_dir():  # a worktree under /work/wt/NAME: the data lies beside the main checkout
    SHARED = Path(__file__).resolve().parents[3] / "shared/data"


def subset(data: Path, limit: int, target: Path) -> Path:
    """The first ``limit`` files of every class folder of every split, copied (graft reads no links out)."""
    for split in ("train", "val"):
        for folder in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            (target / split / folder.name).mkdir(parents=True)
            for path in sorted(p for p in folder.iterdir() if p.is_file())[:limit]:
                shutil.copy2(path, target / split / folder.name / path.name)
    return target


def saved_dataset(data: Path, target: Path) -> tuple[Path, dict]:
    """``data`` (train/ and val/ class folders) as a DatasetDict written with ``save_to_disk``, rows in graft's own
    listing order; returns the folder and {split: rows}."""
    import datasets

    from graft.data.discovery import discover

    splits = discover(data)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=splits.classes)})
    parts, counts = {}, {}
    for name, samples in (("train", splits.train), ("validation", splits.val)):
        rows = {"image": [{"bytes": Path(path).read_bytes(), "path": Path(path).name} for path, _ in samples],
                "label": [label for _, label in samples]}
        parts[name] = datasets.Dataset.from_dict(rows, features=features)
        counts[name] = len(samples)
    datasets.DatasetDict(parts).save_to_disk(str(target))
    return target, counts


def fit_run(data: Path, output: Path, args) -> tuple[dict, float]:
    """``graft fit --strategy probe`` on ``data`` with a fresh feature cache: (val metrics, wall seconds)."""
    from graft.config import load_config
    from graft.training.fitting import fit

    values = {"data.path": str(data), "output": str(output), "model.backbone": args.backbone,
              "model.pretrained": args.pretrained, "data.image_size": args.size, "train.strategy": "probe",
              "train.seed": 0, "data.cache_dir": str(output.parent / f"cache-{output.name}")}
    start = time.perf_counter()
    result = fit(load_config(None, values), overwrite=True, verbose=False)
    return result.metrics["val"], time.perf_counter() - start


def report(name: str, counts: dict, rows: list[tuple[str, dict, float]], build_s: float, args) -> None:
    folder, dataset = rows[0][1], rows[1][1]
    weights = "ImageNet" if args.pretrained else "random"
    print(f"\n{name}: {counts['train']} train / {counts['validation']} val images, {args.backbone} ({weights}) at "
          f"{args.size} px, --strategy probe, seed 0")
    print(f"{'source':<32} {'val accuracy':>12} {'val loss':>10} {'wall s (busy machine)':>22}")
    for source, metrics, seconds in rows:
        print(f"{source:<32} {metrics['accuracy']:>12.4f} {metrics['loss']:>10.4f} {seconds:>22.1f}")
    same_accuracy = folder["accuracy"] == dataset["accuracy"]
    same_matrix = folder.get("confusion_matrix") == dataset.get("confusion_matrix")
    print(f"same metrics: accuracy {'equal' if same_accuracy else 'DIFFERENT'}, confusion matrix "
          f"{'equal' if same_matrix else 'DIFFERENT'}, |loss difference| {abs(folder['loss'] - dataset['loss']):.2e}")
    print(f"wall time ratio dataset / folder: {rows[1][2] / rows[0][2]:.2f} (the folder's run, first, also pays the "
          "imports; the dataset's run also writes graft's copy of the image bytes once); "
          f"building the dataset with save_to_disk took {build_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "flowers5", help="a folder with train/ and val/")
    parser.add_argument("--limit", type=int, default=0, help="images per class per split (0: all)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny random backbone on generated shapes, 32 px")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-bench-hfdatasets-") as temp:
        temp = Path(temp)
        os.environ["GRAFT_HF_IMAGES"] = str(temp / "hf-images")  # graft's copy of the bytes: here, not in ~/.cache
        data = args.data
        if args.smoke:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from synthetic import make_shapes

            data = make_shapes(temp / "shapes", splits={"train": 20, "val": 8}, seed=1)
            args.backbone, args.pretrained, args.size = "test_resnet", False, 32
        elif args.limit:
            data = subset(args.data, args.limit, temp / "subset")
        start = time.perf_counter()
        saved, counts = saved_dataset(data, temp / "saved")
        build_s = time.perf_counter() - start
        rows = []
        for source, path in (("folder", data), ("save_to_disk dataset", saved)):
            metrics, seconds = fit_run(path, temp / source.split()[0], args)
            rows.append((source, metrics, seconds))
            print(f"done: {source} in {seconds:.1f} s", flush=True)
        report(args.data.name if not args.smoke else "shapes (smoke)", counts, rows, build_s, args)


if __name__ == "__main__":
    main()
