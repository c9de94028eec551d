"""torchvision classifiers wrapped to timm's backbone contract (``tv:NAME[.WEIGHTS]``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graft.errors import GraftError
from graft.models.backbones.base import Backbone, Preprocessing, did_you_mean, read_weights_file
from graft.models.surgery import Capture
from graft.utils.files import file_sha256
from graft.utils.modes import evaluating

__all__ = ["TORCHVISION_FAMILIES", "TorchvisionFamily", "TorchvisionNet", "TorchvisionSource"]


@dataclass(frozen=True)
class TorchvisionFamily:
    """How to see a torchvision classifier through timm's contract: its feature module, classifier, stage regexes."""

    pattern: str  # regex over the model name
    features: str  # module whose output is the last feature map (NCHW)
    classifier: str  # attribute replaced by Identity
    group_matcher: dict  # timm-style coarse groups
    stages: str  # regex over module names: the stage nodes `graft layers` shows


TORCHVISION_FAMILIES = [
    TorchvisionFamily(r"^(resnet|resnext|wide_resnet)", "layer4", "fc",
                      {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}, r"^(relu|layer\d)$"),
    TorchvisionFamily(r"^regnet", "trunk_output", "fc", {"stem": r"^stem", "blocks": r"^trunk_output\.block(\d+)"},
                      r"^(stem|trunk_output\.block\d+)$"),
    TorchvisionFamily(
        r"^(vgg|alexnet|efficientnet|mobilenet|convnext|mnasnet)", "features", "classifier",
        {"blocks": r"^features\.(\d+)"}, r"^features\.\d+$",
    ),
]


class TorchvisionNet(nn.Module):
    """Wraps a torchvision classifier so it honours timm's contract (forward_features / forward_head / ...)."""

    def __init__(self, model: nn.Module, family: TorchvisionFamily):
        super().__init__()
        self.model = model
        self.features_node = f"model.{family.features}"
        self._group_matcher = {k: v.replace("^", "^model\\.") for k, v in family.group_matcher.items()}
        setattr(model, family.classifier, nn.Identity())
        if hasattr(model, "avgpool"):
            model.avgpool = nn.Identity()
        # appended, not prepended: a cut at the feature module itself stops first and its stop passes this one
        self._capture = Capture(model, [family.features], prepend=False)
        self._features = family.features
        with torch.no_grad(), evaluating(model):
            width = self.forward_features(torch.zeros(1, 3, 64, 64)).shape[1]
        self.num_features = width
        stages = [n for n, _ in model.named_modules() if n and re.match(family.stages, n)]
        self.feature_info = [{"module": f"model.{n}"} for n in stages]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _, outputs = self._capture.run(self.model, x)
        return outputs.get(self._features)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int = 0, global_pool: str | None = None) -> None:
        if num_classes:
            raise GraftError("graft adds its own head; torchvision backbones are used with num_classes=0")

    def group_matcher(self, coarse: bool = False) -> dict:
        return self._group_matcher


class TorchvisionSource:
    """torchvision models, ``tv:NAME[.WEIGHTS]`` (WEIGHTS defaults to DEFAULT), with the weights enum's transforms."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        import torchvision

        arch, _, tag = name.partition(".")
        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            raise GraftError(f"unknown torchvision model '{arch}'.{did_you_mean(arch, available)}")
        family = next((f for f in TORCHVISION_FAMILIES if re.match(f.pattern, arch)), None)
        if family is None:
            supported = ", ".join(f.pattern for f in TORCHVISION_FAMILIES)
            raise GraftError(f"torchvision model '{arch}' has no adapter yet (supported: {supported}); "
                             "use its timm twin")
        weights_enum = torchvision.models.get_model_weights(arch)
        try:
            weights = weights_enum[tag or "DEFAULT"]
        except KeyError:
            choices = [w.name for w in weights_enum]
            raise GraftError(f"'{tag}' is not a weights tag of {arch}: choose from {choices}") from None
        preprocessing = _torchvision_preprocessing(weights)
        use_download = pretrained and not weights_file
        try:
            model = torchvision.models.get_model(arch, weights=weights if use_download else None)
        except Exception as error:
            raise GraftError(
                f"no pretrained weights for '{name}' offline ({str(error).splitlines()[0][:80]}): pass --weights FILE "
                f"or place {weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints, "
                "or use --no-pretrained"
            ) from None
        source = f"torchvision:{weights}" if use_download else "random"
        if weights_file:
            state, _ = read_weights_file(weights_file)
            classifier = f"{family.classifier}."
            state = {k: v for k, v in state.items() if not k.startswith(classifier)}
            model.load_state_dict(state, strict=False)  # checked below: only the classifier may be missing
            expected = {k for k in model.state_dict() if not k.startswith(classifier)}
            if expected - set(state):
                raise GraftError(f"{weights_file}: trunk tensors missing (e.g. {sorted(expected - set(state))[0]})")
            source = f"file:{weights_file} sha256={file_sha256(Path(weights_file))[:16]}"
        return Backbone(name, TorchvisionNet(model, family), preprocessing, source)


def _torchvision_preprocessing(weights) -> Preprocessing:
    transform = weights.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return Preprocessing(
        (crop, crop), tuple(transform.mean), tuple(transform.std), transform.interpolation.value, crop / resize
    )
