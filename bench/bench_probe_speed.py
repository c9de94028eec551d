"""Issue 24's probe rows: a cold ``graft fit --strategy probe`` vs the extraction + LogisticRegression script a user
would write (both whole processes from a cold start, on the same photos), and graft's probe solver vs scikit-learn's
``LogisticRegressionCV(Cs=9, cv=5)`` on the same features.

    python bench/bench_probe_speed.py [--data ../shared/data/flowers5] [--images 400] [--backbone tf_efficientnet_lite0]
                                      [--size 224] [--repeats 1]

``--images`` photos are copied out of DATA's train/ (80%) and val/ (20%), every k-th of each so every class stays in.
The user's script is plain torchvision (ImageFolder, Resize, CenterCrop, a DataLoader with 2 workers), the timm
network in eager PyTorch and ``sklearn.linear_model.LogisticRegression``; only its weights come through graft's
loader (timm's download needs a network; the packaged ImageNet weights are the same file graft uses). Every
process starts with a cold feature cache (GRAFT_CACHE in a fresh folder). graft is timed twice: the first probe on a
machine (the trunk's ONNX export included, a one-time cost per backbone/cut/size like downloading the weights), and a
cold probe whose fresh cache holds only that export. ``--images 40 --size 64`` is the smoke configuration. The ratios
are measured in this one run: run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
REPO = Path(__file__).resolve().parents[1]

USER_SCRIPT = '''
import sys
import numpy as np, torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from sklearn.linear_model import LogisticRegression
from graft.models.backbones.registry import create_backbone  # only for the weights (timm's download is offline)

data, name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
backbone = create_backbone(name)
net, p = backbone.net.eval(), backbone.preprocessing
transform = transforms.Compose([transforms.Resize(int(size / p.crop_pct)), transforms.CenterCrop(size),
                                transforms.ToTensor(), transforms.Normalize(p.mean, p.std)])

def features(folder):
    dataset = datasets.ImageFolder(folder, transform)
    with torch.no_grad():
        x = torch.cat([net(images) for images, _ in DataLoader(dataset, batch_size=32, num_workers=2)])
    return x.numpy(), np.array(dataset.targets)

train_x, train_y = features(data + "/train")
val_x, val_y = features(data + "/val")
classifier = LogisticRegression(max_iter=1000).fit(train_x, train_y)
print("accuracy", classifier.score(val_x, val_y))
'''


def subset(source: Path, target: Path, images: int) -> Path:
    """``images`` photos of ``source``'s train/ and val/ (80/20), every k-th file of each, copied into ``target``."""
    for split, share in (("train", 0.8), ("val", 0.2)):
        files = sorted(path for path in (source / split).rglob("*") if path.is_file())
        step = max(1, len(files) // max(1, int(images * share)))
        for path in files[::step][:int(images * share)]:
            destination = target / split / path.relative_to(source / split)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    if not (target / "train").is_dir() or not (target / "val").is_dir():
        sys.exit(f"{source}: expected train/ and val/ folders of class folders")
    return target


def whole_process(command: list[str], cache: Path, exports: Path | None = None) -> float:
    """Seconds of ``command`` as a fresh process with a cold feature cache (holding only a copy of ``exports``, the
    ONNX trunks an earlier run exported, when given); its output is shown when it fails."""
    shutil.rmtree(cache, ignore_errors=True)
    if exports is not None:
        shutil.copytree(exports, cache / "onnx")
    env = {**os.environ, "GRAFT_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command[:4])} ... failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def solvers(data: Path, backbone_name: str, size: int, cache: Path) -> tuple[float, float, float, float]:
    """(graft's probe solver s, its val accuracy, LogisticRegressionCV(Cs=9, cv=5) s, its val accuracy) on the same
    cached features."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from graft.data.discovery import discover
    from graft.models.backbones.registry import create_backbone
    from graft.models.surgery import Trunk
    from graft.probing.extraction import extract_features
    from graft.probing.linear import fit_linear_probe

    backbone = create_backbone(backbone_name)
    sets = extract_features(discover(str(data)), Trunk(backbone.net), backbone.preprocessing.with_size(size),
                            backbone_name, cache)
    (features,) = sets.values()
    train_x, train_y = features.features["train"].astype(np.float32), features.labels["train"]
    val_x, val_y = features.features["val"].astype(np.float32), features.labels["val"]
    start = time.perf_counter()
    result = fit_linear_probe(train_x, train_y, val_x, val_y, classes=len(features.classes))
    graft_s = time.perf_counter() - start
    graft_accuracy = result.val_accuracy
    start = time.perf_counter()  # standardised like graft's solver, so both see the same problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of changing defaults
        sklearn = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=9, cv=5, max_iter=1000)).fit(train_x, train_y)
    sklearn_s = time.perf_counter() - start
    return graft_s, graft_accuracy, sklearn_s, float(sklearn.score(val_x, val_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "flowers5"), help="a folder with train/ and val/")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1, help="whole-process runs of each (median)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-probe-speed-"))
    try:
        data = subset(Path(args.data), work / "data", args.images)
        count = sum(1 for path in data.rglob("*") if path.is_file())
        probe = [sys.executable, "-m", "graft", "fit", str(data), "--strategy", "probe", "-b", args.backbone,
                 "--image-size", str(args.size), "-o", str(work / "run"), "--overwrite"]
        script = work / "user_script.py"
        script.write_text(USER_SCRIPT)
        user = [sys.executable, str(script), str(data), args.backbone, str(args.size)]
        first_s = statistics.median(whole_process(probe, work / "cache") for _ in range(args.repeats))
        exports = Path(shutil.copytree(work / "cache" / "onnx", work / "exports"))  # the trunk, exported just now
        probe_s = statistics.median(whole_process(probe, work / "cache", exports) for _ in range(args.repeats))
        user_s = statistics.median(whole_process(user, work / "cache") for _ in range(args.repeats))
        graft_s, graft_accuracy, sklearn_s, sklearn_accuracy = solvers(data, args.backbone, args.size, work / "cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.backbone} at {args.size} px, {count} photos of {args.data}, median of {args.repeats} run(s)")
    print("| measure | seconds | ratio |")
    print("|---|---:|---|")
    print(f"| extraction + LogisticRegression script (whole process) | {user_s:.1f} | 1.00 |")
    print(f"| cold `graft fit --strategy probe`: features not cached, ONNX trunk already exported on this machine (a "
          f"one-time cost like downloading weights) (whole process) | {probe_s:.1f} | {user_s / probe_s:.2f}x faster |")
    print(f"| first `graft fit --strategy probe` on this machine: features not cached, trunk export included (whole "
          f"process) | {first_s:.1f} | {user_s / first_s:.2f}x faster |")
    print(f"| LogisticRegressionCV(Cs=9, cv=5), same features (val acc {sklearn_accuracy:.3f}) | {sklearn_s:.2f} "
          "| 1.00 |")
    print(f"| graft's probe solver (val acc {graft_accuracy:.3f}) | {graft_s:.2f} | {graft_s / sklearn_s:.2f}x the "
          "time |")


if __name__ == "__main__":
    main()
