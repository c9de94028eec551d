"""``graft fit`` on multi-label data (label sets from a CSV): the one-vs-rest probe solved on cached features, then
(``--strategy finetune``) the recipe's stages trained with sigmoid outputs and ``--loss`` bce or asl through the
training loop's ``train_epoch``; per-class thresholds chosen on validation; an ordinary run folder whose graft.json
says ``multi_label`` and holds the thresholds (predict reads them).

Early stopping (``--patience``, 0 = off): each epoch's validation BCE; a stage stops after ``patience`` epochs without
a lower one and its best epoch's weights are restored (kept in memory, not on disk).

What the single-label fit does and this one does not (each refused in one line by ``check_supported``): resuming
(no checkpoints are written: an interrupted run starts again), ``--strategy scratch``, ``--lr auto`` when
fine-tuning, mixup/cutmix, tar shards, a non-linear head, class balancing, ``--precise-bn``, ``--log`` and torchrun.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from graft.config import FitConfig
from graft.data.datasets import ImageDataset, loader_options
from graft.data.discovery import DatasetSplits
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.evaluation.inference import predict_logits
from graft.evaluation.multilabel import multilabel_metrics, plot_precision_recall
from graft.models.run_folder import model_card, save_model
from graft.probing.extraction import FeatureSet, extract_features
from graft.probing.multilabel import choose_thresholds, fit_multilabel_probe
from graft.training import recipes
from graft.training.checkpoints import write_history
from graft.training.loop import NonFiniteLoss, train_epoch
from graft.training.optim import create_optimizer, create_scheduler
from graft.training.setup import create_on_device
from graft.training.state import FitResult
from graft.utils.files import write_json
from graft.utils.plotting import can_plot
from graft.utils.runtime import Runtime, epoch_seed, seed_everything

__all__ = ["check_supported", "fit_label_sets"]


def check_supported(config: FitConfig, splits: DatasetSplits, resume: bool, runtime: Runtime) -> None:
    """Refuses, in one line naming the option, what multi-label training does not do."""
    train = config.train
    refusals = [
        (train.strategy not in ("probe", "finetune"), f"--strategy {train.strategy}", "use probe or finetune"),
        (train.head_fit != "lbfgs", f"--head-fit {train.head_fit}", "use lbfgs"),
        (resume, "--resume", "start again with --overwrite"),
        (bool(train.mixup or train.cutmix), "--mixup/--cutmix", "drop them (mixed label sets are not modelled)"),
        (bool(train.time_budget), "--time-budget", "set --epochs"),
        (train.lr == "auto" and train.strategy == "finetune", "--lr auto", "give a rate (the finder uses softmax)"),
        (config.model.head != "linear" or config.model.dropout, "--head/--dropout", "use the linear head"),
        (train.balance != "none", f"--balance {train.balance}", "drop it"),
        (runtime.distributed, "torchrun", "run one process"),
        (splits.shards is not None, "tar shards", "pass the CSV manifest"),
        (train.precise_bn, "--precise-bn", "drop it (the probe's trunk is frozen)"),
        (bool(config.log), f"--log {config.log}", "drop it (a solved probe has no epochs to log)"),
        (bool(config.data.unlabeled), "--unlabeled", "drop it (pseudo-labels are single classes)"),
        (bool(config.data.exclude), "--exclude", "remove the rows from the CSV manifest (a relabel names one class)"),
    ]
    for refused, what, fix in refusals:
        if refused:
            raise GraftError(f"{splits.root}: multi-label data (label sets): {what} is not supported with it; {fix}")


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
    history, chosen = [], None
    if recipes.plan(config):  # finetune: from the solved probe (LP-FT), kept only when it beats the probe on val
        probe = _Snapshot(model, _split_probabilities(model, features, splits, "val") if len(splits.val) else None)
        history = _train_stages(model, splits, config, runtime, run_dir)
        chosen = probe.keep_better(model, splits, config, runtime)
        runtime.timings.lap("training")
    finetuned = bool(history) and (chosen is None or chosen["kept"] == "finetune")
    metrics = {"strategy": config.train.strategy, "multi_label": True, "epochs": len(history),
               "loss": config.train.loss if finetuned else "bce (the probe)", "features": features.stats,
               "probe_l2": result.l2, "probe_l2_selection": result.selection,
               "probe_grid": result.grid,
               "selected_on_validation": ["per-class thresholds (maximising each class's F1)"]}
    if chosen:
        metrics["selection"] = chosen
        metrics["selected_on_validation"].append("probe or fine-tuned model (higher val mAP, then lower val loss)")
        card["kept"] = metrics["kept"] = chosen["kept"]  # the card says what was saved, not what was asked
    outputs = {split: _split_probabilities(model, features, splits, split) if not finetuned else
               _probabilities(model, splits, split, config, runtime)
               for split in ("val", "test") if len(features.paths[split])}
    for split, (probabilities, targets) in outputs.items():
        metrics[split] = multilabel_metrics(probabilities, targets, model.classes, model.thresholds)
    headline = "test" if "test" in metrics else "val" if "val" in metrics else None
    if headline:
        metrics["headline"] = {"split": headline, "mAP": metrics[headline]["mAP"],
                               "note": "held out from every choice" if headline == "test" else
                               "thresholds selected on validation: its F1 is optimistic (mAP does not use them)"}
    metrics["train_seconds"] = round(time.perf_counter() - start, 2)
    card.update(status="complete", multi_label=True, thresholds=[round(t, 6) for t in model.thresholds])
    write_history(run_dir, history)
    save_model(run_dir, model, card)
    write_json(run_dir / "metrics.json", metrics)
    if headline and can_plot():
        plot_precision_recall(*outputs[headline], model.classes, f"precision-recall on {headline}",
                              run_dir / "precision_recall.png")
    if headline:
        runtime.log(f"done: {headline} mAP {metrics[headline]['mAP']:.4f}, micro F1 "
                    f"{metrics[headline]['micro_f1']:.4f} ({metrics['headline']['note']}) → {run_dir}")
    return FitResult(run_dir, model.eval(), metrics, history)


def _solve(features: FeatureSet, splits: DatasetSplits, config: FitConfig, runtime: Runtime):
    train_y = splits.targets(features.paths["train"])
    train_x = np.concatenate([features.features["train"], *features.augmented])
    train_y = np.concatenate([train_y] * (1 + len(features.augmented)))
    result = fit_multilabel_probe(train_x, train_y, features.features["val"], splits.targets(features.paths["val"]),
                                  device=runtime.device, log=runtime.log, seed=config.train.seed)
    runtime.log(f"multi-label probe: λ={result.l2:.0e} chosen ({result.selection}); thresholds chosen on val: "
                + ", ".join(f"{name} {t:.2f}" for name, t in zip(splits.classes, result.thresholds)))
    return result


def _split_probabilities(model, features: FeatureSet, splits: DatasetSplits, split: str):
    """The probe's probabilities from the cached features (its trunk never changed) and the targets."""
    device = next(model.head.parameters()).device
    with torch.no_grad():
        logits = model.head(torch.as_tensor(features.features[split], dtype=torch.float32, device=device))
    return torch.sigmoid(logits).cpu().numpy(), splits.targets(features.paths[split])


