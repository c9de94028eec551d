"""Feature extraction on real data: throughput vs the bare backbone, cache hit speed-up, where time goes, memory.

    python bench/bench_features.py [--data ../shared/data/flowers5] [--backbone tf_efficientnet_lite0] [--size 224]

Baselines measured in the same run: the backbone's forward pass on random tensors at the same batch size (the
target: extraction >= 90% of it), and the first (cold-cache) extraction (the target: a warm rerun >= 20x faster).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from graft.models.backbones.registry import create_backbone
from graft.data.discovery import discover
from graft.data.datasets import resolve_workers
from graft.probing.extraction import FeatureExtractor, _ViewDataset, extract_features
from graft.models.surgery import DEFAULT_NODE


def bare_forward(net, size: int, batch: int, batches: int) -> float:
    extractor = FeatureExtractor(net, [DEFAULT_NODE]).eval().to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        extractor(images)
        start = time.perf_counter()
        for _ in range(batches):
            extractor(images)
    return batches * batch / (time.perf_counter() - start)


def decode_only(paths, preprocessing, batch: int, workers: int) -> float:
    loader = DataLoader(_ViewDataset(paths, preprocessing, 0), batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/flowers5"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=-1)
    args = parser.parse_args()
    splits = discover(args.data)
    paths = [p for split in (splits.train, splits.val, splits.test) for p, _ in split]
    backbone = create_backbone(args.backbone)
    preprocessing = backbone.preprocessing.with_size(args.size)
    before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, the model, the file list
    cache = Path(tempfile.mkdtemp(prefix="graft-bench-cache-"))
    try:
        extractor = FeatureExtractor(backbone.net, [DEFAULT_NODE])
        start = time.perf_counter()
        cold = extract_features(splits, extractor, preprocessing, args.backbone, cache, args.batch, args.workers)
        cold_seconds = time.perf_counter() - start
        assert cold[DEFAULT_NODE].stats["cached"] == 0, "the cold run must start from an empty cache"
        start = time.perf_counter()
        warm = extract_features(splits, extractor, preprocessing, args.backbone, cache, args.batch, args.workers)
        warm_seconds = time.perf_counter() - start
        assert warm[DEFAULT_NODE].stats["extracted"] == 0
        cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    forward = bare_forward(backbone.net, args.size, args.batch, batches=max(4, min(20, len(paths) // args.batch // 4)))
    workers = resolve_workers(args.workers, torch.device("cpu"))
    decode = decode_only(paths[: min(len(paths), 1024)], preprocessing, args.batch, workers)
    extraction = len(paths) / cold_seconds
    image_bytes = len(paths) * 3 * args.size * args.size * 4
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.backbone} at {args.size}px, batch {args.batch}, {len(paths)} images of {args.data}, "
          f"{torch.get_num_threads()} threads, {workers} loader workers")
    print(f"{'measure':<44} {'value':>12}")
    rows = [
        ("bare forward (random tensors), img/s", f"{forward:.1f}"),
        ("extraction end to end (cold cache), img/s", f"{extraction:.1f}"),
        ("  ratio to bare forward (target >= 0.90)", f"{extraction / forward:.2f}"),
        ("decode + resize alone (loader only), img/s", f"{decode:.1f}"),
        ("cold extraction, s", f"{cold_seconds:.2f}"),
        ("warm rerun (all cached), s", f"{warm_seconds:.3f}"),
        ("  speed-up (target >= 20)", f"{cold_seconds / warm_seconds:.0f}x"),
        ("cache on disk, MiB", f"{cache_bytes / 2**20:.1f}"),
        ("the same images as float32 tensors, MiB", f"{image_bytes / 2**20:.0f}"),
        ("resident memory before extraction, MiB", f"{before_mib:.0f}"),
        ("peak resident memory of this process, MiB", f"{peak_mib:.0f}"),
    ]
    for name, value in rows:
        print(f"{name:<44} {value:>12}")


if __name__ == "__main__":
    main()
