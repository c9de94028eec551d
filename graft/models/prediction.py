"""Predictions on images already in memory: ``GraftModel.predict`` for notebooks and scripts.

What one input may be (a single one gives one ``Prediction``, a list or tuple gives a list):

- a path (``str`` or ``os.PathLike``): decoded as ``graft predict`` decodes files (allowed formats, ICC, EXIF);
- a PIL image: colours and EXIF orientation applied (``upright_rgb``), then the eval preprocessing;
- a NumPy ``H x W x 3`` ``uint8`` array, or a ``uint8`` tensor ``H x W x 3`` or ``3 x H x W``: raw RGB pixels, then
  the eval preprocessing;
- a floating-point tensor ``3 x H x W`` (one image) or ``N x 3 x H x W`` (a batch): already preprocessed, i.e. the
  output of ``model.transform``; it goes to the network as it is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from graft.data.images import load_image, upright_rgb
from graft.errors import GraftError
from graft.utils.modes import evaluating

__all__ = ["Prediction", "label_set_prediction", "predict_images"]


@dataclass
class Prediction:
    """Top-k labels and probabilities for one input, or the error that prevented it (a multi-label model: every label
    whose probability reaches its threshold, most probable first; possibly none).

    ``path`` is the file's path, or ``<input N>`` for an image given in memory (N: its index in the call).
    """

    path: str
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""


def _raw_pixels(item: Any, index: int) -> Image.Image | None:
    """A PIL image for a raw-image input; None for a preprocessed float tensor."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, Image.Image):
        return upright_rgb(item)
    if isinstance(item, torch.Tensor):
        if item.is_floating_point():
            return None
        item = item.cpu().numpy()
        if item.ndim == 3 and item.shape[0] == 3 and item.shape[-1] != 3:
            item = item.transpose(1, 2, 0)  # CHW → HWC
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
            raise GraftError(f"input {index}: a NumPy array must be H x W x 3 uint8 RGB, got {item.dtype} "
                             f"{tuple(item.shape)}")
        return Image.fromarray(np.ascontiguousarray(item), "RGB")
    raise GraftError(f"input {index}: expected a path, a PIL image, a NumPy array or a tensor, got "
                     f"{type(item).__name__}")


def _batches(model: nn.Module, items: list) -> tuple[torch.Tensor, list[str]]:
    """Every input as model-ready (N, 3, H, W) float tensors, and each row's name."""
    transform = model.transform
    tensors, names = [], []
    for index, item in enumerate(items):
        image = _raw_pixels(item, index)
        if image is not None:
            tensors.append(transform(image).unsqueeze(0))
            names.append(os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<input {index}>")
            continue
        batch = item.unsqueeze(0) if item.ndim == 3 else item
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise GraftError(f"input {index}: a float tensor must be preprocessed 3 x H x W or N x 3 x H x W, got "
                             f"{tuple(item.shape)} (pass raw pixels as uint8, or use model.transform)")
        tensors.append(batch.float().cpu())
        names += [f"<input {index}>"] if item.ndim == 3 else [f"<input {index}.{row}>" for row in range(len(batch))]
    sizes = {tuple(tensor.shape[2:]) for tensor in tensors}
    if len(sizes) > 1:
        raise GraftError(f"preprocessed tensors of different sizes {sorted(sizes)}; use model.transform for each")
    return torch.cat(tensors), names


def label_set_prediction(name: str, probabilities: torch.Tensor, classes: list[str], thresholds) -> Prediction:
    """A multi-label model's row: the classes whose sigmoid probability reaches their threshold, most probable
    first."""
    values = probabilities.tolist()
    chosen = sorted((i for i, (p, t) in enumerate(zip(values, thresholds)) if p >= t), key=lambda i: -values[i])
    return Prediction(name, [classes[i] for i in chosen], [round(values[i], 6) for i in chosen])


def _probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else logits.softmax(1)


@torch.inference_mode()
def predict_images(model: nn.Module, inputs: Any, top_k: int = 3, batch_size: int = 32):
    """``GraftModel.predict``: a ``Prediction`` for one input, a list of them for a list (see the module's docstring).
    ``model`` is a ``GraftModel`` (its ``transform`` and ``classes``); this module sits below ``graft.models.grafted``.

    Raises:
        GraftError: for an input of an unsupported kind or shape; an unreadable file raises (``ImageError``) instead
            of giving an error row, since the caller holds the input in hand.
    """
    single = not isinstance(inputs, (list, tuple))
    items = [inputs] if single else list(inputs)
    if not items:
        return []
    images, names = _batches(model, items)
    device = next(model.parameters()).device
    with evaluating(model):
        probabilities = torch.cat([_probabilities(model(part.to(device)).float(), model.multi_label).cpu()
                                   for part in images.split(batch_size)])
    if model.multi_label:
        rows = [label_set_prediction(name, row, model.classes, model.thresholds) for name, row in
                zip(names, probabilities)]
        return rows[0] if single and len(rows) == 1 else rows
    k = min(top_k, len(model.classes))
    rows = []
    for name, row in zip(names, probabilities):
        values, indices = row.topk(k)
        rows.append(Prediction(name, [model.classes[i] for i in indices.tolist()],
                               [round(v, 6) for v in values.tolist() if not math.isnan(v)]))
    return rows[0] if single and len(rows) == 1 else rows