def _loader(splits: DatasetSplits, split: str, transform, config: FitConfig, runtime: Runtime, train: bool):
    """(image, multi-hot target) batches of ``split``: each sample carries its target tensor in place of a class."""
    samples = [(path, torch.as_tensor(target)) for (path, _), target in
               zip(getattr(splits, split), splits.targets([path for path, _ in getattr(splits, split)]))]
    dataset = ImageDataset(samples, transform, config.data.max_image_pixels, with_index=train)
    batch = config.data.batch_size * (1 if train else 2)
    generator = torch.Generator().manual_seed(config.train.seed)
    return DataLoader(dataset, batch_size=batch, shuffle=train, generator=generator,
                      drop_last=train and len(dataset) > batch, **loader_options(runtime.device, config.data.workers))


def _train_stages(model, splits: DatasetSplits, config: FitConfig, runtime: Runtime, run_dir: Path) -> list[dict]:
    """The recipe's epoch stages with ``--loss`` on sigmoid outputs; then the thresholds again, on val, for the
    trained model. Returns the history rows (written to history.csv)."""
    data, history = config.data, []
    loader = _loader(splits, "train", create_transform(model.preprocessing, True, data.augment, data.hflip,
                                                       data.random_erasing), config, runtime, True)
    patience = config.train.patience if len(splits.val) else 0
    runtime.log(f"multi-label fine-tuning with --loss {config.train.loss}: no checkpoints (an interrupted run starts "
                "again); " + (f"early stopping after {patience} epochs without a lower val loss" if patience else
                              "each stage runs its epochs"))
    for stage in recipes.plan(config):
        optimizer = create_optimizer(recipes.configure(model, stage, config.train), config)
        scheduler = create_scheduler(optimizer, stage.epochs * len(loader), config.train.warmup_fraction)
        best = _Best()
        for _ in range(stage.epochs):
            seed_everything(epoch_seed(config.train.seed, len(history)))
            start = time.perf_counter()
            try:
                row = train_epoch(model, loader, optimizer, scheduler, runtime, config.train.label_smoothing,
                                  config.train.limit_batches, multi_label=config.train.loss)
            except NonFiniteLoss as blowup:  # no checkpoint to roll back to: stop, saving nothing as complete
                raise GraftError(f"{run_dir}: the loss became {blowup.value} at step {blowup.step} of epoch "
                                 f"{len(history) + 1} (lr {blowup.lr:.2e}); train again with a lower --lr "
                                 "(--overwrite)") from None
            row = {"epoch": len(history) + 1, "stage": stage.name, "train_loss": row["train_loss"],
                   "images_per_s": row["images_per_s"], "seconds": round(time.perf_counter() - start, 3)}
            if patience:
                row.update(_val_scores(model, splits, config, runtime))
                row["best"] = best.update(model, row["val_loss"])
            history.append(row)
            runtime.log(f"epoch {row['epoch']:>3} [{stage.name}] train loss {row['train_loss']:.4f}" +
                        (f" | val loss {row['val_loss']:.4f} mAP {row['val_mAP']:.4f}" if patience else "") +
                        f" | {row['images_per_s']:.1f} img/s")
            if patience and best.bad_epochs >= patience:
                runtime.log(f"early stop: {patience} epochs without a lower val loss; the stage's best epoch is kept")
                break
        best.restore(model)
    model.eval()
    probabilities, targets = _probabilities(model, splits, "val", config, runtime)
    if len(targets):
        model.thresholds = choose_thresholds(probabilities, targets)
    return history


