"""The inference engine: graft's extraction from JPEG files (eager vs ONNX Runtime engine) against ONNX Runtime alone
on preprocessed tensors, and `predict` eager vs ONNX Runtime on a folder of photos.

    python bench/bench_engine.py [--data ../shared/data/flowers5/val] [--backbone tf_efficientnet_lite0] [--size 224]
                                 [--run RUN] [--limit N] [--plans 2:1:1,1:1:1]

Every figure is measured in this one run, on the same images, so the ratios hold on a noisy machine only as far as
it is quiet. Without ``--run`` a run folder is made from the backbone with an untrained head (its speed is a trained
run's; its predictions are only compared, never scored). ``--limit 32`` is the smoke configuration.

Extraction and predict run with graft's defaults (decoding threads on the CPU, ``graft.data.prefetch``) and, as the
baseline of that change, with decoding in the calling thread (``workers`` 0, as before it). ``--plans`` adds
extraction rows for other thread splits, each ``COMPUTE:DECODE:AHEAD`` (ONNX Runtime's threads, decoding threads,
batches decoded ahead of the forward), e.g. ``2:1:1`` (overlap, one decoder beside two session threads) and
``1:1:1`` (the cores split): the data for ``decode_plan``'s rule on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from graft.config import load_config
from graft.data.discovery import discover
from graft.data.images import load_image
from graft.data.prefetch import DecodePlan, engine_plan
from graft.data.transforms import create_transform
from graft.evaluation.inference import predict
from graft.models.backbones.registry import create_backbone
from graft.models.grafted import create_model
from graft.models.onnx_engine import onnx_session
from graft.models.run_folder import model_card, save_model
from graft.models.surgery import DEFAULT_NODE
from graft.probing.extraction import FeatureExtractor, extract_features
from graft.utils.outputs import claim

SHARED = Path(__file__).resolve().parents[2] / "shared/data"


def limited(splits, limit: int):
    """``splits`` keeping about ``limit`` images (0: all), every k-th of each split: every class stays in."""
    total = sum(len(getattr(splits, name)) for name in ("train", "val", "test"))
    if not limit or limit >= total:
        return splits
    step = -(-total // limit)
    return dataclasses.replace(splits, **{name: getattr(splits, name)[::step] for name in ("train", "val", "test")})


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def extraction(splits, backbone, preprocessing, name: str, batch: int | None, engine: str, cache: Path,
               workers: int = -1, decode: DecodePlan | None = None) -> tuple[float, dict]:
    """(images/s of a cold-feature-cache extraction, stats); the once-per-machine work (onnx: the export; eager: the
    batch size and layout measurement) is done (and timed) first, once per ``cache``. ``batch`` None, ``workers`` -1
    and ``decode`` None: graft's defaults (threads decode as ``engine_plan`` says)."""
    extractor = FeatureExtractor(backbone.net, [DEFAULT_NODE])
    export_s = 0.0
    if not cache.is_dir():  # once per backbone/cut/size: onnx's export, eager's batch/layout measurement, timed apart
        export_s, _ = timed(lambda: extract_features(limited(splits, 2), extractor, preprocessing, name, cache, batch,
                                                     0, engine=engine))
    for space in cache.iterdir() if cache.is_dir() else ():  # a cold feature cache, the export kept
        if space.name not in ("onnx", "tuning"):
            shutil.rmtree(space)
    seconds, sets = timed(lambda: extract_features(splits, extractor, preprocessing, name, cache, batch, workers,
                                                   engine=engine, decode=decode))
    stats = sets[DEFAULT_NODE].stats
    assert stats["cached"] == 0 and stats["engine"] == engine, stats
    return stats["extracted"] / seconds, {"export_s": export_s, "features": sets[DEFAULT_NODE]}


def preprocessed(paths: list[str], preprocessing) -> torch.Tensor:
    transform = create_transform(preprocessing)
    return torch.stack([transform(load_image(path)) for path in paths])


