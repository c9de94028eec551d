"""The model and data loaders on their device: batch-norm policy, samplers, class weights."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from graft.config import BN_AUTO_FROZEN_BELOW, FitConfig
from graft.data.datasets import ImageDataset, resolve_workers
from graft.data.discovery import DatasetSplits
from graft.data.statistics import dataset_statistics
from graft.data.transforms import create_transform
from graft.models.grafted import GraftModel, create_model
from graft.training import recipes
from graft.utils.runtime import Runtime

__all__ = [
    "SCRATCH_STATS_IMAGES", "SCRATCH_STATS_SIZE", "balanced_sampler", "create_loaders", "create_on_device",
    "resolve_bn_stats"
]

SCRATCH_STATS_SIZE = 32  # per-channel statistics barely depend on resolution; small is fast
SCRATCH_STATS_IMAGES = 2000


def resolve_bn_stats(config: FitConfig, train_images: int) -> str:
    """``auto``: freeze pretrained statistics on small data (batch statistics of a few images are noise) and whenever
    fine-tuning starts from the solved probe (LP-FT): the probe was fitted to features normalised with the
    pretrained statistics, and batch statistics undo it (flowers5, 3,449 images, 8 epochs: 0.677 updating vs 0.776
    frozen, bench/RESULTS.md). A random trunk (scratch, --no-pretrained) has no statistics worth keeping, so it
    always updates them."""
    if config.train.bn_stats != "auto":
        return config.train.bn_stats
    pretrained = config.model.pretrained and config.train.strategy != "scratch"
    small = train_images < BN_AUTO_FROZEN_BELOW
    return "frozen" if pretrained and (small or recipes.solves_head(config)) else "update"


def create_loaders(splits: DatasetSplits, model: GraftModel, config: FitConfig, runtime: Runtime):
    """Training and validation DataLoaders with the backbone's preprocessing."""
    if splits.shards is not None:  # tar shards stream through an IterableDataset (graft.data.shards)
        from graft.data.shards import shard_loaders

        return shard_loaders(splits, model.preprocessing, config, runtime.device)
    data = config.data
    workers = resolve_workers(data.workers, runtime.device)
    train_set = ImageDataset(splits.train, create_transform(model.preprocessing, True, data.augment, data.hflip,
                                                             data.random_erasing),
                             data.max_image_pixels, with_index=True)
    val_set = ImageDataset(splits.val, create_transform(model.preprocessing), data.max_image_pixels)
    common = {"num_workers": workers, "pin_memory": runtime.device.type == "cuda"}
    generator = torch.Generator()
    sampler = runtime.create_sampler(train_set, True, config.train.seed)
    if config.train.balance == "sampler" and sampler is None:
        sampler = balanced_sampler(train_set.samples, generator)
    # Training workers are not persistent: fresh workers each epoch take their seeds from the reseeded generator,
    # which keeps augmentation (and so a resumed run) reproducible.
    train_loader = DataLoader(train_set, batch_size=data.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=generator, drop_last=len(train_set) > data.batch_size, **common)
    val_loader = DataLoader(val_set, batch_size=data.batch_size * 2, shuffle=False, persistent_workers=workers > 0,
                            **common)
    return train_loader, val_loader, generator


def balanced_sampler(samples: list, generator: torch.Generator) -> WeightedRandomSampler:
    """``--balance sampler``: draws every class equally often (with replacement), an epoch still len(samples) long."""
    labels = torch.as_tensor([label for _, label in samples])
    counts = torch.bincount(labels).double()
    return WeightedRandomSampler(1.0 / counts[labels], len(samples), replacement=True, generator=generator)


def _loss_class_weights(dataset, classes: int, config: FitConfig, device: torch.device) -> torch.Tensor | None:
    """``--balance loss``: inverse-frequency class weights (mean 1 over the images), as scikit-learn's 'balanced'."""
    if config.train.balance != "loss":
        return None
    from graft.probing.linear import class_weights

    return class_weights(torch.as_tensor([label for _, label in dataset.samples]), classes).to(device)


def create_on_device(config: FitConfig, splits: DatasetSplits, runtime: Runtime) -> tuple[GraftModel, dict]:
    mean_std = None
    if config.train.strategy == "scratch":
        stats = dataset_statistics([path for path, _ in splits.train], size=SCRATCH_STATS_SIZE,
                                   max_images=SCRATCH_STATS_IMAGES, seed=config.train.seed)
        mean_std = (stats.mean, stats.std)
    model, info = create_model(config, splits.classes, mean_std)
    model.to(runtime.device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    model.freeze_bn_stats = resolve_bn_stats(config, len(splits.train)) == "frozen"
    return model, info