class _Snapshot:
    """The solved probe's weights (a CPU copy), thresholds and val scores, to come back to when fine-tuning loses."""

    def __init__(self, model, val_outputs):
        self.state = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
        self.thresholds = list(model.thresholds)
        self.val = None if val_outputs is None else multilabel_metrics(*val_outputs, model.classes, self.thresholds)

    def keep_better(self, model, splits: DatasetSplits, config: FitConfig, runtime: Runtime) -> dict | None:
        """``{"kept": "finetune"|"probe", ...}``: the fine-tuned model stays when its val mAP is higher (equal: lower
        val loss), else the probe comes back — the rule a single-label fine-tune is kept by. None without val."""
        if self.val is None:
            return None
        tuned = multilabel_metrics(*_probabilities(model, splits, "val", config, runtime), model.classes,
                                   model.thresholds)
        score = {name: (round(scores["mAP"] or 0.0, 6), -round(scores["loss"], 6))
                 for name, scores in (("probe", self.val), ("finetune", tuned))}
        kept = "finetune" if score["finetune"] > score["probe"] else "probe"
        if kept == "probe":
            model.load_state_dict(self.state)
            model.thresholds = self.thresholds
            model.eval()
        runtime.log(f"kept the {'fine-tuned model' if kept == 'finetune' else 'probe'}: val mAP fine-tuned "
                    f"{tuned['mAP'] or 0.0:.4f} vs probe {self.val['mAP'] or 0.0:.4f}")
        return {"kept": kept, "probe_val_mAP": self.val["mAP"], "probe_val_loss": self.val["loss"],
                "finetune_val_mAP": tuned["mAP"], "finetune_val_loss": tuned["loss"]}


class _Best:
    """A stage's lowest validation loss so far and its weights (a CPU copy), restored when the stage ends."""

    def __init__(self):
        self.loss, self.state, self.bad_epochs = math.inf, None, 0

    def update(self, model, loss: float) -> bool:
        if loss < self.loss:
            self.loss, self.bad_epochs = loss, 0
            self.state = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    def restore(self, model) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def _val_scores(model, splits: DatasetSplits, config: FitConfig, runtime: Runtime) -> dict:
    """The epoch's validation BCE (summed over the classes, averaged over the images) and mAP."""
    model.eval()
    probabilities, targets = _probabilities(model, splits, "val", config, runtime)
    scores = multilabel_metrics(probabilities, targets, model.classes, [0.5] * len(model.classes))
    return {"val_loss": scores["loss"], "val_mAP": scores["mAP"] if scores["mAP"] is not None else math.nan}


def _probabilities(model, splits: DatasetSplits, split: str, config: FitConfig, runtime: Runtime):
    loader = _loader(splits, split, create_transform(model.preprocessing), config, runtime, False)
    logits, targets = predict_logits(model, loader, runtime.device, runtime.dtype, runtime.channels_last)
    return torch.sigmoid(logits).numpy(), targets.numpy()