def runtime_alone(onnx_file: Path, images: torch.Tensor, batch: int) -> float:
    """Images/s of ONNX Runtime on preprocessed float32 tensors (intra-op threads: torch's), after one warm-up."""
    session = onnx_session(onnx_file, torch.get_num_threads())
    array = images.numpy()
    session.run(None, {"images": array[:batch]})
    start = time.perf_counter()
    for first in range(0, len(array), batch):
        session.run(None, {"images": array[first:first + batch]})
    return len(array) / (time.perf_counter() - start)


def eager_alone(net, images: torch.Tensor, batch: int) -> float:
    extractor = FeatureExtractor(net, [DEFAULT_NODE]).eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        extractor(images[:batch].contiguous(memory_format=torch.channels_last))
        start = time.perf_counter()
        for first in range(0, len(images), batch):
            extractor(images[first:first + batch].contiguous(memory_format=torch.channels_last))
    return len(images) / (time.perf_counter() - start)


def make_run(folder: Path, backbone: str, size: int, classes: list[str]) -> Path:
    """A run folder of ``backbone`` with an untrained linear head: what predict loads, at a trained run's speed."""
    config = load_config(None, {"model.backbone": backbone, "data.image_size": size, "output": str(folder)})
    model, info = create_model(config, classes)
    folder.mkdir(parents=True)
    claim(folder)
    save_model(folder, model, model_card(model, config, info))
    return folder


def predict_speed(run: Path, paths: list[str], runtime: str, workers: int = -1) -> tuple[float, float, list]:
    """(images/s of predict on ``paths``, seconds of the first call's set-up on a few images, the rows); ``workers``
    -1: graft's default (decoding threads), 0: decoding in the calling thread."""
    setup_s, _ = timed(lambda: predict(run, paths[:2], device="cpu", runtime=runtime))  # loads; onnx: exports
    seconds, rows = timed(lambda: predict(run, paths, device="cpu", runtime=runtime, workers=workers))
    return len(paths) / seconds, setup_s, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "flowers5/val"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=0,
                        help="extraction batch (0: graft's choice: 16 for onnx, measured for eager); 16 for the "
                        "'alone' rows when 0")
    parser.add_argument("--run", type=Path, default=None, help="a trained run for predict (default: one made here)")
    parser.add_argument("--limit", type=int, default=0, help="first N images only (smoke: 32)")
    parser.add_argument("--plans", default="", help="more extraction thread splits, COMPUTE:DECODE:AHEAD,...")
    args = parser.parse_args()
    args.plans = [DecodePlan(*map(int, plan.split(":"))) for plan in args.plans.split(",") if plan.strip()]
    splits = limited(discover(args.data, val_fraction=0.2), args.limit)
    paths = [path for name in ("train", "val", "test") for path, _ in getattr(splits, name)]
    backbone = create_backbone(args.backbone)
    preprocessing = backbone.preprocessing.with_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="graft-bench-engine-"))
    try:
        rows = measure(args, splits, paths, backbone, preprocessing, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.backbone} at {args.size} px, {len(paths)} images of {args.data}, {torch.get_num_threads()} "
          f"threads, extraction batch {args.batch or 'graft default'}, onnx decode plan {engine_plan(True)}")
    print("| path | images/s | ratio |")
    print("|---|---|---|")
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")


