"""Per-channel mean and std of a set of images (for networks trained from scratch)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from graft.errors import GraftError
from graft.utils.limits import DEFAULT_MAX_PIXELS
from graft.utils.progress import Progress

__all__ = ["DatasetStats", "dataset_statistics", "image_statistics", "shard_statistics", "training_statistics"]

logger = logging.getLogger(__name__)


@dataclass
class DatasetStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mean_image: np.ndarray  # (H, W, 3) float in [0, 1]
    images: int

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "images": self.images,
                "size": list(self.mean_image.shape[:2])}


def dataset_statistics(paths: list[str], size: int = 64, max_images: int = 5000, seed: int = 0,
                       log=None) -> DatasetStats:
    """Per-channel mean and std (over every pixel) and the mean image of up to ``max_images`` images resized to
    ``size``×``size``, in [0, 1] units, as ``transforms.Normalize`` takes them. ``log``: where progress lines go."""
    from graft.data.images import ImageError, load_image

    rng = np.random.default_rng(seed)
    chosen = list(paths) if len(paths) <= max_images else list(rng.choice(paths, max_images, replace=False))

    def images():
        with Progress("statistics", len(chosen), "images", log, log is not None) as progress:
            for done, path in enumerate(chosen, start=1):
                try:
                    yield load_image(path)
                except ImageError:
                    continue
                finally:
                    progress.update(done)

    return image_statistics(images(), size)


def training_statistics(splits, size: int = 64, max_images: int = 5000, seed: int = 0, log=None) -> DatasetStats:
    """``dataset_statistics`` of a ``DatasetSplits``' training split: its files, or a bounded sample of its tar
    shards' stream (``shard_statistics``)."""
    if splits.shards is not None:
        return shard_statistics(splits.shards["train"], size, max_images, seed)
    return dataset_statistics([path for path, _ in splits.train], size, max_images, seed, log)


def shard_statistics(shards: list[tuple[str, list]], size: int, max_images: int, seed: int = 0,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DatasetStats:
    """``dataset_statistics`` for a shard set, from a bounded sample of the stream: shards in a seeded order until
    they hold ``max_images`` samples, then a seeded choice of that many among them, so the statistics read about
    max_images / (samples per shard) + 1 shards whatever the set's size."""
    from graft.data.images import ImageError, decode_image
    from graft.data.shards import read_tar  # here: shards imports torch

    order = list(range(len(shards)))
    random.Random(seed).shuffle(order)
    chosen, held = [], 0
    for number in order:
        if held >= max_images:
            break
        chosen.append(number)
        held += len(shards[number][1])
    keys = [(number, key) for number in chosen for key, _ in shards[number][1]]
    wanted = set(keys if len(keys) <= max_images else random.Random(seed).sample(keys, max_images))

    def images():
        for number in chosen:
            path = shards[number][0]
            for key, member, data, _ in read_tar(path):
                if (number, key) in wanted and data is not None:
                    try:
                        yield decode_image(data, f"{path}: member {member}", max_pixels)
                    except ImageError as error:
                        logger.warning("%s (left out of the statistics)", error)

    return image_statistics(images(), size)


def image_statistics(images: Iterable[Image.Image], size: int = 64) -> DatasetStats:
    """``dataset_statistics`` of RGB images already chosen and decoded (a folder's files, a sample of tar shards)."""
    total = np.zeros((size, size, 3))
    squares = np.zeros(3)
    count = 0
    for image in images:
        pixels = np.asarray(image.resize((size, size)), dtype=np.float64) / 255.0
        total += pixels
        squares += (pixels ** 2).mean(axis=(0, 1))
        count += 1
    if not count:
        raise GraftError("no readable images to compute statistics from")
    mean_image = total / count
    mean = mean_image.mean(axis=(0, 1))
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))
    return DatasetStats(tuple(float(v) for v in mean), tuple(float(v) for v in std), mean_image, count)
