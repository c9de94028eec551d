"""Per-channel mean and std of a set of images (for networks trained from scratch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.errors import GraftError

__all__ = ["DatasetStats", "dataset_statistics"]


@dataclass
class DatasetStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mean_image: np.ndarray  # (H, W, 3) float in [0, 1]
    images: int

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "images": self.images,
                "size": list(self.mean_image.shape[:2])}


def dataset_statistics(paths: list[str], size: int = 64, max_images: int = 5000, seed: int = 0) -> DatasetStats:
    """Per-channel mean and std (over every pixel) and the mean image of up to ``max_images`` images resized to
    ``size``×``size``, in [0, 1] units, as ``transforms.Normalize`` takes them."""
    from graft.data.images import ImageError, load_image

    rng = np.random.default_rng(seed)
    chosen = list(paths) if len(paths) <= max_images else list(rng.choice(paths, max_images, replace=False))
    total = np.zeros((size, size, 3))
    squares = np.zeros(3)
    count = 0
    for path in chosen:
        try:
            image = load_image(path).resize((size, size))
        except ImageError:
            continue
        pixels = np.asarray(image, dtype=np.float64) / 255.0
        total += pixels
        squares += (pixels ** 2).mean(axis=(0, 1))
        count += 1
    if not count:
        raise GraftError("no readable images to compute statistics from")
    mean_image = total / count
    mean = mean_image.mean(axis=(0, 1))
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))
    return DatasetStats(tuple(float(v) for v in mean), tuple(float(v) for v in std), mean_image, count)
