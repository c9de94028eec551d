"""What an export folder carries for a consumer without graft: ``preprocessing.json`` (``consumer_metadata``: the
classes, the input and the preprocessing) and ``predict_onnx.py`` (``standalone_example``: NumPy, Pillow and ONNX
Runtime only)."""

from __future__ import annotations

import inspect

from graft.data.images import ALLOWED_FORMATS, FORMAT_LIST, to_srgb, to_rgb, upright_rgb
from graft.data.transforms import MAX_ASPECT, CapAspect
from graft.models.grafted import GraftModel

__all__ = ["STANDALONE_EXAMPLE", "consumer_metadata", "standalone_example"]


def consumer_metadata(model: GraftModel) -> dict:
    """Everything a consumer without graft needs to feed the exported network."""
    prep = model.preprocessing
    size = list(prep.input_size)
    return {
        "classes": model.classes,
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "channels": "RGB", "height": size[0],
                  "width": size[1]},
        "output": _output(model),
        "preprocessing": {
            "resize_shorter_side": int(min(size) / prep.crop_pct), "interpolation": prep.interpolation,
            "crop_pct": prep.crop_pct,
            "center_crop": size, "scale": "divide 8-bit values by 255", "mean": list(prep.mean), "std": list(prep.std),
        },
    }


def _output(model: GraftModel) -> dict:
    if not model.multi_label:
        return {"name": "logits", "softmax": "apply softmax over axis 1 for probabilities"}
    return {"name": "logits", "multi_label": True,
            "sigmoid": "apply a sigmoid to each logit for its class's probability; the classes whose probability "
                       "reaches their threshold form the image's label set",
            "thresholds": [round(float(t), 6) for t in model.thresholds]}


def standalone_example() -> str:
    """``predict_onnx.py``'s source. It runs without graft, so it carries copies: the format allow-list and the
    source of graft's own decoding functions (ICC to sRGB, EXIF orientation, RGB conversion, the aspect cap), so an
    image decodes there exactly as in ``graft predict``; resize and crop follow torchvision's rules (tested)."""
    decoding = "\n\n".join(inspect.getsource(function) for function in (to_srgb, to_rgb, upright_rgb, CapAspect))
    return (STANDALONE_EXAMPLE.replace("__ALLOWED_FORMATS__", repr(ALLOWED_FORMATS))
            .replace("__FORMAT_LIST__", FORMAT_LIST).replace("__MAX_ASPECT__", repr(MAX_ASPECT))
            .replace("# __GRAFT_DECODING__\n", decoding))


STANDALONE_EXAMPLE = '''"""Classify images with the exported model, without graft or torch.

Needs: pip install onnxruntime pillow numpy

Usage: python predict_onnx.py IMAGE [IMAGE ...]   (--help: this text; -- before a file name that starts with -)

Reads __FORMAT_LIST__ only, by content, whatever a file is called: Pillow's other formats include EPS,
which runs Ghostscript on the file. A file that cannot be read is reported on stderr and skipped.
"""
import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = __ALLOWED_FORMATS__  # graft's allow-list, by Pillow's format names
MAX_ASPECT = __MAX_ASPECT__  # graft's cap on the longer side, in multiples of the shorter one
HERE = Path(__file__).parent
META = json.loads((HERE / "preprocessing.json").read_text())
PREP = META["preprocessing"]
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


# graft's own decoding functions (graft.data.images, graft.data.transforms), copied when this file was exported:
# __GRAFT_DECODING__


def resized(image):
    """Resize as torchvision does in graft: a square input keeps the aspect (shorter side to size / crop_pct,
    the longer one truncated), a non-square one goes to exactly (height, width) / crop_pct."""
    height, width = PREP["center_crop"]
    target = [int(height / PREP["crop_pct"]), int(width / PREP["crop_pct"])]
    if height == width:
        short, long = sorted(image.size)
        side = (target[0], int(target[0] * long / short))
        target = list(side) if image.height <= image.width else list(reversed(side))
    return image.resize((target[1], target[0]), RESAMPLE.get(PREP["interpolation"], Image.BILINEAR))


def center_crop(pixels):
    """torchvision's centre crop of an HxWxC array: zero padding where the crop is larger, offsets rounded."""
    height, width = PREP["center_crop"]
    pad_h, pad_w = max(height - pixels.shape[0], 0), max(width - pixels.shape[1], 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top, left = round((pixels.shape[0] - height) / 2.0), round((pixels.shape[1] - width) / 2.0)
    return pixels[top:top + height, left:left + width]


def preprocess(path):
    with Image.open(path, formats=ALLOWED_FORMATS) as opened:
        opened.seek(0)
        opened.load()
        image = upright_rgb(opened)
    image = resized(CapAspect()(image))
    pixels = center_crop(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = (pixels - np.array(PREP["mean"], np.float32)) / np.array(PREP["std"], np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def readable(paths):
    """(paths, pixels) of the files that decode; the others are named on stderr with the reason."""
    kept, images = [], []
    for path in paths:
        try:
            images.append(preprocess(path))
            kept.append(path)
        except UnidentifiedImageError:
            print(f"{path}: skipped, not an allowed image format; this reads __FORMAT_LIST__", file=sys.stderr)
        except Exception as error:  # noqa: BLE001 - one bad file must not cost the others their answer
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"{path}: skipped, not a readable image ({reason})", file=sys.stderr)
    return kept, images


def main(paths):
    paths, images = readable(paths)
    if not images:
        return 1
    session = onnxruntime.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": np.stack(images)})[0]
    if META["output"].get("multi_label"):  # a label set: each class its own sigmoid and threshold
        probabilities = 1 / (1 + np.exp(-logits))
        for path, row in zip(paths, probabilities):
            chosen = [i for i, t in enumerate(META["output"]["thresholds"]) if row[i] >= t]
            print(f"{path}\\t" + " ".join(f"{META['classes'][i]}:{row[i]:.4f}" for i in chosen))
        return 0
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for path, row in zip(paths, probabilities):
        best = int(row.argmax())
        print(f"{path}\\t{META['classes'][best]}\\t{row[best]:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\\n\\n")[0],
                                     epilog="prints one line per image: PATH<TAB>CLASS<TAB>PROBABILITY")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    sys.exit(main(parser.parse_args().images))
'''
