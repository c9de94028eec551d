"""int8 vs fp32 ONNX (issue 24): images/s at batch 1 and 32 with 2 intra-op threads, and validation accuracy of each.

    python bench/bench_quantize.py                      # a probe run of EfficientNet-Lite0 at 224 px on flowers5
    python bench/bench_quantize.py --run runs/flowers   # an existing run (its own validation images)
    python bench/bench_quantize.py --smoke --backbone test_resnet --size 32   # proves the script works, in seconds

Without --run it trains a probe (frozen ImageNet trunk + solved linear head) on --data (default
../shared/data/flowers5, beside the checkout), then runs `graft export --format onnx --quantize int8
--force-quantize` (forced so the int8 row is always measured; the table says whether graft would have kept it).
The accuracies are the ones export measured on the run's validation images and recorded in export.json. The
timings use real validation images in the model's preprocessing, one ONNX Runtime session per model with
--threads intra-op threads; the ratio is int8 over fp32 in the same run. Goal: >= 1.7x images/s with <= 1 point lost.
--smoke keeps a few images per class and few repeats: it checks the script, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from graft.data.discovery import discover
from graft.data.images import load_image
from graft.data.transforms import create_transform
from graft.deploy.export import call_times, export
from graft.models.run_folder import load, read_card

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/flowers5"


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both this bench and bench_serve.py take: a run, or the data, backbone and size to train one."""
    parser.add_argument("--run", help="an existing run folder (default: a probe trained now on --data)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="train/ and val/ class folders")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)


def checked_data(args) -> Path:
    """``--data`` as a folder, or the exit saying what to pass (a given ``--run`` needs no data folder)."""
    data = Path(args.data)
    if not args.run and not data.is_dir():
        sys.exit(f"{data}: no such folder; pass --data (train/ and val/ class folders) or --run")
    return data


def small_copy(data: Path, folder: Path, train: int, val: int) -> Path:
    """``train``/``val`` images per class of ``data`` as symlinks under ``folder`` (the smoke run's data)."""
    splits = discover(data)
    for split, samples, limit in (("train", splits.train, train), ("val", splits.val, val)):
        taken: dict[int, int] = {}
        for path, label in samples:
            if taken.get(label, 0) < limit:
                taken[label] = taken.get(label, 0) + 1
                target = folder / split / splits.classes[label] / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(Path(path).resolve())
    return folder


def probe_run(data: Path, folder: Path, backbone: str, size: int) -> Path:
    from graft.config import load_config
    from graft.training.fitting import fit

    values = {"data.path": str(data), "output": str(folder / "run"), "model.backbone": backbone,
              "model.pretrained": backbone == "tf_efficientnet_lite0", "data.image_size": size,
              "train.strategy": "probe", "data.cache_dir": str(folder / "cache"), "data.workers": 0}
    return fit(load_config(None, values), verbose=False).run_dir


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def images_per_second(forward, images: torch.Tensor, batch: int, repeats: int) -> float:
    example = images[:batch]
    if len(example) < batch:  # fewer validation images than the batch (smoke): repeat them
        example = example.repeat((batch + len(example) - 1) // len(example), 1, 1, 1)[:batch]
    return batch / statistics.median(call_times(forward, example, repeats, warmup=3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls at batch 1 (batch 32: a fifth)")
    parser.add_argument("--smoke", action="store_true", help="4 train / 3 val images per class, 3 repeats")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-quantize-"))
    data = checked_data(args)
    if args.smoke:
        data, args.repeats = small_copy(data, root / "data", 4, 3), 3
    run = Path(args.run) if args.run else probe_run(data, root, args.backbone, args.size)
    result = export(run, root / "export", ("onnx",), data=None if args.run else str(data), quantize="int8",
                    force_quantize=True)
    done = result.quantization
    model = load(run)
    transform = create_transform(model.preprocessing)
    config = read_card(run)["config"]
    val = discover(config["data"]["path"] if args.run else data).val  # real images for the timings
    images = torch.stack([transform(load_image(path)) for path, _ in val[:32]])
    rows = {}
    for name, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        running = session(root / "export" / file, args.threads)

        def forward(batch, running=running):
            return running.run(None, {"images": batch.numpy()})

        rows[name] = (images_per_second(forward, images, 1, args.repeats),
                      images_per_second(forward, images, 32, max(3, args.repeats // 5)), done["accuracy"][name])
    print(f"{config['model']['backbone']} at {model.preprocessing.input_size[0]} px, {args.threads} intra-op "
          f"threads, {os.cpu_count()} CPUs; accuracy on "
          f"{done['evaluation_images']} validation images, calibrated on {done['calibration_images']} training images"
          f"{' (SMOKE: figures mean nothing)' if args.smoke else ''}")
    print(f"{'model':<6} {'img/s b1':>9} {'img/s b32':>10} {'val acc':>8}")
    for name, (single, batched, accuracy) in rows.items():
        print(f"{name:<6} {single:>9.1f} {batched:>10.1f} {accuracy:>8.4f}")
    print(f"int8/fp32: {rows['int8'][0] / rows['fp32'][0]:.2f}x at batch 1, {rows['int8'][1] / rows['fp32'][1]:.2f}x "
          f"at batch 32; accuracy {-done['accuracy_drop_points']:+.2f} points, top-1 agreement "
          f"{done['top1_agreement']:.4f}; graft would {'keep' if not done['forced'] else 'refuse'} it "
          "(goal: >= 1.7x with <= 1 point lost)")


if __name__ == "__main__":
    main()
