"""Training and inference throughput of a real backbone: NCHW (PyTorch's default) vs channels-last (graft's default).

    python bench/bench_layout.py [--backbone tf_efficientnet_lite0] [--size 128] [--batch 32] [--steps 5]

Prints a table and the channels-last / NCHW ratio measured in the same run. Random tensors, so the data pipeline
is not measured here.
"""

from __future__ import annotations

import argparse
import time

import torch

from graft.models.backbones.registry import create_backbone
from graft.models.heads import create_head
from graft.models.grafted import GraftModel
from graft.models.surgery import cut


def throughput(model, batch, steps: int, train: bool) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.zeros(batch.shape[0], dtype=torch.long)
    model.train(train)
    for step in range(steps + 1):  # the first step warms up (allocations, kernel choice) and is not timed
        if step == 1:
            start = time.perf_counter()
        if train:
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode():
                model(batch)
    return steps * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, pretrained=False)
    trunk, width = cut(backbone.net, None, "avg", (args.size, args.size))
    model = GraftModel(trunk, create_head(width, 10), [str(i) for i in range(10)], backbone.preprocessing)
    batch = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for mode in ("train", "inference"):
        nchw = throughput(model.to(memory_format=torch.contiguous_format), batch, args.steps, mode == "train")
        last = throughput(model.to(memory_format=torch.channels_last),
                          batch.contiguous(memory_format=torch.channels_last), args.steps, mode == "train")
        rows.append((mode, nchw, last))
    print(f"{args.backbone} at {args.size}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'mode':<10} {'NCHW img/s':>11} {'channels-last img/s':>20} {'ratio':>6}")
    for mode, nchw, last in rows:
        print(f"{mode:<10} {nchw:>11.1f} {last:>20.1f} {last / nchw:>6.2f}")


if __name__ == "__main__":
    main()
