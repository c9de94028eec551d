"""Preprocessing and augmentation transforms built from a backbone's preprocessing, and test-time views."""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torchvision import transforms

from graft.errors import GraftError

__all__ = [
    "AUTO_AUGMENT", "CROP_SCALES", "CapAspect", "MAX_ASPECT", "TTAViews", "TTA_VIEWS", "create_transform", "parse_tta"
]

log = logging.getLogger(__name__)


MAX_ASPECT = 8  # evaluation resize: longer side at most this many times the shorter (padding beyond)


_INTERPOLATION = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


class CapAspect:
    """Centre-crops the longer side to at most ``MAX_ASPECT`` times the shorter one.

    Lossless before resize-then-centre-crop (the crop keeps only the centre anyway), and it keeps a 1x10000 strip from
    becoming a 36x360000 intermediate image.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short = min(width, height)
        if max(width, height) <= MAX_ASPECT * short:
            return image
        keep_w, keep_h = min(width, MAX_ASPECT * short), min(height, MAX_ASPECT * short)
        left, top = (width - keep_w) // 2, (height - keep_h) // 2
        return image.crop((left, top, left + keep_w, top + keep_h))


# --augment → timm's auto_augment string (timm.data.auto_augment); trivial is torchvision's TrivialAugmentWide, which
# timm has no string for. "inc1": magnitudes that increase the distortion, as timm's training recipes use; "mmax9":
# mstd's noise may otherwise reach magnitude 10, where timm's increasing posterize keeps 0 bits, which Pillow >= 11
# refuses (ValueError mid-epoch).
AUTO_AUGMENT = {"rand": "rand-m9-mstd0.5-inc1-mmax9", "auto": "original"}
CROP_SCALES = {"standard": (0.08, 1.0), "light": (0.6, 1.0)}


def create_transform(preprocessing, train: bool = False, augment: str = "standard", hflip: bool = True,
                     random_erasing: float = 0.0):
    """The torchvision transform for a backbone's preprocessing (see ``graft.models.backbones.base.Preprocessing``).

    Training: random-resized-crop (scale 0.08-1 for ``standard``, 0.6-1 for ``light``) and optional horizontal
    flip; ``rand`` / ``auto`` / ``trivial`` follow the standard crop and flip with timm's RandAugment / AutoAugment or
    torchvision's TrivialAugmentWide (``timm.data.create_transform``'s pipeline, no colour jitter);
    ``random_erasing`` (timm's ``re_prob``, per-pixel noise) erases a rectangle of the normalised tensor.
    Evaluation (and ``augment='none'``): resize to size / crop_pct, then centre crop, as the weights expect.
    """
    if train and augment in (*AUTO_AUGMENT, "trivial"):
        return _timm_train_transform(preprocessing, augment, hflip, random_erasing)
    size = tuple(preprocessing.input_size)
    interpolation = _INTERPOLATION.get(preprocessing.interpolation, transforms.InterpolationMode.BILINEAR)
    normalize = [transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std)]
    if train and random_erasing:
        normalize.append(_random_erasing(random_erasing))
    if train and augment != "none":
        scale = CROP_SCALES.get(augment, CROP_SCALES["light"])
        ops = [transforms.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
        if hflip:
            ops.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(ops + normalize)
    resize = tuple(int(s / preprocessing.crop_pct) for s in size)
    resize_op = transforms.Resize(resize if size[0] != size[1] else resize[0], interpolation, antialias=True)
    ops = [CapAspect(), resize_op, transforms.CenterCrop(size)]
    if train and hflip:
        ops.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(ops + normalize)


def _random_erasing(probability: float):
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability, mode="pixel", device="cpu")  # timm's train.py default mode


def _timm_train_transform(preprocessing, augment: str, hflip: bool, random_erasing: float):
    """timm's training pipeline (crop and flip, then the policy, then tensor, normalise, erasing) with the backbone's
    size, interpolation and statistics; PIL images in, as graft's decode yields."""
    from timm.data import create_transform as timm_transform

    primary, secondary, final = timm_transform(
        (3, *preprocessing.input_size), is_training=True, scale=CROP_SCALES["standard"], hflip=0.5 if hflip else 0.0,
        color_jitter=None, auto_augment=AUTO_AUGMENT.get(augment), interpolation=preprocessing.interpolation,
        mean=tuple(preprocessing.mean), std=tuple(preprocessing.std), re_prob=random_erasing, re_mode="pixel",
        separate=True)
    if augment == "trivial":
        interpolation = _INTERPOLATION.get(preprocessing.interpolation, transforms.InterpolationMode.BILINEAR)
        secondary = transforms.Compose([transforms.TrivialAugmentWide(interpolation=interpolation)])
    return transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms])


TTA_VIEWS = ("flip", "crops")


def parse_tta(spec: str | None) -> tuple[str, ...]:
    """``flip`` / ``crops`` / ``flip,crops`` → the chosen views; empty or None → none."""
    chosen = tuple(part.strip() for part in (spec or "").split(",") if part.strip())
    unknown = [part for part in chosen if part not in TTA_VIEWS]
    if unknown:
        raise GraftError(f"tta '{spec}' not understood: use flip, crops or flip,crops")
    return tuple(view for view in TTA_VIEWS if view in chosen)


class TTAViews:
    """Test-time augmentation: one image → a (views, 3, H, W) tensor; view 0 is always the plain evaluation view.

    Order: centre crop, then with ``crops`` the four corner crops (top-left, top-right, bottom-left, bottom-right) of
    the same resized image, then with ``flip`` the mirror image of each view before it, in the same order.
    """

    def __init__(self, preprocessing, spec: str | None):
        self.views = parse_tta(spec)
        size = tuple(preprocessing.input_size)
        interpolation = _INTERPOLATION.get(preprocessing.interpolation, transforms.InterpolationMode.BILINEAR)
        resize = tuple(int(s / preprocessing.crop_pct) for s in size)
        self.resize = transforms.Compose([CapAspect(), transforms.Resize(
            resize if size[0] != size[1] else resize[0], interpolation, antialias=True)])
        self.size = size
        self.normalize = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize(preprocessing.mean, preprocessing.std)])

    def __len__(self) -> int:
        return (5 if "crops" in self.views else 1) * (2 if "flip" in self.views else 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = self.resize(image)
        if "crops" in self.views:
            top_left, top_right, bottom_left, bottom_right, centre = transforms.functional.five_crop(resized, self.size)
            crops = [centre, top_left, top_right, bottom_left, bottom_right]
        else:
            crops = [transforms.functional.center_crop(resized, list(self.size))]
        if "flip" in self.views:
            crops += [crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for crop in crops]
        return torch.stack([self.normalize(crop) for crop in crops])
