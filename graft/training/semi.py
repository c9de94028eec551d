"""``fit --unlabeled POOL``: the solved probe, self-trained (or label-propagated) on an unlabelled pool.

The pool's features are extracted once into the same feature cache as the labelled images'. The method and the
confidence threshold are chosen by cross-validation on the labelled training images (``graft.probing.semi``); the
result is kept only when it beats the labelled-only probe on validation (higher accuracy, ties broken by lower loss:
the rule fine-tuning is kept by). Validation and test images are never pseudo-labelled: pool files that are one of
them, by path or by content, are dropped from the pool first. What was used is printed in one line and recorded in
metrics.json and graft.json under ``semi_supervised``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graft.config import FitConfig
from graft.data.discovery import DatasetSplits
from graft.data.pool import read_pool
from graft.data.scan import ScanCache, check_files
from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.probing.cotrain import SecondView
from graft.probing.extraction import FeatureSet, extract_features
from graft.probing.semi import LinearFit, choose_and_fit, search_steps
from graft.training import recipes
from graft.training.stages import beats_probe
from graft.utils import distributed
from graft.utils.progress import Progress
from graft.utils.runtime import Runtime

__all__ = ["check_unlabeled", "pool_paths", "self_train_probe", "semi_supervised_probe", "summary_line"]


def check_unlabeled(config: FitConfig) -> None:
    """Refuses ``--unlabeled`` where there is no solved probe to self-train, before anything runs."""
    if not config.data.unlabeled:
        return
    if config.train.strategy in ("finetune", "scratch"):
        raise GraftError(f"--unlabeled works with --strategy probe or auto (the solved probe is self-trained); "
                         f"{config.train.strategy} on pseudo-labels is not built yet: use --strategy probe, or drop "
                         "--unlabeled")
    if config.train.strategy == "probe" and not recipes.solves_head(config):
        raise GraftError("--unlabeled self-trains the solved linear probe: use --head linear, --dropout 0 and "
                         "--head-fit lbfgs, or drop --unlabeled")


def pool_paths(config: FitConfig, splits: DatasetSplits, runtime: Runtime) -> list[str]:
    """The pool's readable image files, less every labelled image (train, val or test) by path and every val or test
    image by content: validation is never pseudo-labelled."""
    if not recipes.solves_head(config):  # auto chose a head or trunk with no solved probe
        raise GraftError("--unlabeled self-trains the solved linear probe, and this run has none (a random trunk, an "
                         "mlp head or --head-fit epochs); use --strategy probe, or drop --unlabeled")
    if not splits.val:
        raise GraftError("--unlabeled needs validation images to check the pseudo-labels against; give DATA a val "
                         "split (or a --val-fraction above 0)")
    found = read_pool(config.data.unlabeled).paths  # the reader suggest and label use: a CSV's paths stay inside
    labelled = {os.path.realpath(path) for split in ("train", "val", "test") for path, _ in getattr(splits, split)}
    pool = [path for path in found if os.path.realpath(path) not in labelled]
    held = [path for split in ("val", "test") for path, _ in getattr(splits, split)]
    checked = check_files(pool + held, config.data.max_image_pixels, 4, ScanCache(),
                          runtime.log if runtime.verbose and runtime.is_main else None)
    held_digests = {checked[path][0] for path in held if checked[path][0]}
    unreadable = [path for path in pool if checked[path][1]]
    copies = [path for path in pool if checked[path][0] in held_digests]
    pool = [path for path in pool if not checked[path][1] and checked[path][0] not in held_digests]
    dropped = [f"{len(found) - len(pool) - len(unreadable) - len(copies)} labelled", f"{len(copies)} copies of "
               f"val/test images", f"{len(unreadable)} unreadable"]
    if len(pool) < len(found):
        runtime.log(f"unlabelled pool: {len(pool):,} of {len(found):,} images kept (dropped: {', '.join(dropped)})")
    if not pool:
        raise GraftError(f"{config.data.unlabeled}: no unlabelled images left once the labelled, val/test and "
                         "unreadable files are dropped; point --unlabeled at images that are not in DATA")
    return pool


def self_train_probe(model: GraftModel, features: FeatureSet, pool: list[str], config: FitConfig, runtime: Runtime
                     ) -> dict:
    """Extracts the pool's features, chooses and runs the semi-supervised probe, and loads it into ``model``'s head
    when it beats the labelled-only probe on val. Returns the ``semi_supervised`` record."""
    data = config.data
    root = data.unlabeled if Path(data.unlabeled).exists() else ""  # a glob has no one folder to keep the cache out of
    pool_splits = DatasetSplits(list(model.classes), [(path, 0) for path in pool], [], root=root)
    sets = extract_features(pool_splits, model.trunk, model.preprocessing, config.model.backbone, data.cache_dir,
                            None, data.workers, runtime.device, 0, data.hflip, runtime.log, config.train.compile,
                            config.train.extract_engine)
    pool_x = sets[model.trunk.node].features["train"]
    runtime.timings.lap("extraction")
    record = distributed.main_decides(lambda: _decide(model, features, pool_x, config, runtime))
    distributed.broadcast_module(model.head)
    runtime.timings.lap("solve")
    return record


def _val_score(head, x: np.ndarray, y: np.ndarray) -> dict:
    with torch.no_grad():
        logits = head(torch.as_tensor(np.asarray(x, dtype=np.float32), device=next(head.parameters()).device))
        labels = torch.as_tensor(y, device=logits.device)
        return {"val_acc": (logits.argmax(1) == labels).float().mean().item(),
                "val_loss": F.cross_entropy(logits, labels).item()}


def _decide(model: GraftModel, features: FeatureSet, pool_x: np.ndarray, config: FitConfig, runtime: Runtime) -> dict:
    """On rank 0: the search, the fit on all labelled images, and the comparison with the labelled-only probe."""
    stats = features.stats
    head = model.head[-1]  # a solved probe's head is its one linear layer
    record, linear = semi_supervised_probe(
        features.features["train"], features.labels["train"], pool_x, features.features["val"],
        features.labels["val"], head, stats["probe_l2"], stats.get("probe_temperature", 1.0),
        config.train.balance != "none", config.train.seed, runtime.device, runtime.log,
        runtime.verbose and runtime.is_main)
    if linear is not None:
        head.load_state_dict(linear.state_dict())
    return record


def semi_supervised_probe(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                          labelled_only: nn.Linear, l2: float, temperature: float = 1.0, balanced: bool = False,
                          seed: int = 0, device="cpu", log=None, progress: bool = False,
                          second: SecondView | None = None) -> tuple[dict, nn.Linear | None]:
    """``fit --unlabeled`` on features: the method chosen by CV on the labelled (``x``, ``y``), run with ``pool_x``,
    and kept only when it beats ``labelled_only`` (the solved probe, λ ``l2``, ``temperature``) on val.
    ``second``: a second view of the same images (``graft.probing.cotrain.second_view``): co-training joins the search.

    Returns:
        (the ``semi_supervised`` record, the probe to use instead of ``labelled_only``; None: keep it).
    """
    say = log or (lambda message: None)
    classes = labelled_only.out_features
    fit = LinearFit(l2, temperature, classes, balanced, device)
    steps = search_steps(y, second=second is not None)
    with Progress("semi-supervised search", steps, "fits", say, progress) as counter:
        result = choose_and_fit(x, y, pool_x, fit, seed=seed, progress=counter, log=log,
                                start=copy.deepcopy(labelled_only).cpu(), second=second)
    record = {"method": result.method, "pool": result.pool, "used": result.used, "threshold": result.threshold,
              "selection": result.selection, "search": result.search}
    before = _val_score(labelled_only, val_x, val_y)
    record["labelled_only_val_acc"] = round(before["val_acc"], 4)
    if result.linear is None:
        why = result.note or f"no method beat the labelled-only probe in {result.selection}"
        say(f"unlabelled pool: {why} (none of {result.pool:,} images pseudo-labelled): kept the labelled-only probe")
        return {**record, "kept": "labelled-only", **({"note": result.note} if result.note else {})}, None
    linear = result.linear.to(next(labelled_only.parameters()).device)
    after = _val_score(linear, val_x, val_y)
    kept = beats_probe(after, before)
    record.update({"with_pool_val_acc": round(after["val_acc"], 4), "kept": result.method if kept else
                   "labelled-only"})
    say(summary_line(record))
    return record, linear if kept else None


def summary_line(record: dict) -> str:
    """``1,240 of 3,000 unlabelled images pseudo-labelled (self-training, threshold 0.9), val 0.71 -> 0.75: kept``."""
    threshold = record.get("threshold")
    threshold = ("" if threshold is None else ", class-balanced top-k" if threshold == 0 else
                 f", threshold {threshold:g}")
    verdict = ("kept" if record["kept"] != "labelled-only" else
               "not kept (no better on val): the labelled-only probe is returned")
    return (f"{record['used']:,} of {record['pool']:,} unlabelled images pseudo-labelled ({record['method']}"
            f"{threshold}), val {record['labelled_only_val_acc']:.4f} -> {record['with_pool_val_acc']:.4f}: {verdict}")