def measure(args, splits, paths, backbone, preprocessing, work: Path) -> list[tuple[str, str, str]]:
    def extract(engine: str, workers: int = -1, decode: DecodePlan | None = None) -> tuple[float, dict]:
        return extraction(splits, backbone, preprocessing, args.backbone, args.batch or None, engine, work / engine,
                          workers, decode)

    eager_ips, eager = extract("eager")
    tuned = {path.name: json.loads(path.read_text()) for path in (work / "eager" / "tuning").glob("*.json")}
    chosen = "; ".join(f"batch {t['batch_size']}{'' if t['channels_last'] else ' nchw'}, measured {t['images_per_s']}"
                       for t in tuned.values())
    onnx_ips, onnx = extract("onnx")
    onnx_sequential_ips, _ = extract("onnx", workers=0)
    plans = [(plan, extract("onnx", decode=plan)[0]) for plan in args.plans]
    difference = np.abs(eager["features"].features["train"].astype(np.float32)
                        - onnx["features"].features["train"].astype(np.float32)).max()
    (onnx_file,) = (work / "onnx" / "onnx").glob("*.onnx")
    images = preprocessed(paths, preprocessing)
    batch = args.batch or 16
    alone_1, alone_b = runtime_alone(onnx_file, images, 1), runtime_alone(onnx_file, images, batch)
    torch_b = eager_alone(backbone.net, images, batch)
    run = args.run or make_run(work / "run", args.backbone, args.size, splits.classes)
    torch_ips, torch_setup, torch_rows = predict_speed(run, paths, "torch")
    torch_sequential_ips, _, _ = predict_speed(run, paths, "torch", workers=0)
    ort_ips, ort_setup, ort_rows = predict_speed(run, paths, "onnx")
    ort_sequential_ips, _, _ = predict_speed(run, paths, "onnx", workers=0)
    agree = sum(a.labels[:1] == b.labels[:1] for a, b in zip(torch_rows, ort_rows))
    return [
        ("extraction from JPEG files, eager engine", f"{eager_ips:.1f}", f"{eager_ips / alone_b:.2f} of ORT alone"),
        ("extraction from JPEG files, onnx engine (graft's default)", f"{onnx_ips:.1f}",
         f"{onnx_ips / alone_b:.2f} of ORT alone; {onnx_ips / eager_ips:.2f}x eager"),
        ("  onnx engine, decoding in the calling thread (workers 0)", f"{onnx_sequential_ips:.1f}",
         f"{onnx_sequential_ips / alone_b:.2f} of ORT alone"),
        *[(f"  onnx engine, decode plan {plan}", f"{value:.1f}", f"{value / alone_b:.2f} of ORT alone")
          for plan, value in plans],
        ("  (the trunk's export and check, once per backbone/cut/size, s)", f"{onnx['export_s']:.1f}", ""),
        ("  (eager: batch size and layout measured, once per machine and graph, s)", f"{eager['export_s']:.1f}",
         chosen or f"--batch {args.batch}"),
        ("  (max |feature difference| onnx vs eager, float16 cache)", f"{difference:.1e}", ""),
        (f"ONNX Runtime alone, preprocessed tensors, batch 1 / {batch}", f"{alone_1:.1f} / {alone_b:.1f}", "1.00"),
        (f"eager PyTorch alone, preprocessed tensors, channels-last, batch {batch}", f"{torch_b:.1f}",
         f"{torch_b / alone_b:.2f} of ORT alone"),
        ("predict --runtime torch (decode included, batch 32)", f"{torch_ips:.1f}", "1.00"),
        ("  torch, decoding in the calling thread (workers 0)", f"{torch_sequential_ips:.1f}",
         f"{torch_sequential_ips / torch_ips:.2f}x torch"),
        ("predict --runtime onnx (decode included, batch 32)", f"{ort_ips:.1f}", f"{ort_ips / torch_ips:.2f}x torch"),
        ("  onnx, decoding in the calling thread (workers 0)", f"{ort_sequential_ips:.1f}",
         f"{ort_sequential_ips / torch_ips:.2f}x torch"),
        ("  (predict set-up: load (+ export and check for onnx), s)", f"{torch_setup:.1f} / {ort_setup:.1f}", ""),
        ("  (top-1 agreement onnx vs torch)", f"{agree}/{len(paths)}", ""),
    ]


if __name__ == "__main__":
    main()
