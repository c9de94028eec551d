"""graft's fine-tuning and feature extraction beside a bare timm loop on the same model, batch, AMP and channels-last,
on CUDA: images/s and the ratios (goals: fine-tune >= 0.95x the bare loop, extraction >= 0.9x the bare forward).

    python bench/bench_gpu.py [--backbone resnet50] [--batch 128] [--size 224] [--steps 40] [--compile off]
    python bench/bench_gpu.py --device cpu --smoke   # proves the script runs (tiny settings; not a measurement)

Both sides read the same generated JPEG folder through a DataLoader with graft's loader settings
(graft.data.datasets.loader_options), so the ratio is graft's overhead, not a different input pipeline. graft's
extraction autocasts as ``--precision auto`` does (bf16 where the GPU supports it), so compare extraction at the
default ``--precision bf16``. The first pass of each side is a warm-up (cuDNN autotuning, allocator, compile) and
is not timed. Without CUDA it prints "no CUDA device: not measured" and exits 0: bench/RESULTS.md records rows
only from real runs. graft's fit holds out 5% for validation (not timed), so it trains on 95% of the same images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _make_images(root: Path, count: int, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)
    return root


def _loader(data: Path, size: int, batch: int, device: torch.device, workers: int, train: bool):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from graft.data.datasets import loader_options

    steps = [v2.RandomResizedCrop(size) if train else v2.Resize((size, size)), v2.ToImage(),
             v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return torch.utils.data.DataLoader(ImageFolder(str(data), v2.Compose(steps)), batch_size=batch, shuffle=train,
                                       drop_last=train, **loader_options(device, workers, persistent=True))


def _timed(loader, step, device: torch.device, passes: int) -> float:
    """Images/s over ``passes`` passes after one warm-up pass."""
    for images, labels in loader:
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seen, start = 0, time.perf_counter()
    for _ in range(passes):
        for images, labels in loader:
            step(images, labels)
            seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bare_finetune(args, data: Path, device: torch.device, dtype) -> float:
    import timm

    model = timm.create_model(args.backbone, pretrained=False, num_classes=3).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    forward = torch.compile(model) if args.compile != "off" else model

    def step(images, labels):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return _timed(_loader(data, args.size, args.batch, device, args.workers, True), step, device, args.passes)


def bare_extract(args, data: Path, device: torch.device, dtype) -> float:
    import timm

    model = timm.create_model(args.backbone, pretrained=False, num_classes=0).to(device)
    model = model.to(memory_format=torch.channels_last).eval()
    forward = torch.compile(model) if args.compile != "off" else model

    @torch.inference_mode()
    def step(images, labels):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            forward(images).float().cpu()

    return _timed(_loader(data, args.size, args.batch, device, args.workers, False), step, device, args.passes)


def graft_finetune(args, data: Path, device: torch.device, work: Path) -> float:
    from graft.config import load_config
    from graft.training.fitting import fit

    config = load_config(None, {
        "data.path": str(data), "output": str(work / "run"), "model.backbone": args.backbone,
        "model.pretrained": False, "data.image_size": args.size, "data.batch_size": args.batch,
        "data.workers": args.workers, "data.augment": "light", "train.strategy": "finetune",
        "train.head_fit": "epochs", "train.head_epochs": 0, "train.epochs": args.passes + 1, "train.patience": 0,
        "train.device": str(device), "train.precision": args.precision, "train.compile": args.compile,
        "data.val_fraction": 0.05})
    history = fit(config, verbose=False).history
    rows = history[1:] or history  # the first epoch is the warm-up
    return sum(row["images_per_s"] for row in rows) / len(rows)


def graft_extract(args, data: Path, device: torch.device, work: Path) -> float:
    from graft.data.discovery import discover
    from graft.probing.leaderboard import stage_features

    splits = discover(str(data))
    stage_features(splits, args.backbone, "default", args.size, pretrained=False, cache_dir=work / "warm",
                   device=str(device), batch_size=args.batch, workers=args.workers, compile_mode=args.compile)
    _, _, sets = stage_features(splits, args.backbone, "default", args.size, pretrained=False,
                                cache_dir=work / "timed", device=str(device), batch_size=args.batch,
                                workers=args.workers, compile_mode=args.compile)
    return next(iter(sets.values())).stats["images_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=40, help="batches per timed pass")
    parser.add_argument("--passes", type=int, default=2, help="timed passes after the warm-up pass")
    parser.add_argument("--workers", type=int, default=-1, help="-1: graft's automatic count")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--compile", default="off", help="off or a torch.compile mode, for both sides")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: proves the script runs, measures nothing")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: not measured")
        return 0
    if args.smoke:
        args.backbone, args.batch, args.size, args.steps, args.passes, args.precision = (
            "test_resnet", 8, 32, 2, 1, "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    with tempfile.TemporaryDirectory(prefix="graft-bench-gpu-") as temp:
        work = Path(temp)
        data = _make_images(work / "data", args.batch * args.steps, max(args.size, 64))
        rows = [("fine-tune", graft_finetune(args, data, device, work / "fit"),
                 bare_finetune(args, data, device, dtype), 0.95),
                ("extraction", graft_extract(args, data, device, work / "features"),
                 bare_extract(args, data, device, dtype), 0.9)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.backbone} {args.size}px batch {args.batch} {args.precision} channels-last compile={args.compile} "
          f"on {name}{' (smoke: not a measurement)' if args.smoke else ''}")
    print("| task | graft img/s | bare img/s | ratio | goal |\n|---|---:|---:|---:|---:|")
    for task, ours, bare, goal in rows:
        print(f"| {task} | {ours:.1f} | {bare:.1f} | {ours / bare:.3f} | >= {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
