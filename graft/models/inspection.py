"""Inspecting a backbone's nodes for `graft layers` and diagnose: each named module's output shape, parameters and
receptive field (computed from the graph, not from a table)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from graft.models.surgery import NORM_TYPES, Capture, first_tensor
from graft.utils.modes import evaluating

__all__ = ["NodeInfo", "list_nodes", "receptive_fields"]


@dataclass
class NodeInfo:
    """A named node of a backbone as `graft layers` shows it."""

    name: str
    kind: str  # module class name
    shape: tuple[int, ...]  # output shape for one image (C, H, W) or (L, C)
    params: int  # parameters inside the module
    stage: bool  # a stage node (timm feature_info)
    receptive_field: str = ""  # e.g. "7" or ">=224" when it reaches the image border


def list_nodes(net: nn.Module, input_size=(224, 224), stages_only: bool = True, stage_nodes=()) -> list[NodeInfo]:
    """Every named module reached by the forward pass (or only the stage nodes), with output shape.

    Receptive fields are computed for stage nodes only (one backward pass each).
    """
    modules = dict(net.named_modules())
    wanted = [n for n in modules if n and (not stages_only or n in stage_nodes)]
    with evaluating(net), torch.no_grad(), Capture(net, wanted, stop=False) as capture:
        _, outputs = capture.run(_pre_logits, net, torch.zeros(1, 3, *input_size))
    fields = receptive_fields(net, [n for n in wanted if n in outputs and n in stage_nodes], input_size)
    nodes = []
    for name in wanted:
        if name not in outputs:
            continue
        out = first_tensor(outputs[name])
        if not isinstance(out, torch.Tensor):
            continue
        params = sum(p.numel() for p in modules[name].parameters())
        nodes.append(NodeInfo(name, type(modules[name]).__name__, tuple(out.shape[1:]), params, name in stage_nodes,
                              fields.get(name, "")))
    return nodes


def _pre_logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(images), pre_logits=True)


def receptive_fields(net: nn.Module, nodes: list[str], input_size=(224, 224)) -> dict[str, str]:
    """The receptive field (in input pixels, along the height) of each node's centre unit.

    Computed from the graph by back-propagating from the centre output unit to the input through a copy of the
    network with positive weights and average- instead of max-pooling (so no path is silently blocked); the extent
    of the non-zero input gradient is the receptive field. Three stacked 3x3 stride-1 convs give 7, as the lecture's
    arithmetic does. A field that reaches the image border is shown as ">=SIZE".
    """
    if not nodes:
        return {}
    probe = copy.deepcopy(net).float().eval()
    _make_positive(probe)
    image = torch.ones(1, 3, *input_size, requires_grad=True)
    with Capture(probe, nodes, stop=False) as capture:
        _, outputs = capture.run(_pre_logits, probe, image)
    fields = {}
    for name in nodes:
        out = first_tensor(outputs[name])
        if out.ndim != 4 or getattr(net, "output_fmt", "NCHW") != "NCHW":
            fields[name] = "global" if out.ndim == 3 else ""
            continue
        centre = out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum()
        (grad,) = torch.autograd.grad(centre, image, retain_graph=True)
        rows = grad[0].abs().sum(dim=(0, 2)).nonzero().flatten()
        if rows.numel() == 0:
            fields[name] = ""
            continue
        extent = int(rows.max() - rows.min() + 1)
        touches = rows.min() == 0 or rows.max() == input_size[0] - 1
        fields[name] = f">={extent}" if touches else str(extent)
    return fields


def _make_positive(net: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module_name, module in list(net.named_modules()):
        if isinstance(module, nn.MaxPool2d):
            parent_name, _, child = module_name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, nn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, NORM_TYPES) and module.running_var is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        for name, parameter in net.named_parameters():
            if parameter.ndim > 1:
                fan_in = parameter[0].numel()
                parameter.copy_((torch.rand(parameter.shape, generator=generator) + 0.5) / fan_in)
            elif re.search(r"(bias|beta)$", name):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
