"""Grad-CAM maps: Captum's ``LayerGradCam`` on the cut node's feature map, at the network's input size. ViT-style
token trunks have their prefix tokens set aside and their patch tokens reshaped to the H x W grid (or are read at the
last block's input when the trunk pools its class token). Placing a map back onto the image is
``graft.evaluation.explain``'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.models.surgery import DEFAULT_NODE
from graft.utils.modes import evaluating

__all__ = ["grad_cam", "layer_grad_cam"]


def layer_grad_cam():
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        raise GraftError("Grad-CAM explanations need Captum: pip install 'graft[explain]'") from None
    return LayerGradCam


class _Grid(nn.Module):
    """The feature map as (N, C, H, W), Captum's layout; ``back`` restores the network's own layout around it."""

    def __init__(self, layout: str, prefix: int = 0, grid: tuple[int, int] = (0, 0)):
        super().__init__()
        self.layout, self.prefix, self.grid = layout, prefix, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NLC":
            patches = x[:, self.prefix:]
            return patches.transpose(1, 2).reshape(len(x), x.shape[2], *self.grid)
        return x.permute(0, 3, 1, 2) if self.layout == "NHWC" else x

    def back(self, grid: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        if self.layout == "NLC":
            return torch.cat([original[:, :self.prefix], grid.flatten(2).transpose(1, 2)], dim=1)
        return grid.permute(0, 2, 3, 1) if self.layout == "NHWC" else grid

    def through(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self(x), x)


def _token_grid(tokens: int, prefix: int, input_size) -> tuple[int, int]:
    patches = tokens - prefix
    rows = round(math.sqrt(patches * input_size[0] / input_size[1]))
    if rows < 1 or patches % rows:
        raise GraftError(f"Grad-CAM: {patches} patch tokens do not form a grid for a {input_size[0]}x{input_size[1]} "
                         "input; this trunk's tokens cannot be mapped back to the image")
    return rows, patches // rows


class _CamNet(nn.Module):
    """The grafted model's logits with the target feature map passing through ``self.grid``, the layer Captum hooks."""

    def __init__(self, model: GraftModel):
        super().__init__()
        self.model, self.trunk, self.net = model, model.trunk, model.trunk.net
        self._handle = None
        size = model.preprocessing.input_size
        with torch.no_grad():
            probe = self._feature_map(torch.zeros(1, 3, *size))
        if probe.ndim == 2:
            raise GraftError(f"Grad-CAM needs a spatial feature map, but this trunk (cut at '{self.trunk.node}') gives "
                             "a pooled vector; explain a run cut at a stage node (see `graft layers BACKBONE`)")
        if probe.ndim == 4:
            self.grid = _Grid("NHWC" if getattr(self.net, "output_fmt", "NCHW") == "NHWC" else "NCHW")
            return
        prefix = int(getattr(self.net, "num_prefix_tokens", 0))
        self.grid = _Grid("NLC", prefix, _token_grid(probe.shape[1], prefix, size))
        if self.trunk.node == DEFAULT_NODE and prefix and getattr(self.net, "global_pool", "") in ("token", "map"):
            self._hook_last_block_input()

    def _hook_last_block_input(self) -> None:
        info = getattr(self.net, "feature_info", None) or []
        modules = dict(self.net.named_modules())
        last = info[-1].get("module") if info and isinstance(info[-1], dict) else None
        if last not in modules:
            raise GraftError("Grad-CAM: this token trunk pools its class token and names no last block to explain "
                             "at; cut at a block (see `graft layers BACKBONE`)")
        self._handle = modules[last].register_forward_pre_hook(lambda module, args: (self.grid.through(args[0]),
                                                                                     *args[1:]))

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.trunk.node == DEFAULT_NODE:
            return self.net.forward_features(x)
        return self.trunk.feature_map(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._feature_map(x)
        if self._handle is None:
            features = self.grid.through(features)
        if self.trunk.node == DEFAULT_NODE:
            pooled = self.net.forward_head(features, pre_logits=True)
        else:
            pooled = self.trunk.pool(features)
        return self.model.head(pooled)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def grad_cam(model: GraftModel, images: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) at the input size, each scaled to [0, 1] (all zeros where nothing is positive).

    Args:
        model: a trained model; it is used in eval mode and left as it was.
        images: preprocessed inputs (N, 3, H, W) on the model's device.
        targets: the class index each map is for.
    """
    gradcam = layer_grad_cam()
    with evaluating(model):
        camnet = _CamNet(model)
        try:
            with torch.enable_grad():
                maps = gradcam(camnet, camnet.grid).attribute(images, target=list(targets), relu_attributions=True)
        finally:
            camnet.close()
    maps = F.interpolate(maps.detach().float(), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    maps = maps[:, 0].clamp_min(0)
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (maps / peak).cpu()
