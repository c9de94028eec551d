"""The grafted model: a trunk cut from a backbone plus a new head, and how it is built from a config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from graft.config import FitConfig, ModelConfig
from graft.errors import GraftError
from graft.models.backbones import lab
from graft.models.backbones.base import Preprocessing
from graft.models.backbones.registry import create_backbone
from graft.models.heads import create_head
from graft.models.prediction import predict_images
from graft.models.surgery import DEFAULT_NODE, Trunk, cut, keep_frozen_norms_eval

__all__ = ["GraftModel", "ModelSpec", "backbone_name", "create_model", "rebuild"]


class GraftModel(nn.Module):
    """``head(trunk(x))`` with the class names and preprocessing it was trained with.

    ``train()`` keeps frozen parts honest: a fully frozen trunk runs entirely in eval mode (no dropout, no BN
    statistics updates) and without autograd; a partly frozen one keeps its frozen batch-norm layers in eval mode.
    """

    def __init__(self, trunk: Trunk, head: nn.Module, classes: list[str], preprocessing: Preprocessing):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.freeze_bn_stats = False  # True: every trunk BN normalises with its running statistics, even if trained
        # multi-label models: each class's decision threshold on its sigmoid probability (None: single-label, softmax)
        self.thresholds: list[float] | None = None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def __repr__(self) -> str:
        """One line a notebook can show (the module tree is ``print(model.trunk)`` / ``model.head``)."""
        more = f", ... ({len(self.classes)} classes)" if len(self.classes) > 5 else ""
        classes = ", ".join(self.classes[:5]) + more
        size = "x".join(str(side) for side in self.preprocessing.input_size)
        config = getattr(self.trunk.net, "pretrained_cfg", None) or {}  # timm's; other sources: the class name
        backbone = config.get("architecture") or type(self.trunk.net).__name__
        return f"GraftModel(backbone={backbone}, cut_at={self.trunk.node}, classes=[{classes}], input={size})"

    def trunk_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.trunk.parameters())

    def train(self, mode: bool = True) -> GraftModel:
        super().train(mode)
        if mode and self.trunk_frozen():
            self.trunk.eval()
        elif mode:
            keep_frozen_norms_eval(self.trunk, every_norm=self.freeze_bn_stats)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.trunk_frozen():
            with torch.no_grad():  # nothing below the head learns: skip the trunk's autograd graph entirely
                features = self.trunk(x)
            return self.head(features)
        return self.head(self.trunk(x))

    @property
    def transform(self):
        """The evaluation preprocessing (a torchvision transform): a PIL image in, the network's input tensor out."""
        from graft.data.transforms import create_transform  # here: torchvision loads only when it is used

        return create_transform(self.preprocessing)

    def predict(self, inputs, top_k: int = 3, batch_size: int = 32):
        """Top-k labels and probabilities for a path, a PIL image, a NumPy array, a tensor or a list of them (a
        multi-label model: every label whose probability reaches its threshold, most probable first; ``top_k`` unused).

        Raw images (paths, PIL images, ``uint8`` arrays and tensors) go through ``transform``; a floating-point tensor
        is taken as already preprocessed (see ``graft.models.prediction``). Runs on the model's device, in eval mode.

        Returns:
            One ``Prediction`` for one input, a list for a list.
        """
        return predict_images(self, inputs, top_k, batch_size)


@dataclass
class ModelSpec:
    """What is needed to rebuild a GraftModel's architecture (weights come separately)."""

    backbone: str
    cut_at: str
    pool: str
    head: str
    dropout: float
    classes: list[str]
    preprocessing: Preprocessing


def backbone_name(model: ModelConfig) -> str:
    """The backbone name to build and record: a lab network's name carries its options (see
    ``graft.models.backbones.lab``)."""
    options = lab.ArchOptions(model.activation, model.norm, model.init, model.vgg_stages)
    if model.backbone in lab.ARCHITECTURES:
        return lab.lab_backbone_name(model.backbone, options)
    if options != lab.ArchOptions():
        raise GraftError(f"--activation, --norm, --init and --vgg-stages shape the lab networks "
                         f"({', '.join(lab.ARCHITECTURES)}); '{model.backbone}' keeps its own")
    return model.backbone


def create_model(config: FitConfig, classes: list[str], mean_std: tuple | None = None,
                 pretrained: bool = True) -> tuple[GraftModel, dict]:
    """Creates the backbone, cuts it and grafts a new head.

    Args:
        pretrained: start from pretrained weights (when ``model.pretrained`` allows); training decides, e.g. False for
            the ``scratch`` strategy (``graft.training.recipes.starts_pretrained``).
        mean_std: per-channel (mean, std) of the training data, replacing the backbone's (scratch training).

    Returns:
        The model and a dict describing the backbone (name, weights source, feature width, cut node).
    """
    pretrained = pretrained and config.model.pretrained
    name = backbone_name(config.model)
    backbone = create_backbone(name, pretrained=pretrained, weights_file=config.model.weights if pretrained else None)
    preprocessing = backbone.preprocessing.with_size(config.data.image_size)
    if mean_std is not None:
        preprocessing = dataclasses.replace(preprocessing, mean=tuple(mean_std[0]), std=tuple(mean_std[1]))
    trunk, width = cut(backbone.net, config.model.cut_at, config.model.pool, preprocessing.input_size)
    head = create_head(width, len(classes), config.model.head, config.model.dropout)
    info = {"backbone": name, "weights": backbone.weights, "feature_dim": width, "cut_at": trunk.node,
            "stage_nodes": backbone.stage_nodes}
    return GraftModel(trunk, head, classes, preprocessing), info


def rebuild(spec: ModelSpec) -> GraftModel:
    """The architecture from a spec, randomly initialised, with no network access (weights are loaded after)."""
    backbone = create_backbone(spec.backbone, pretrained=False)
    node = None if spec.cut_at == DEFAULT_NODE else spec.cut_at
    trunk, width = cut(backbone.net, node, spec.pool, spec.preprocessing.input_size)
    head = create_head(width, len(spec.classes), spec.head, spec.dropout)
    return GraftModel(trunk, head, spec.classes, spec.preprocessing)
