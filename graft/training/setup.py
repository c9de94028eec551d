"""The model and data loaders on their device: batch-norm policy, samplers, class weights."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler

from graft.config import BN_AUTO_FROZEN_BELOW, FitConfig
from graft.data.datasets import ImageDataset, loader_options
from graft.data.discovery import DatasetSplits
from graft.data.statistics import training_statistics
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.grafted import GraftModel, create_model
from graft.training import recipes
from graft.utils.compiling import maybe_compile
from graft.utils.runtime import Runtime

__all__ = [
    "SCRATCH_STATS_IMAGES", "SCRATCH_STATS_SIZE", "balanced_sampler", "create_loaders", "create_on_device",
    "resolve_bn_stats", "wrap_for_training", "loss_class_weights"
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
    pretrained = recipes.starts_pretrained(config)
    small = train_images < BN_AUTO_FROZEN_BELOW
    return "frozen" if pretrained and (small or recipes.solves_head(config)) else "update"


def create_loaders(splits: DatasetSplits, model: GraftModel, config: FitConfig, runtime: Runtime):
    """Training and validation DataLoaders with the backbone's preprocessing, the one builder for class folders and
    tar shards (whose streams take their own share per process and worker); under torchrun each process loads its
    share (training: padded to equal batch counts; validation: unpadded, the counts are summed over processes).

    ``--accumulate K`` loads K batches at once and the step runs them as K micro-batches (the out-of-memory path's
    gradient accumulation): the same sums of gradients as K separate loads, with one optimiser step.
    """
    data = config.data
    train_transform = create_transform(model.preprocessing, True, data.augment, data.hflip, data.random_erasing)
    val_transform = create_transform(model.preprocessing)
    generator = torch.Generator()
    if splits.shards is not None:  # tar shards stream; each rank and worker takes its share itself (graft.data.shards)
        from graft.data.shards import shard_datasets

        if config.train.balance == "sampler":
            raise GraftError("--balance sampler draws from an indexable folder; with tar shards use --balance loss")
        train_set, val_set = shard_datasets(splits, train_transform, val_transform, data.max_image_pixels, generator)
        sampler = None
    else:
        train_set = ImageDataset(splits.train, train_transform, data.max_image_pixels, with_index=True)
        val_set = ImageDataset(splits.val, val_transform, data.max_image_pixels)
        sampler = _folder_sampler(train_set, config, runtime, generator)
        if runtime.distributed:
            val_set = Subset(val_set, runtime.shard_indices(len(val_set)))
    batch = data.batch_size * config.train.accumulate
    share = len(sampler) if sampler is not None else len(train_set)
    # Training workers are not persistent: fresh workers each epoch take their seeds from the reseeded generator,
    # which keeps augmentation (and so a resumed run) reproducible.
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=sampler is None and splits.shards is None,
                              sampler=sampler, generator=generator, drop_last=share > batch,
                              **loader_options(runtime.device, data.workers))
    val_loader = DataLoader(val_set, batch_size=data.batch_size * 2, shuffle=False,
                            **loader_options(runtime.device, data.workers, persistent=True))
    return train_loader, val_loader, generator


def _folder_sampler(train_set: ImageDataset, config: FitConfig, runtime: Runtime, generator: torch.Generator):
    """The training sampler of a folder's dataset: torchrun's share, or --balance sampler's draws (None: shuffle)."""
    resumable = bool(config.train.checkpoint_every or config.train.checkpoint_minutes)
    if config.train.balance == "sampler" and (runtime.distributed or resumable):
        raise GraftError("--balance sampler draws with replacement and cannot be sharded across processes or resumed "
                         "mid-epoch; use --balance loss, or drop --checkpoint-every/--checkpoint-minutes")
    sampler = runtime.create_sampler(train_set, True, config.train.seed, resumable)
    if config.train.balance == "sampler":
        sampler = balanced_sampler(train_set.samples, generator)
    return sampler


def balanced_sampler(samples: list, generator: torch.Generator) -> WeightedRandomSampler:
    """``--balance sampler``: draws every class equally often (with replacement), an epoch still len(samples) long."""
    labels = torch.as_tensor([label for _, label in samples])
    counts = torch.bincount(labels).double()
    return WeightedRandomSampler(1.0 / counts[labels], len(samples), replacement=True, generator=generator)


def loss_class_weights(dataset, classes: int, config: FitConfig, device: torch.device) -> torch.Tensor | None:
    """``--balance loss``: inverse-frequency class weights (mean 1 over the images), as scikit-learn's 'balanced'."""
    if config.train.balance != "loss":
        return None
    from graft.probing.linear import class_weights

    return class_weights(torch.as_tensor([label for _, label in dataset.samples]), classes).to(device)


def create_on_device(config: FitConfig, splits: DatasetSplits, runtime: Runtime) -> tuple[GraftModel, dict]:
    mean_std = None
    if config.train.strategy == "scratch":
        stats = training_statistics(splits, size=SCRATCH_STATS_SIZE, max_images=SCRATCH_STATS_IMAGES,
                                    seed=config.train.seed)
        mean_std = (stats.mean, stats.std)
    model, info = create_model(config, splits.classes, mean_std, recipes.starts_pretrained(config))
    model.to(runtime.device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    model.freeze_bn_stats = resolve_bn_stats(config, len(splits.train)) == "frozen"
    if config.train.sync_bn and runtime.distributed and not model.freeze_bn_stats:
        if runtime.device.type == "cuda":  # SyncBatchNorm is CUDA-only; it keeps the parameter and buffer names
            model.trunk = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.trunk)
        else:
            runtime.log("warning: --sync-bn needs CUDA (torch's SyncBatchNorm); each process keeps its own batch "
                        "statistics and DDP copies rank 0's running statistics to the others at each step")
    return model, info


def wrap_for_training(model: GraftModel, runtime: Runtime, compile_mode: str = "off"):
    """The model as this stage trains it: under torchrun a DistributedDataParallel around it, built after the stage
    froze what it freezes (DDP registers gradient hooks on the parameters that require grad when it is built), so a
    head-only stage on a frozen trunk syncs only the head and needs no ``find_unused_parameters``. One process: the
    model itself. Checkpoints and weights are always read from ``model``, never from the wrapper's ``module.`` keys.

    ``--compile``: torch.compile around that (DDP inside, as torch's DDP notes advise, so its graph is split at the
    buckets), per stage because each stage changes what requires grad; a failure continues eager
    (``graft.utils.compiling``). Validation stays eager: its batch and mode differ and would compile a second graph.
    """
    if not any(p.requires_grad for p in model.parameters()):
        return model
    trained = model
    if runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids)
    return maybe_compile(trained, compile_mode, "training", runtime.log)
