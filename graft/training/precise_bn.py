"""Precise batch-norm statistics: recomputed over the training set after training."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from torch.utils.data import DataLoader

from graft.config import FitConfig
from graft.data.datasets import ImageDataset, loader_options
from graft.data.discovery import DatasetSplits, discover
from graft.data.scan import scan
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.batchnorm import batch_norms, recompute_statistics
from graft.models.grafted import GraftModel
from graft.models.run_folder import (
    check_finite,
    config_from_card,
    load,
    read_card,
    refuse_label_sets,
    save_model,
)
from graft.training.checkpoints import run_lock
from graft.training.loop import validate
from graft.utils import outputs
from graft.utils.runtime import Runtime, autocast_dtype, resolve_device, seed_everything

__all__ = ["precise_bn", "recompute_bn_statistics", "precise_bn_after_training"]


def precise_bn_after_training(model: GraftModel, splits: DatasetSplits, config: FitConfig, runtime: Runtime,
                              card: dict) -> dict:
    """Recomputes batch-norm statistics after training when anything with batch norm was trained; records it in
    ``card`` and returns what the run summary shows."""
    if model.trunk_frozen() and not batch_norms(model.head):
        runtime.log("precise BN: skipped, nothing with batch norm was trained")
        return {"images": 0, "skipped": "nothing with batch norm was trained"}
    start = time.perf_counter()
    images = recompute_bn_statistics(model, splits.train, config, runtime)
    card["precise_bn"] = {"images": images}
    seconds = time.perf_counter() - start
    runtime.log(f"precise BN: statistics recomputed over {images} training images in {seconds:.1f}s")
    return {"images": images, "seconds": round(seconds, 2)}


def recompute_bn_statistics(model: GraftModel, samples: list, config: FitConfig, runtime: Runtime,
                            augmented: bool = True) -> int:
    """Precise BN over ``samples`` (see ``graft.models.batchnorm.recompute_statistics``), in the training augmentation by
    default: the weights were learnt on augmented images' statistics (evaluation preprocessing measured worse, see
    bench/RESULTS.md)."""
    transform = create_transform(model.preprocessing, augmented, config.data.augment, config.data.hflip)
    seed_everything(config.train.seed)  # the augmentation draws: the same statistics every time
    dataset = ImageDataset(samples, transform, config.data.max_image_pixels)
    loader = DataLoader(dataset, batch_size=config.data.batch_size, shuffle=False,
                        **loader_options(runtime.device, config.data.workers))
    return recompute_statistics(model, loader, runtime.device, runtime.channels_last)


def precise_bn(run_dir: str | Path, data: str | None = None, device: str = "auto", verbose: bool = True,
               augmented: bool = True) -> dict:
    """Precise BN for a finished run: recomputes BN statistics over its training split (``augmented``: in the
    training augmentation, else in evaluation preprocessing), reports validation accuracy before and after, and
    saves the new weights (the old ones stay as ``model.before-precise-bn``)."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        card = read_card(run_dir)
        refuse_label_sets(card, run_dir, "graft precise-bn")
        config = config_from_card(card)
        target = resolve_device(device)
        runtime = Runtime(target, autocast_dtype(target, config.train.precision), config.train.channels_last,
                          verbose=verbose)
        splits = discover(data or config.data.path, config.data.val_fraction, config.train.seed,
                          0.0 if data else config.data.test_fraction,  # the fit's own test images stay out
                          *((None, None) if data else (config.data.image_column, config.data.label_column)))
        scan(splits, config.data.max_image_pixels, log=runtime.log if runtime.verbose else None)
        model = load(run_dir, target)
        if not batch_norms(model):
            raise GraftError(f"{run_dir}: this model has no batch norm layers; nothing to recompute")
        val_set = ImageDataset(splits.val, create_transform(model.preprocessing), config.data.max_image_pixels)
        val_loader = DataLoader(val_set, batch_size=config.data.batch_size * 2, shuffle=False,
                                **loader_options(target, config.data.workers, persistent=True))  # read twice
        before = validate(model, val_loader, runtime)
        images = recompute_bn_statistics(model, splits.train, config, runtime, augmented)
        after = validate(model, val_loader, runtime)
        check_finite(model.state_dict(), f"{run_dir} after precise BN")  # the saved model stays as it was
        shutil.copyfile(run_dir / "model.safetensors", run_dir / "model.before-precise-bn.safetensors")
        outputs.record(run_dir / "model.before-precise-bn.safetensors")
        card["precise_bn"] = {"images": images, "augmented": augmented, "val_acc_before": before["val_acc"],
                              "val_acc_after": after["val_acc"]}
        save_model(run_dir, model, card)
    runtime.log(f"precise BN over {images} training images: val accuracy {before['val_acc']:.4f} → "
                f"{after['val_acc']:.4f}, val loss {before['val_loss']:.4f} → {after['val_loss']:.4f}")
    return {"images": images, **{f"before_{k}": v for k, v in before.items()},
            **{f"after_{k}": v for k, v in after.items()}}
