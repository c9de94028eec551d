"""Grad-CAM explanations: where a trained model looked when it scored a class, as a heat map over the image.

Captum's ``LayerGradCam`` does the attribution (gradient-weighted activations of one layer). The layer is the cut
node's feature map, the last stage before the pool: the backbone's ``forward_features`` output for the default
``pre_logits`` cut, the named node's output otherwise. ViT-style trunks give tokens (N, L, C): the prefix (class,
register) tokens are set aside and the patch tokens reshaped to their H x W grid. When the trunk pools its class
token, the last block's output patch tokens never reach the logits, so the map is taken at that block's input,
where attention still mixes them (pytorch-grad-cam's recipe for ViTs). A trunk with no spatial map (a pooled
vector) has nothing to localise and is refused.

Maps are computed at the network's input size (the preprocessed input, as the model sees it) and placed back onto
the image through the inverse of the evaluation transform (aspect cap, resize, centre crop). The overlay has the
image's own shape, at most ``OVERLAY_SIDE`` pixels on its longer side: a large photo is shrunk once, straight after
its network input is made, so no array ever has the upload's full resolution (a flat 6300 x 6300 PNG of 131 KB used
to cost gigabytes of float arrays).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from graft.data.discovery import expand_inputs
from graft.data.images import load_image
from graft.data.transforms import MAX_ASPECT
from graft.errors import GraftError
from graft.evaluation.gradcam import grad_cam, layer_grad_cam
from graft.models.grafted import GraftModel
from graft.models.run_folder import load, read_card, refuse_label_sets
from graft.utils.files import atomic_write, write_json
from graft.utils.modes import evaluating
from graft.utils.runtime import resolve_device
from graft.utils.text import display_name

__all__ = [
    "ALPHA", "OVERLAY_SIDE", "SUMMARY", "Explanation", "Prepared", "available", "explain", "explain_images",
    "explain_prepared", "grad_cam", "overlay", "prepare", "shrunk", "write_explanations"
]

ALPHA = 0.5  # heat-map opacity at the hottest pixel
OVERLAY_SIDE = 512  # pixels on an overlay's longer side: enough to see where a model looked, small as a data URI
SUMMARY = "explanations.json"


@dataclass
class Explanation:
    """One image's Grad-CAM: the map (H x W in [0, 1]), the image it is drawn on and its overlay, all three the
    image's size shrunk to at most ``OVERLAY_SIDE`` pixels on the longer side, and the top-k it explains.

    ``target`` is the class the map is for (top-1 unless asked); ``error`` is set instead when the file failed.
    """

    path: str
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    target: str = ""
    cam: np.ndarray | None = None
    image: Image.Image | None = None
    overlay: Image.Image | None = None
    error: str = ""

    @property
    def note(self) -> str:
        """Said when the map is zero everywhere (ReLU of the weighted activations): nothing in the image raises the
        target's score at this layer — typical of a wrong or default guess — so the overlay is the image itself."""
        if self.cam is not None and not float(self.cam.max()) > 0:
            return f"Grad-CAM is zero everywhere: no region raises the score of {self.target} (overlay = image)"
        return ""


def available() -> bool:
    """Whether the explain extra (Captum) is installed."""
    try:
        layer_grad_cam()
    except GraftError:
        return False
    return True


@dataclass
class Prepared:
    """An image made ready to explain: the network's input, the image at overlay size and its original size.

    Made as soon as an image is decoded, so the full-resolution image can be dropped before any explaining starts.
    """

    input: torch.Tensor  # (3, H, W): the evaluation transform of the full image, as predict sees it
    shown: Image.Image  # at most ``OVERLAY_SIDE`` pixels on the longer side
    size: tuple[int, int]  # the original (width, height)


