"""The end of an epoch-trained or solved single-label run (``graft.training.fitting``): the model checked finite,
evaluated on val (and test) with full metrics, calibrated on val when asked, what was chosen on val named, and its
files written (metrics.json last; the checkpoint removed)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from graft.config import FitConfig
from graft.data.datasets import ImageDataset, loader_options
from graft.data.discovery import DatasetSplits
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.evaluation.inference import predict_logits
from graft.evaluation.metrics import classification_metrics
from graft.models.grafted import GraftModel
from graft.models.heads import divide_logits
from graft.models.run_folder import non_finite_tensors, save_model
from graft.probing.extraction import FeatureSet
from graft.probing.linear import fit_temperature
from graft.training import auto
from graft.training.checkpoints import CHECKPOINT, write_history
from graft.training.precise_bn import precise_bn_after_training
from graft.training.state import FitResult, TrainState
from graft.utils import distributed
from graft.utils.files import write_json
from graft.utils.runtime import Runtime

__all__ = ["finish_run"]


def _features_logits(model: GraftModel, features: FeatureSet, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.head.parameters()).device
    with torch.no_grad():
        logits = model.head(torch.as_tensor(features.features[split], dtype=torch.float32, device=device))
    return logits.cpu(), torch.as_tensor(features.labels[split])


def finish_run(run_dir: Path, model: GraftModel, card: dict, splits: DatasetSplits, state: TrainState,
            config: FitConfig, runtime: Runtime, loaders, cached: FeatureSet | None = None, chosen: dict | None = None,
            auto_report: dict | None = None) -> FitResult:
    """Saves the final model, evaluates it on val (and test) with full metrics, removes the checkpoint.

    With ``cached`` features (the solved probe's), a probe's metrics come from them instead of another forward pass:
    its trunk never changed. ``chosen``: the probe-vs-fine-tune selection; ``auto_report``: what auto tried.
    """
    _refuse_non_finite(run_dir, model)  # before metrics: NaN logits have no meaningful ones
    card["status"] = "complete"
    metrics: dict = {"strategy": config.train.strategy, "epochs": state.epoch,
                     "train_seconds": round(state.elapsed, 2)}
    # early stopping restores the stage's best-val-loss epoch: a choice made on val
    metrics["selected_on_validation"] = ["epoch (best val loss)"] if config.train.patience and state.history else []
    if chosen:
        metrics["selection"] = chosen
        card["kept"] = metrics["kept"] = chosen["kept"]  # the page, report and card say what was saved, not asked
    if auto_report is not None:
        metrics["auto"] = auto.finish_report(auto_report, chosen, state, runtime.log)
    if config.train.precise_bn:
        metrics["precise_bn"] = precise_bn_after_training(model, splits, config, runtime, card)
        _refuse_non_finite(run_dir, model)  # the recomputed statistics too (checked once, not again when saving)
    if cached is not None and "semi_supervised" in cached.stats:  # its own block: what the unlabelled pool did
        card["semi_supervised"] = metrics["semi_supervised"] = cached.stats.pop("semi_supervised")
        if "with_pool_val_acc" in metrics["semi_supervised"]:
            metrics["selected_on_validation"].append("semi-supervised or labelled-only probe (higher val accuracy)")
    if cached is not None:
        metrics["features"] = cached.stats
    if "exclusions" in card:
        metrics["exclusions"] = card["exclusions"]
    if distributed.broadcast_object(cached is not None) and config.train.strategy == "probe":
        for split in ("val", "test"):  # rank 0 holds the features; the others only wait for its files
            if cached is not None and len(cached.labels[split]):
                metrics[split] = classification_metrics(*_features_logits(model, cached, split), model.classes)
        return _save_final(run_dir, model, card, metrics, state, runtime, config.train.timings)
    logits, labels = _gathered_logits(model, loaders[1], runtime)
    if len(labels):
        logits = _calibrate_on_validation(model, logits, labels, metrics, config, runtime)
        metrics["val"] = classification_metrics(logits, labels, model.classes)
    if splits.test:
        test_set = ImageDataset(splits.test, create_transform(model.preprocessing), config.data.max_image_pixels)
        if runtime.distributed:
            test_set = Subset(test_set, runtime.shard_indices(len(test_set)))
        test_loader = DataLoader(test_set, batch_size=config.data.batch_size * 2, shuffle=False,
                                 **loader_options(runtime.device, config.data.workers))
        metrics["test"] = classification_metrics(*_gathered_logits(model, test_loader, runtime), model.classes)
    return _save_final(run_dir, model, card, metrics, state, runtime, config.train.timings)


def _calibrate_on_validation(model: GraftModel, logits: torch.Tensor, labels: torch.Tensor, metrics: dict,
                             config: FitConfig, runtime: Runtime) -> torch.Tensor:
    """An epoch-trained model's temperature, fitted on the validation logits and folded into its head (a kept probe
    was calibrated on its CV folds already). Returns the logits the calibrated model gives."""
    if not config.train.calibrate or metrics.get("kept") == "probe":
        return logits
    temperature = fit_temperature(logits, labels)
    if temperature is None:
        runtime.log("calibration: none (every validation image is right, or none is: a temperature fitted there would "
                    "only claim certainty)")
        return logits
    divide_logits(model.head, temperature)
    metrics["temperature"] = round(temperature, 6)
    metrics["selected_on_validation"].append("temperature (calibration; accuracy unchanged)")
    before, after = (F.cross_entropy(values, labels).item() for values in (logits, logits / temperature))
    runtime.log(f"calibration: temperature {temperature:.3g} fitted on val (val log-loss {before:.4f} → {after:.4f})")
    return logits / temperature


def _label_selections(metrics: dict) -> None:
    """Names everything chosen on validation (which makes the val number optimistic) and the headline: the test
    split's accuracy when there is one, an unbiased estimate; otherwise val's, labelled."""
    chosen = metrics.setdefault("selected_on_validation", [])
    if metrics.get("features", {}).get("probe_l2_selection") == "validation":
        chosen.append("probe L2 (too few images a class for CV)")
    if "selection" in metrics:
        chosen.append("probe or fine-tune (" + metrics["selection"]["rule"].split(";")[0] + ")")
    if "auto" in metrics:
        cut = (metrics["auto"].get("overrides") or {}).get("model.cut_at")
        chosen.append(f"strategy and cut at {cut} (auto)" if cut else "strategy (auto)")
    if "test" in metrics:
        metrics["headline"] = {"split": "test", "accuracy": metrics["test"]["accuracy"],
                               "note": "held out from every choice"}
    elif "val" in metrics:
        note = "selected on validation: optimistic" if chosen else "nothing selected on val"
        metrics["headline"] = {"split": "val", "accuracy": metrics["val"]["accuracy"], "note": note}


def _gathered_logits(model: GraftModel, loader, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``loader``; under torchrun of every process's unpadded share, gathered (each image once;
    the order differs from one process's, which the metrics do not depend on)."""
    logits, labels = predict_logits(model, loader, runtime.device, runtime.dtype, runtime.channels_last)
    if not runtime.distributed:
        return logits, labels
    shares = distributed.all_gather_object((logits, labels))
    return torch.cat([share[0] for share in shares]), torch.cat([share[1] for share in shares])


