"""The single-label probe's head solved on the frozen trunk's cached features (``fit_probe_head``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graft.config import FitConfig
from graft.data.discovery import DatasetSplits
from graft.models.grafted import GraftModel
from graft.probing.extraction import FeatureSet, extract_features
from graft.probing.linear import fit_linear_probe
from graft.utils import distributed
from graft.utils.files import write_csv
from graft.utils.runtime import Runtime

__all__ = ["fit_probe_head"]


def fit_probe_head(model: GraftModel, splits: DatasetSplits, config: FitConfig, runtime: Runtime,
                   run_dir: Path) -> FeatureSet:
    """The head on the frozen trunk, solved: cached features (under torchrun each rank extracts a share), then
    L-BFGS over an L2 path chosen by k-fold CV on the training features (on val, labelled optimistic, only when a class
    is too small for two folds); on rank 0, its head then broadcast."""
    data = config.data
    sets = extract_features(splits, model.trunk, model.preprocessing, config.model.backbone, data.cache_dir,
                            None, data.workers, runtime.device, data.augment_views, data.hflip, runtime.log,
                            config.train.compile, config.train.extract_engine)
    runtime.timings.lap("extraction")
    features = sets[model.trunk.node]
    # under torchrun every rank extracted its share above; the full-batch L-BFGS solve does not shard, so rank 0
    # solves while the others wait, then they receive its head
    distributed.main_decides(lambda: _solve_probe(model, features, config, runtime, run_dir))
    distributed.broadcast_module(model.head)
    runtime.timings.lap("solve")
    return features


def _solve_probe(model: GraftModel, features: FeatureSet, config: FitConfig, runtime: Runtime, run_dir: Path) -> None:
    train_x = np.concatenate([features.features["train"], *features.augmented])
    train_y = np.concatenate([features.labels["train"]] * (1 + len(features.augmented)))
    result = fit_linear_probe(train_x, train_y, features.features["val"], features.labels["val"], len(model.classes),
                              balanced=config.train.balance != "none", device=runtime.device, log=runtime.log,
                              seed=config.train.seed, calibrate=config.train.calibrate)
    model.head[-1].load_state_dict(result.linear.state_dict())
    if result.selection.startswith("cv-"):
        how = f"by {result.selection[3:]}-fold CV on train (cv accuracy {result.cv_accuracy:.4f})"
    else:
        how = "on val (selected on validation: optimistic)" if result.optimistic else "fixed (nothing to choose on)"
    runtime.log(f"probe: λ={result.l2:.0e} chosen {how}; val accuracy {result.val_accuracy:.4f}")
    if result.temperature != 1.0:
        runtime.log(f"probe: probabilities calibrated by temperature {result.temperature:.3g} fitted on the folds' "
                    f"held-out logits (log-loss {result.cv_loss:.4f} → {result.calibrated_cv_loss:.4f})")
    features.stats["probe_l2"] = result.l2
    features.stats["probe_l2_selection"] = result.selection
    features.stats["probe_temperature"] = round(result.temperature, 6)
    if runtime.is_main:
        columns = ["l2", "C", "train_acc", "train_loss", "cv_acc", "cv_loss", "val_acc", "val_loss", "iterations"]
        write_csv(run_dir / "probe_grid.csv", columns, result.grid)
