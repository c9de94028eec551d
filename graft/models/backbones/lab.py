"""The lecture's from-scratch networks as registered backbones, with its building blocks as options.

- ``small-cnn-cifar``: conv3×3/32 → conv3×3/32 + maxpool2 → conv3×3/64 → conv3×3/64 (no padding) + maxpool2 →
  FC 512 (32×32 input: 32×32×32, 32×32×32, 16×16×32, 16×16×64, 14×14×64, 7×7×64).
- ``small-cnn-catsdogs``: three unpadded conv3×3 (32, 32, 64), each followed by maxpool2 → FC 64 (150×150 input:
  148→74×74×32, 72→36×36×32, 34→17×17×64). ``--head sigmoid`` gives its single-logit output for two classes.
- ``vgg-like``: stages of stacked, padded 3×3 convs, each stage ending in maxpool2 (``--vgg-stages 2x32,2x64``),
  then global average pooling: the VGG idea, for receptive-field experiments.

Options for all three (``ArchOptions``): activation, normalisation (conv bias dropped before a norm, as the lecture
notes), weight initialisation. They honour timm's contract (``forward_features``, ``forward_head(pre_logits=True)``,
``num_features``, ``group_matcher``, ``feature_info``), so every strategy, cut and diagnostic works on them.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from graft.config import ArchOptions, parse_init, parse_vgg_stages
from graft.errors import GraftError

__all__ = [
    "ARCHITECTURES", "BUILDERS", "LabNet", "LabSource", "Maxout", "PREFIX", "conv_block", "create_activation",
    "create_lab_net", "create_norm", "dense_block", "initialise", "lab_backbone_name", "parse_lab_name",
    "small_cnn_catsdogs", "small_cnn_cifar", "vgg_like"
]

ARCHITECTURES = ("small-cnn-cifar", "small-cnn-catsdogs", "vgg-like")


class Maxout(nn.Module):
    """Maximum over ``pieces`` consecutive channels (Goodfellow et al.): the layer before makes pieces× channels."""

    def __init__(self, pieces: int = 2):
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return x.reshape(shape[0], shape[1] // self.pieces, self.pieces, *shape[2:]).amax(dim=2)


def create_activation(name: str, channels: int) -> nn.Module:
    factories = {
        "relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(0.01), "prelu": lambda: nn.PReLU(channels),
        "elu": lambda: nn.ELU(), "selu": lambda: nn.SELU(), "gelu": lambda: nn.GELU(), "swish": lambda: nn.SiLU(),
        "maxout": lambda: Maxout(2), "tanh": lambda: nn.Tanh(), "sigmoid": lambda: nn.Sigmoid(),
    }
    return factories[name]()


def create_norm(name: str, channels: int, spatial: bool = True) -> nn.Module:
    """A normalisation layer; for a fully connected layer only batch and layer norm apply (else nothing)."""
    if not spatial:
        return {"batch": lambda: nn.BatchNorm1d(channels), "layer": lambda: nn.LayerNorm(channels)}.get(
            name, nn.Identity)()
    groups = math.gcd(channels, 8)  # group norm: 8 groups where the width allows
    return {
        "batch": lambda: nn.BatchNorm2d(channels),
        "layer": lambda: nn.GroupNorm(1, channels),  # one group = layer norm over (C, H, W)
        "instance": lambda: nn.InstanceNorm2d(channels, affine=True),
        "group": lambda: nn.GroupNorm(groups, channels),
        "none": nn.Identity,
    }[name]()


def conv_block(in_channels: int, out_channels: int, options: ArchOptions, padding: int = 1) -> nn.Sequential:
    """conv3×3 → norm → activation; the conv has no bias before a norm (the norm's shift replaces it)."""
    pieces = 2 if options.activation == "maxout" else 1
    width = out_channels * pieces
    conv = nn.Conv2d(in_channels, width, 3, padding=padding, bias=options.norm == "none")
    return nn.Sequential(OrderedDict(conv=conv, norm=create_norm(options.norm, width),
                                     act=create_activation(options.activation, width)))


def dense_block(in_features: int, out_features: int, options: ArchOptions) -> nn.Sequential:
    pieces = 2 if options.activation == "maxout" else 1
    width = out_features * pieces
    norm = create_norm(options.norm, width, spatial=False)
    linear = nn.Linear(in_features, width, bias=isinstance(norm, nn.Identity))
    return nn.Sequential(OrderedDict(fc=linear, norm=norm, act=create_activation(options.activation, width)))


_GAINS = {"relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid", "selu": "selu",
          "prelu": "leaky_relu", "gelu": "relu", "swish": "relu", "elu": "relu", "maxout": "linear"}


def initialise(net: nn.Module, init: str, activation: str) -> None:
    """Kaiming (fan-in, the activation's gain), Xavier (Glorot, the activation's gain) or N(0, σ²) for every conv and
    linear weight; biases zero; norm layers at identity."""
    scheme, std = parse_init(init)
    nonlinearity = _GAINS[activation]
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming":
                if nonlinearity == "selu":  # LeCun normal, what SELU's self-normalisation assumes
                    nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                else:
                    nn.init.kaiming_normal_(module.weight, a=0.01 if nonlinearity == "leaky_relu" else 0,
                                            nonlinearity=nonlinearity if nonlinearity != "sigmoid" else "linear")
            elif scheme == "xavier":
                gain = nn.init.calculate_gain(nonlinearity, 0.01) if nonlinearity != "selu" else 0.75
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------------------ networks


class LabNet(nn.Module):
    """``features`` (named conv blocks and pools) then ``pre_logits`` (flatten + FC, or global average pooling).

    Honours timm's contract: ``forward_features``, ``forward_head(x, pre_logits=True)``, ``num_features``,
    ``group_matcher`` and ``feature_info`` (the pools are the stages).
    """

    def __init__(self, features: nn.Sequential, pre_logits: nn.Module, num_features: int, stage_regex: str):
        super().__init__()
        self.features = features
        self.pre_logits = pre_logits
        self.num_features = num_features
        self._stage_regex = stage_regex
        self.feature_info = [{"module": f"features.{name}"} for name, _ in features.named_children()
                             if name.startswith(("pool", "stage"))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.pre_logits(x)  # graft grafts its own classifier: the head here ends at the pre-logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^features\.(?:conv1|stage1)\.", "blocks": self._stage_regex}

    def reset_classifier(self, num_classes: int = 0, global_pool: str | None = None) -> None:
        if num_classes or global_pool not in (None, "avg"):
            raise GraftError("lab networks end at their pre-logits features; graft adds the classifier")


def _flatten_head(channels: int, grid: int, width: int, options: ArchOptions) -> nn.Sequential:
    """Flatten → FC → activation, behind an adaptive pool that is the identity at the lecture's input size and keeps
    the FC's size at any other."""
    return nn.Sequential(OrderedDict(grid=nn.AdaptiveAvgPool2d(grid), flatten=nn.Flatten(),
                                     fc=dense_block(channels * grid * grid, width, options)))


def small_cnn_cifar(options: ArchOptions) -> LabNet:
    features = nn.Sequential(OrderedDict(
        conv1=conv_block(3, 32, options), conv2=conv_block(32, 32, options), pool1=nn.MaxPool2d(2),
        conv3=conv_block(32, 64, options), conv4=conv_block(64, 64, options, padding=0), pool2=nn.MaxPool2d(2),
    ))
    return LabNet(features, _flatten_head(64, 7, 512, options), 512, r"^features\.conv(\d+)")


def small_cnn_catsdogs(options: ArchOptions) -> LabNet:
    features = nn.Sequential(OrderedDict(
        conv1=conv_block(3, 32, options, padding=0), pool1=nn.MaxPool2d(2),
        conv2=conv_block(32, 32, options, padding=0), pool2=nn.MaxPool2d(2),
        conv3=conv_block(32, 64, options, padding=0), pool3=nn.MaxPool2d(2),
    ))
    return LabNet(features, _flatten_head(64, 17, 64, options), 64, r"^features\.conv(\d+)")


def vgg_like(options: ArchOptions) -> LabNet:
    stages, channels = OrderedDict(), 3
    for index, (convs, width) in enumerate(parse_vgg_stages(options.vgg_stages), start=1):
        blocks = OrderedDict()
        for conv in range(1, convs + 1):
            blocks[f"conv{conv}"] = conv_block(channels, width, options)
            channels = width
        blocks["pool"] = nn.MaxPool2d(2)
        stages[f"stage{index}"] = nn.Sequential(blocks)
    pre_logits = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    return LabNet(nn.Sequential(stages), pre_logits, channels, r"^features\.stage(\d+)")


BUILDERS = {"small-cnn-cifar": (small_cnn_cifar, 32), "small-cnn-catsdogs": (small_cnn_catsdogs, 150),
            "vgg-like": (vgg_like, 64)}


def create_lab_net(name: str, options: ArchOptions) -> tuple[LabNet, int]:
    """(network, its native input size), initialised as ``options.init`` says."""
    options.validate()
    builder, size = BUILDERS[name]
    net = builder(options)
    initialise(net, options.init, options.activation)
    return net, size


# --------------------------------------------------------------------------------------------------------------- source

PREFIX = "lab"


def lab_backbone_name(base: str, options: ArchOptions) -> str:
    """The full backbone name a run records: ``lab:vgg-like?activation=gelu&norm=batch&init=kaiming&stages=2x32``,
    so ``graft.load`` rebuilds the same architecture from graft.json alone."""
    return (f"{PREFIX}:{base}?activation={options.activation}&norm={options.norm}&init={options.init}"
            f"&stages={options.vgg_stages}")


def parse_lab_name(name: str) -> tuple[str, ArchOptions]:
    base, _, query = name.partition("?")
    values = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    unknown = set(values) - {"activation", "norm", "init", "stages"}
    if base not in BUILDERS or unknown:
        raise GraftError(f"unknown lab network '{name}': choose one of {', '.join(ARCHITECTURES)}")
    defaults = ArchOptions()
    return base, ArchOptions(values.get("activation", defaults.activation), values.get("norm", defaults.norm),
                             values.get("init", defaults.init), values.get("stages", defaults.vgg_stages))


class LabSource:
    """The lecture's networks (``small-cnn-cifar``, ``small-cnn-catsdogs``, ``vgg-like``): random initialisation,
    or a trunk saved by an earlier graft run (``--weights``)."""

    def create(self, name: str, pretrained: bool, weights_file: str | None):
        from graft.models.backbones.base import Backbone, Preprocessing, load_trunk_weights, read_weights_file

        base, options = parse_lab_name(name)
        net, size = create_lab_net(base, options)
        # mean/std 0.5 until the data's own statistics replace them (scratch training computes them, see graft stats)
        preprocessing = Preprocessing((size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0)
        if weights_file:
            state, metadata = read_weights_file(weights_file)
            load_trunk_weights(net, state, weights_file)
            if "graft.preprocessing" in metadata:
                import json

                try:
                    preprocessing = Preprocessing.from_dict(json.loads(metadata["graft.preprocessing"]))
                except (KeyError, TypeError, ValueError) as error:
                    raise GraftError(f"{weights_file}: its graft.preprocessing metadata is invalid ({error!s:.120}); "
                                     "export the weights again") from None
            return Backbone(f"{PREFIX}:{name}", net, preprocessing, f"file:{weights_file}")
        if pretrained:
            raise GraftError(f"'{base}' has no pretrained weights: train it with --strategy scratch (or "
                             "--no-pretrained), or pass --weights FILE from an earlier run")
        return Backbone(f"{PREFIX}:{name}", net, preprocessing, "random")