def _refuse_non_finite(run_dir: Path, model: GraftModel) -> None:
    """Never saves a run as complete with NaN or infinite weights: predict would print blank labels, no error."""
    if non_finite_tensors(model.state_dict()):
        raise GraftError(f"{run_dir}: the trained weights hold NaN or infinite values, so the run is not marked "
                         "complete; train again with a lower --lr (--overwrite)")


def _save_final(run_dir: Path, model: GraftModel, card: dict, metrics: dict, state: TrainState,
                runtime: Runtime, timings: bool = False) -> FitResult:
    """Writes the run's final files (metrics.json last: with ``timings``, the phases' seconds up to it)."""
    _label_selections(metrics)
    runtime.timings.lap("evaluation")
    if runtime.is_main:
        write_history(run_dir, state.history)
        save_model(run_dir, model, card)
        runtime.timings.lap("outputs")
        if timings:
            metrics["timings"] = runtime.timings.to_dict()
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    distributed.barrier()  # every process returns once the run folder is complete
    distributed.write_rank_digest(model)
    if "headline" in metrics:
        headline = metrics["headline"]
        val = (f"; val accuracy {metrics['val']['accuracy']:.4f}" if headline["split"] == "test" and "val" in metrics
               else "")
        runtime.log(f"done: {headline['split']} accuracy {headline['accuracy']:.4f} ({headline['note']}){val} in "
                    f"{state.elapsed:.1f}s → {run_dir}")
    if timings:
        runtime.log(runtime.timings.line())
    return FitResult(run_dir, model.eval(), metrics, list(state.history))
