"""``graft fit`` on multi-label data (label sets from a CSV): the one-vs-rest probe solved on cached features, with
per-class thresholds chosen on validation, written as an ordinary run folder whose graft.json says ``multi_label``
and holds the thresholds (predict reads them).

What the single-label fit does and this one does not (each refused in one line by ``check_supported``): resuming
(a solved probe has no epochs to resume), ``--lr auto``, tar shards, a non-linear head, class balancing and torchrun.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from graft.config import FitConfig
from graft.data.discovery import DatasetSplits
from graft.errors import GraftError
from graft.evaluation.multilabel import multilabel_metrics
from graft.models.run_folder import model_card, save_model
from graft.probing.extraction import FeatureSet, extract_features
from graft.probing.multilabel import fit_multilabel_probe
from graft.training.checkpoints import write_history
from graft.training.setup import create_on_device
from graft.training.state import FitResult
from graft.utils.files import write_json
from graft.utils.runtime import Runtime

__all__ = ["check_supported", "fit_label_sets"]


def check_supported(config: FitConfig, splits: DatasetSplits, resume: bool, runtime: Runtime) -> None:
    """Refuses, in one line naming the option, what multi-label training does not do."""
    train = config.train
    refusals = [
        (train.strategy != "probe", f"--strategy {train.strategy}", "use --strategy probe"),
        (resume, "--resume", "start again with --overwrite (a solved probe takes seconds)"),
        (config.model.head != "linear" or config.model.dropout, "--head/--dropout", "use the linear head"),
        (train.balance != "none", f"--balance {train.balance}", "drop it"),
        (runtime.distributed, "torchrun", "run one process"),
        (splits.shards is not None, "tar shards", "pass the CSV manifest"),
        (train.precise_bn, "--precise-bn", "drop it (the probe's trunk is frozen)"),
        (bool(config.log), f"--log {config.log}", "drop it (a solved probe has no epochs to log)"),
    ]
    for refused, what, fix in refusals:
        if refused:
            raise GraftError(f"{splits.root}: multi-label data (label sets) trains the one-vs-rest probe only; "
                             f"{what} is not supported with it: {fix}")


def fit_label_sets(config: FitConfig, splits: DatasetSplits, runtime: Runtime, run_dir: Path) -> FitResult:
    """The multi-label run: the model on its device, cached features, the probe, thresholds, metrics, files."""
    start = time.perf_counter()
    model, info = create_on_device(config, splits, runtime)
    card = {**model_card(model, config, info), "status": "training"}
    write_json(run_dir / "graft.json", card)
    runtime.log(f"{config.model.backbone} ({info['weights']}) cut at {info['cut_at']}: {info['feature_dim']} features"
                f" → {len(splits.classes)} labels (multi-label); {len(splits.train)} train / {len(splits.val)} val "
                f"images on {runtime.device}")
    data = config.data
    features = extract_features(splits, model.trunk, model.preprocessing, config.model.backbone, data.cache_dir,
                                None, data.workers, runtime.device, data.augment_views, data.hflip, runtime.log,
                                config.train.compile, config.train.extract_engine)[model.trunk.node]
    runtime.timings.lap("extraction")
    result = _solve(features, splits, config, runtime)
    model.head[-1].load_state_dict(result.linear.state_dict())
    model.thresholds = result.thresholds
    metrics = {"strategy": "probe", "multi_label": True, "epochs": 0, "features": features.stats,
               "probe_l2": result.l2, "probe_l2_selection": result.selection,
               "probe_grid": result.grid,
               "selected_on_validation": ["per-class thresholds (maximising each class's F1)"]}
    for split in ("val", "test"):
        if len(features.paths[split]):
            metrics[split] = _split_metrics(model, features, splits, split)
    headline = "test" if "test" in metrics else "val" if "val" in metrics else None
    if headline:
        metrics["headline"] = {"split": headline, "mAP": metrics[headline]["mAP"],
                               "note": "held out from every choice" if headline == "test" else
                               "thresholds selected on validation: its F1 is optimistic (mAP does not use them)"}
    metrics["train_seconds"] = round(time.perf_counter() - start, 2)
    card.update(status="complete", multi_label=True, thresholds=[round(t, 6) for t in result.thresholds])
    write_history(run_dir, [])
    save_model(run_dir, model, card)
    write_json(run_dir / "metrics.json", metrics)
    if headline:
        runtime.log(f"done: {headline} mAP {metrics[headline]['mAP']:.4f}, micro F1 "
                    f"{metrics[headline]['micro_f1']:.4f} ({metrics['headline']['note']}) → {run_dir}")
    return FitResult(run_dir, model.eval(), metrics, [])


def _solve(features: FeatureSet, splits: DatasetSplits, config: FitConfig, runtime: Runtime):
    train_y = splits.targets(features.paths["train"])
    train_x = np.concatenate([features.features["train"], *features.augmented])
    train_y = np.concatenate([train_y] * (1 + len(features.augmented)))
    result = fit_multilabel_probe(train_x, train_y, features.features["val"], splits.targets(features.paths["val"]),
                                  device=runtime.device, log=runtime.log, seed=config.train.seed)
    runtime.log(f"multi-label probe: λ={result.l2:.0e} chosen ({result.selection}); thresholds chosen on val: "
                + ", ".join(f"{name} {t:.2f}" for name, t in zip(splits.classes, result.thresholds)))
    return result


def _split_metrics(model, features: FeatureSet, splits: DatasetSplits, split: str) -> dict:
    device = next(model.head.parameters()).device
    with torch.no_grad():
        logits = model.head(torch.as_tensor(features.features[split], dtype=torch.float32, device=device))
    return multilabel_metrics(torch.sigmoid(logits).cpu().numpy(), splits.targets(features.paths[split]),
                              model.classes, model.thresholds)
