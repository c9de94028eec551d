"""Peak RSS of a fit on N vs 10xN tiny images (same batch): graft's memory should not grow with the dataset.

Each fit runs in its own subprocess (``resource.getrusage(RUSAGE_CHILDREN)`` is the child's peak RSS); the folder
path also covers the scan cache and the dataset's sample list, ``--shards`` the tar-shard stream.

    python bench/bench_memory_flat.py [--images 300] [--shards]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, resource, sys
from graft.config import load_config
from graft.training.fitting import fit
values = {"data.path": sys.argv[1], "output": sys.argv[2], "model.backbone": "test_resnet", "model.pretrained": False,
          "data.image_size": 32, "data.workers": 0, "data.batch_size": 16, "data.augment": "none",
          "train.epochs": 1, "train.head_epochs": 1, "train.lr": 1e-2, "train.strategy": "finetune"}
fit(load_config(None, values), verbose=False)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _make(root: Path, per_class: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from synthetic import make_shapes

    return make_shapes(root, splits={"train": per_class, "val": max(2, per_class // 4)}, seed=0, size=32)


def _peak(data: Path, output: Path) -> float:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(data), str(output)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="training images in the small run (3 classes)")
    parser.add_argument("--shards", action="store_true", help="fit from tar shards written from each folder")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for scale in (1, 10):
            data = _make(Path(folder) / f"data-{scale}", args.images * scale // 3)
            if args.shards:
                from graft.data.sharding import shard_dataset

                shard_dataset(data, Path(folder) / f"shards-{scale}", shard_size="16MB")
                data = Path(folder) / f"shards-{scale}"
            rows.append((scale, args.images * scale, _peak(data, Path(folder) / f"run-{scale}")))
    print("| source | train images | peak RSS (MB) | vs 1x |\n|---|---:|---:|---:|")
    for scale, images, peak in rows:
        print(f"| {'shards' if args.shards else 'folder'} | {images:,} | {peak:.0f} | {peak / rows[0][2]:.3f} |")


if __name__ == "__main__":
    main()
