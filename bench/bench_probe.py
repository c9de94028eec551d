"""Linear probe, graft's way (extract once + L-BFGS over an L2 path) vs the classic way (a frozen-trunk head trained
for E epochs, a forward pass every epoch, like fastai's frozen stage or Keras' trainable=False).

    python bench/bench_probe.py [--data ../shared/data/flowers5] [--epochs 5,10] [--size 224]

Both use the same real backbone, split, image size and evaluation; the cache starts cold. Prints wall time,
validation accuracy and the time ratio (target: >= E x faster at equal or better accuracy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.config import load_config
from graft.training.fitting import fit


def run(data: str, output: Path, size: int, **overrides) -> tuple[float, float]:
    values = {"data.path": data, "output": str(output), "model.backbone": "tf_efficientnet_lite0",
              "data.image_size": size, "train.strategy": "probe", "train.patience": 0, **overrides}
    start = time.perf_counter()
    result = fit(load_config(None, values), overwrite=True, verbose=False)
    return time.perf_counter() - start, result.metrics["val"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/flowers5"))
    parser.add_argument("--epochs", default="5,10")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-probe-"))
    rows = []
    seconds, accuracy = run(args.data, root / "lbfgs", args.size, **{"data.cache_dir": str(root / "cache")})
    rows.append(("graft: extract + L-BFGS path (cold cache)", seconds, accuracy))
    warm_seconds, warm_accuracy = run(args.data, root / "lbfgs2", args.size, **{"data.cache_dir": str(root / "cache")})
    rows.append(("graft: same, warm cache", warm_seconds, warm_accuracy))
    for epochs in (int(e) for e in args.epochs.split(",")):
        classic = run(args.data, root / f"classic{epochs}", args.size, **{"train.head_fit": "epochs",
                                                                           "train.epochs": epochs})
        rows.append((f"classic: head trained {epochs} epochs (augmented)", *classic))
    print(f"EfficientNet-Lite0 (ImageNet) at {args.size}px on {args.data}")
    print(f"{'method':<48} {'seconds':>8} {'val acc':>8} {'time ratio vs graft cold':>25}")
    for name, seconds_, accuracy_ in rows:
        print(f"{name:<48} {seconds_:>8.1f} {accuracy_:>8.4f} {seconds_ / seconds:>25.2f}")


if __name__ == "__main__":
    main()
