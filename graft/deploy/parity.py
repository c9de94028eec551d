"""Parity of an exported form with the eager model: the inputs it is checked on and the check itself.

Shared by ``graft.deploy.export`` (ONNX, torch.export, folding) and ``graft.deploy.hub`` (timm, hf), below both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from graft.data.discovery import discover
from graft.data.images import load_image
from graft.data.scan import readable
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.models.run_folder import read_card

__all__ = ["PARITY_INPUTS", "RUNTIME_TOLERANCE", "check_parity", "parity_inputs"]

PARITY_INPUTS = 16  # images used to verify each exported form
RUNTIME_TOLERANCE = 1e-3  # ONNX Runtime / torch.export vs eager: different kernels, same maths


def parity_inputs(model: GraftModel, run_dir: Path, data: str | None, count: int = PARITY_INPUTS
                  ) -> tuple[torch.Tensor, str]:
    """Real images in the model's preprocessing: from ``data`` or the run's own validation split; random tensors
    only when neither can be read (said so in export.json)."""
    source = data or read_card(run_dir).get("config", {}).get("data", {}).get("path")
    transform = create_transform(model.preprocessing)
    samples = []
    if source:
        try:
            splits = discover(source, seed=0)
            samples = readable((splits.val or splits.train)[:count] + splits.train[:count])[:count]
        except (GraftError, OSError):
            samples = []
    if samples:
        return torch.stack([transform(load_image(path)) for path, _ in samples]), f"{len(samples)} images from {source}"
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, 3, *model.preprocessing.input_size, generator=generator)
    return inputs, "random normal tensors (no readable data found; pass --data for real images)"


def check_parity(name: str, difference: float, tolerance: float) -> float:
    """``difference`` (the largest |Δlogit| of an exported form against the eager model) if within ``tolerance``;
    else a GraftError naming the form."""
    if not difference <= tolerance:  # also catches NaN
        raise GraftError(f"export parity failed for {name}: max |Δlogit| {difference:.2e} > {tolerance:.0e}; the "
                         "exported model would not match — please report this with the run's graft.json")
    return difference
