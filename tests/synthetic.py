"""Images the tests make: a learnable task of coloured shapes (class = shape, with a class-typical colour)."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
COLOURS = {"circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (50, 80, 230)}


def shape_image(kind: str, rng: random.Random, size: int = 48) -> Image.Image:
    background = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
    colour = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLOURS[kind])
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def make_shapes(root: Path, per_class: int = 24, splits: dict[str, int] | None = None, seed: int = 0,
                size: int = 48, fmt: str = "png") -> Path:
    """Writes root/[SPLIT/]CLASS/NNN.png; ``splits`` maps split name → images per class (else one plain tree)."""
    rng = random.Random(seed)
    layout = splits or {"": per_class}
    for split, count in layout.items():
        for kind in CLASSES:
            folder = root / split / kind if split else root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                shape_image(kind, rng, size).save(folder / f"{index:03d}.{fmt}")
    return root
