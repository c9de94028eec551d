"""Linear probes from every stage of a real backbone on two domains: where do the classes separate best?

    python bench/bench_stages.py [--datasets ../shared/data/flowers5,../shared/data/mnist_test10k] [--size 224]

One pass per dataset extracts every stage (cached); each stage gets an L-BFGS probe (L2 chosen on val) and a k-NN
score, and `graft advise` turns the table into a recommendation. The baseline for the probe is the plain
frozen-feature linear probe quoted in ../shared/data/README.md (flowers5 ~0.71, mnist_test10k ~0.94).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from graft.probing.advice import advise

BASELINES = {"flowers5": 0.71, "mnist_test10k": 0.94}


def main() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared/data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=f"{shared / 'flowers5'},{shared / 'mnist_test10k'}")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="graft-bench-stages-")
    for data in args.datasets.split(","):
        start = time.perf_counter()
        advice = advise(data, args.backbone, args.size, cache_dir=cache)
        seconds = time.perf_counter() - start
        name = Path(data).name
        print(f"\n{name}: {args.backbone} at {args.size}px, {seconds:.0f}s (extraction of every stage in one pass + "
              f"probes); plain-probe baseline {BASELINES.get(name, float('nan')):.2f}")
        print(f"{'node':<14} {'width':>6} {'probe acc':>10} {'k-NN acc':>9}")
        for stage in advice.stages:
            print(f"{stage['node']:<14} {stage['width']:>6} {stage['probe_accuracy']:>10.4f} "
                  f"{stage['knn_accuracy']:>9.4f}")
        print(f"advice: {advice.recommendation}: {advice.reason}")


if __name__ == "__main__":
    main()