def shrunk(image: Image.Image, side: int = OVERLAY_SIDE) -> Image.Image:
    """``image`` at most ``side`` pixels on its longer side, the aspect kept; the image itself when it is no larger.

    Pillow's ``reducing_gap`` box-reduces by a whole factor first, so even a 40-megapixel image costs one pass over
    its 8-bit pixels and a small resampled copy.
    """
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def prepare(model: GraftModel, image: Image.Image, side: int = OVERLAY_SIDE) -> Prepared:
    """The network input and the overlay-size copy of a decoded RGB image (see ``Prepared``)."""
    return Prepared(model.transform(image), shrunk(image, side), image.size)


def _crop_box(width: int, height: int, preprocessing) -> tuple[float, float, float, float]:
    """Where the network's input lies in the original image: (left, top, width, height), the eval transform undone."""
    keep_w, keep_h = min(width, MAX_ASPECT * min(width, height)), min(height, MAX_ASPECT * min(width, height))
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    crop_h, crop_w = preprocessing.input_size
    resize = [int(s / preprocessing.crop_pct) for s in (crop_h, crop_w)]
    if crop_h == crop_w:  # torchvision resizes the shorter side to the size, keeping the aspect
        scale_x = scale_y = resize[0] / min(keep_w, keep_h)
    else:
        scale_y, scale_x = resize[0] / keep_h, resize[1] / keep_w
    resized_w, resized_h = int(keep_w * scale_x), int(keep_h * scale_y)
    crop_left, crop_top = round((resized_w - crop_w) / 2), round((resized_h - crop_h) / 2)
    return left + crop_left / scale_x, top + crop_top / scale_y, crop_w / scale_x, crop_h / scale_y


def _on_image(cam: torch.Tensor, original: tuple[int, int], shown: tuple[int, int], preprocessing) -> np.ndarray:
    """The input-size map placed on the shown image (``shown`` = (width, height), the ``original`` image scaled):
    zero outside the part the network saw."""
    scale_x, scale_y = shown[0] / original[0], shown[1] / original[1]
    left, top, box_w, box_h = _crop_box(*original, preprocessing)
    left, top, box_w, box_h = left * scale_x, top * scale_y, box_w * scale_x, box_h * scale_y
    width, height = shown
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(left + box_w)), min(height, round(top + box_h))
    resized = F.interpolate(cam[None, None], size=(max(1, round(box_h)), max(1, round(box_w))), mode="bilinear",
                            align_corners=False)
    full = np.zeros((height, width), dtype=np.float32)
    ox, oy = x0 - round(left), y0 - round(top)
    full[y0:y1, x0:x1] = resized[0, 0].numpy()[oy:oy + y1 - y0, ox:ox + x1 - x0]
    return full.clip(0, 1)


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = ALPHA) -> Image.Image:
    """The image with the map as a heat map (matplotlib's ``jet``) blended over it, more opaque where it is hot."""
    from matplotlib import colormaps  # here: matplotlib loads only when an overlay is drawn

    heat = colormaps["jet"](cam)[..., :3]
    weight = alpha * np.sqrt(cam)[..., None]  # cold areas keep the photo readable
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    blended = ((1 - weight) * pixels + weight * heat).clip(0, 1)
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def explain_images(model: GraftModel, images: list[Image.Image], top_k: int = 3, target: str | None = None,
                   paths: list[str] | None = None) -> list[Explanation]:
    """Grad-CAM explanations of decoded RGB images with a loaded model (the report uses this).

    Args:
        target: the class to explain; None explains each image's top-1 prediction.
        paths: names for the images in the results (default ``<input N>``).
    """
    return explain_prepared(model, [prepare(model, image) for image in images], top_k, target, paths)


