"""What did transfer buy? Scratch vs probe vs finetune on the same split and budget — the lecture's table
(accuracy, wall time, images/s) as a function, `graft compare`, and the machinery behind `graft demo`.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from graft.config import load_config
from graft.data.discovery import discover
from graft.models.run_folder import read_history
from graft.probing.cache import cache_folder
from graft.training.fitting import fit
from graft.utils.files import atomic_write
from graft.utils.outputs import output_folder
from graft.utils.plotting import plots_skipped, pyplot
from graft.utils.text import safe_record

__all__ = ["STRATEGIES", "StrategyRow", "compare_strategies", "describe_choice", "write_comparison"]

STRATEGIES = ("scratch", "probe", "finetune")


@dataclass
class StrategyRow:
    strategy: str
    backbone: str
    accuracy: float  # on held-out images: the test split if there is one, else val
    split: str
    seconds: float  # wall time of the whole fit (scan, extraction, training, evaluation)
    images_per_s: float  # the fastest training epoch, or feature extraction for a cached probe
    epochs: int
    chose: str = ""  # what was kept: probe or finetune (model selection), for auto also the cut and the advice


def compare_strategies(data: str | Path, backbone: str, output: str | Path, strategies=STRATEGIES,
                       scratch_backbone: str | None = None, epochs: int = 12, budget: float = 0.0,
                       overrides: dict | None = None, scratch_overrides: dict | None = None,
                       verbose: bool = False, log=None) -> list[StrategyRow]:
    """Trains each strategy on the same data split, seed and budget and returns one row each.

    Args:
        backbone: the pretrained backbone for probe and finetune (and scratch, randomly initialised, unless
            ``scratch_backbone`` names another network, e.g. the lecture's ``small-cnn-cifar``).
        epochs: epochs of scratch training and of fine-tuning (the probe is solved on cached features).
        budget: seconds of training per strategy (0: none). Epochs are then an upper bound and each schedule is
            re-planned to end within the budget: an equal wall-clock comparison.
        overrides: dotted config keys applied to every run (image size, batch size, lr, ...).
        scratch_overrides: applied to the scratch run only (a lab network's activation, norm, init, ...).
        log: one line as each strategy starts and ends (its runs are quiet unless ``verbose``).
    """
    if Path(data).suffix.lower() in (".csv", ".tsv"):
        discover(data)  # a manifest of label sets is refused in one line: the comparison ranks by accuracy
    output = Path(output)
    cache = cache_folder((overrides or {}).get("data.cache_dir"))
    output_folder(output, "--output", ((data, "data"), (cache, "feature cache")))  # each run's folder: fit checks it
    rows = []
    say = log or (lambda message: None)
    for number, strategy in enumerate(strategies, start=1):
        name = scratch_backbone if strategy == "scratch" and scratch_backbone else backbone
        values = {"data.path": str(data), "model.backbone": name, "train.strategy": strategy, "train.epochs": epochs,
                  "train.patience": 0, "train.time_budget": budget, "output": str(output / strategy),
                  **(overrides or {}), **((scratch_overrides or {}) if strategy == "scratch" else {})}
        start = time.perf_counter()
        say(f"{strategy} ({number}/{len(strategies)}): training {name}" + (f", at most {budget:g}s" if budget else ""))
        result = fit(load_config(None, values), overwrite=True, verbose=verbose)
        seconds = time.perf_counter() - start
        split = "test" if "test" in result.metrics else "val"
        say(f"{strategy} ({number}/{len(strategies)}): {split} accuracy {result.metrics[split]['accuracy']:.3f} in "
            f"{seconds:.0f}s")
        speeds = [float(row["images_per_s"]) for row in read_history(result.run_dir)]
        speed = max(speeds) if speeds else result.metrics.get("features", {}).get("images_per_s") or 0.0
        rows.append(StrategyRow(strategy, name, result.metrics[split]["accuracy"], split, seconds, speed,
                                result.metrics["epochs"], describe_choice(result)))
    write_comparison(rows, output)
    return rows


def describe_choice(result) -> str:
    """What a fit result kept: ``probe`` / ``finetune`` by model selection (else its strategy); for auto also where it
    cut and the advice, e.g. ``probe at blocks.4 (probe-earlier)``."""
    auto = result.metrics.get("auto") or {}
    selection = result.metrics.get("selection") or {}
    kept = auto.get("chose") or selection.get("kept") or result.metrics.get("strategy", "")
    if not auto:
        return kept
    cut = (auto.get("overrides") or {}).get("model.cut_at")
    return f"{kept}{f' at {cut}' if cut else ''} ({auto.get('advice')})"


def write_comparison(rows: list[StrategyRow], folder: Path) -> None:
    """``comparison.csv`` and ``comparison.png`` (accuracy bars annotated with wall time)."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(asdict(rows[0]))

    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(safe_record(asdict(row)) for row in rows)

    atomic_write(folder / "comparison.csv", write)
    if plots_skipped("comparison.png"):
        return
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bars = axis.bar([f"{r.strategy}\n{r.backbone[:24]}" for r in rows], [r.accuracy for r in rows],
                    color=["#999", "#69c", "#36a"][: len(rows)])
    for bar, row in zip(bars, rows):
        axis.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                  f"{row.accuracy:.3f}\n{row.seconds:.0f}s", ha="center", va="bottom", fontsize=8)
    axis.set_ylim(0, 1.15)
    axis.set_ylabel(f"held-out accuracy ({rows[0].split})")
    axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    atomic_write(folder / "comparison.png", lambda temp: figure.savefig(temp, format="png", dpi=110))
    plt.close(figure)