def explain_prepared(model: GraftModel, prepared: list[Prepared], top_k: int = 3, target: str | None = None,
                     paths: list[str] | None = None) -> list[Explanation]:
    """``explain_images`` for images already through ``prepare``: the map at the input size, drawn at overlay size."""
    if target is not None and target not in model.classes:
        raise GraftError(f"--class {target!r} is not one of the run's classes ({', '.join(model.classes[:10])})")
    if not prepared:
        return []
    device = next(model.parameters()).device
    batch = torch.stack([item.input for item in prepared]).to(device)
    with evaluating(model), torch.inference_mode():
        probabilities = model(batch).float().softmax(1).cpu()
    k = min(top_k, len(model.classes))
    values, indices = probabilities.topk(k)
    targets = [model.classes.index(target)] * len(prepared) if target is not None else indices[:, 0].tolist()
    maps = grad_cam(model, batch, targets)
    results = []
    for i, item in enumerate(prepared):
        cam = _on_image(maps[i], item.size, item.shown.size, model.preprocessing)
        results.append(Explanation(paths[i] if paths else f"<input {i}>", [model.classes[j] for j in indices[i]],
                                   [round(v, 6) for v in values[i].tolist()], model.classes[targets[i]], cam,
                                   item.shown, overlay(item.shown, cam)))
    return results


def explain(run_dir: str | os.PathLike, inputs, top_k: int = 3, target: str | None = None, device: str = "cpu",
            batch_size: int = 16) -> list[Explanation]:
    """Grad-CAM explanations for files, folders and glob patterns with a trained run's model.

    Files go through graft's decoder (allowed formats, EXIF orientation, colour profiles) and the run's evaluation
    transform; one that fails gives an ``Explanation`` with ``error`` set, never a crash. Each image is prepared as it
    is read, so a batch holds input tensors and overlay-size copies, never ``batch_size`` full-size images.
    """
    refuse_label_sets(read_card(run_dir), run_dir, "graft explain")  # Grad-CAM of the top class of a softmax
    model = load(run_dir, resolve_device(device))
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    paths = expand_inputs([os.fspath(item) for item in items])
    results: list[Explanation] = []
    for start in range(0, len(paths), batch_size):
        good, names = [], []
        for path in paths[start:start + batch_size]:
            try:
                good.append(prepare(model, load_image(path)))
                names.append(path)
            except GraftError as error:
                results.append(Explanation(path, error=str(error)))
        results.extend(explain_prepared(model, good, top_k, target, names))
    order = {path: index for index, path in enumerate(paths)}
    return sorted(results, key=lambda row: order[row.path])


def _png_names(paths: list[str]) -> list[str]:
    """``<stem>.cam.png`` per file, numbered where two files share a stem (``a.jpg`` and ``a.png``)."""
    names, seen = [], set()
    for path in paths:
        stem = display_name(Path(path).stem) or "image"
        name, number = f"{stem}.cam.png", 2
        while name in seen:
            name, number = f"{stem}-{number}.cam.png", number + 1
        seen.add(name)
        names.append(name)
    return names


def write_explanations(explanations: list[Explanation], out_dir: str | os.PathLike) -> Path:
    """One overlay PNG per explained image (the top-k in its text chunks) and ``explanations.json``; its path.

    The folder is not checked here: callers claim it first (``graft.utils.outputs.output_folder``).
    """
    from PIL import PngImagePlugin

    out_dir = Path(out_dir)
    rows = []
    for row, name in zip(explanations, _png_names([row.path for row in explanations])):
        entry = {"file": display_name(row.path), "overlay": None, "target": row.target, "labels": row.labels,
                 "probabilities": row.probabilities, "error": row.error, "note": row.note}
        if row.overlay is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text("graft.explained", row.target)
            info.add_text("graft.top_k", ", ".join(f"{label} {p:.3f}" for label, p in zip(row.labels,
                                                                                          row.probabilities)))
            atomic_write(out_dir / name, lambda temp, image=row.overlay, info=info: image.save(temp, "PNG",
                                                                                              pnginfo=info))
            entry["overlay"] = name
        rows.append(entry)
    summary = out_dir / SUMMARY
    write_json(summary, {"method": "grad-cam (captum LayerGradCam)", "images": rows})
    return summary
