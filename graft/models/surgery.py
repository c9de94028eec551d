"""Network surgery: reach any layer by name, cut there, freeze the right things, group parameters by stage.
Listing the nodes with their shapes and receptive fields is ``graft.models.inspection``.

A node is a module name as ``named_modules()`` spells it (``layer3``, ``blocks.4``, ``stages.2.blocks.0``), like
TensorFlow's ``get_tensor_by_name``. The cut uses a forward hook that stops the pass once the node's output exists,
so it works on every model, including those FX tracing cannot handle; modules after the cut are pruned. ``Capture``
is that hook-and-stop mechanism, shared by cuts, multi-node feature extraction and the torchvision adapter.
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.models.batchnorm import BATCH_NORMS
from graft.utils.modes import evaluating

__all__ = [
    "Capture", "DEFAULT_NODE", "GlobalPool", "NORM_TYPES", "StopForward", "Trunk", "cut", "first_tensor",
    "freeze_trunk", "keep_frozen_norms_eval", "modules_reached", "parse_nodes", "set_trainable", "stage_groups",
    "unfreeze_last"
]

DEFAULT_NODE = "pre_logits"  # the backbone's own pooled features: forward_head(forward_features(x), pre_logits=True)
NORM_TYPES = BATCH_NORMS


class StopForward(Exception):
    """Raised by a ``Capture`` once it holds every output it needs: the rest of the network is not needed.

    Plain (no arguments): TorchDynamo, which ``torch.export`` uses for a cut model, follows it through the hook. The
    capture that raised it marks itself, so nested captures (a cut inside the torchvision adapter, which captures its
    own feature map) each catch only their own stop and let the other travel on to its owner.
    """


def first_tensor(output):
    """A module's output as one tensor: the first element of a tuple or list (e.g. an attention block's)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Capture:
    """Outputs of named modules during a forward pass, stopping the pass once the last one needed has run.

    The hooks stay registered until ``remove`` (or the end of a ``with`` block); ``run`` calls a forward function
    with an empty record. A module reached several times keeps its first output, as a cut does.

    Args:
        net: the network whose modules are hooked.
        nodes: module names as ``named_modules()`` spells them.
        stop: stop the pass once every node has an output; False lets it finish (its result is wanted too).
        prepend: run before hooks already on the same module, so a cut stops before an adapter's own capture.
    """

    def __init__(self, net: nn.Module, nodes: list[str], stop: bool = True, prepend: bool = True):
        modules = dict(net.named_modules())
        self.nodes, self.stop = list(dict.fromkeys(nodes)), stop
        self.outputs: dict[str, Any] = {}
        self._stopped = False  # set by this capture's own hook just before it raises StopForward
        # bound methods (not closures), so a deep copy of the network records into the copy's own Capture
        self._handles = [modules[node].register_forward_hook(functools.partial(self._record, node), prepend=prepend)
                         for node in self.nodes]

    def _record(self, node: str, module, inputs, output) -> None:
        self.outputs.setdefault(node, output)
        if self.stop and len(self.outputs) == len(self.nodes):
            self._stopped = True
            raise StopForward

    def run(self, forward: Callable, *args) -> tuple[Any, dict[str, Any]]:
        """Calls ``forward(*args)``; returns (its result, or None when the pass was stopped; {node: raw output})."""
        self.outputs, self._stopped = {}, False
        try:
            result = forward(*args)
        except StopForward:
            if not self._stopped:
                raise  # another capture's stop (an enclosing cut): its owner catches it
            result = None
        outputs, self.outputs = self.outputs, {}
        return result, outputs

    def __getstate__(self) -> dict:
        # a copy's hooks are the copied network's (copied with it); the handles would point at the original's
        return {**self.__dict__, "_handles": []}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class GlobalPool(nn.Module):
    """Global pooling of a feature map (NCHW or NHWC) or token sequence (NLC): ``avg`` or ``avgmax`` (concatenated)."""

    def __init__(self, kind: str = "avg", channels_last_layout: bool = False):
        super().__init__()
        self.kind = kind
        self.channels_last_layout = channels_last_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.flatten(1, 2) if self.channels_last_layout else x.flatten(2).transpose(1, 2)  # → (N, L, C)
        elif x.ndim == 2:
            return x
        pooled = x.mean(dim=1)
        return torch.cat([pooled, x.amax(dim=1)], dim=1) if self.kind == "avgmax" else pooled


class Trunk(nn.Module):
    """A backbone cut at a named node (or several), returning one pooled feature vector per image.

    Several nodes (``blocks.4,blocks.6,pre_logits``) give the concatenation of their pooled features in the order
    listed, from one forward pass (one ``Capture``; it stops after the last named node unless ``pre_logits`` is
    listed): the lecture's "linear classifier from different stages" for data far from the pretraining domain.

    Args:
        net: a backbone honouring timm's contract, classifier removed.
        node: a module name, ``pre_logits`` for the backbone's own pooled features, or a comma-separated list.
        pool: ``avg`` or ``avgmax``.
    """

    def __init__(self, net: nn.Module, node: str = DEFAULT_NODE, pool: str = "avg"):
        super().__init__()
        self.net = net
        self.nodes = parse_nodes(net, node)
        self.node = ",".join(self.nodes)
        self.pool_kind = pool
        self._capture: Capture | None = None
        if DEFAULT_NODE in self.nodes and pool != "avg":
            self._set_model_pool(pool)
        named = [n for n in self.nodes if n != DEFAULT_NODE]
        if named:  # prepended: before any adapter's own stop
            self._capture = Capture(net, named, stop=DEFAULT_NODE not in self.nodes)
        self.pool = nn.Identity() if not named else GlobalPool(
            pool, channels_last_layout=getattr(net, "output_fmt", "NCHW") == "NHWC")

    def _set_model_pool(self, pool: str) -> None:
        try:
            self.net.reset_classifier(0, global_pool="catavgmax")
        except Exception:
            raise GraftError(f"this backbone's own head cannot pool '{pool}'; cut at a named node to use it") from None

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, Any]]:
        if self._capture is None:
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True), {}
        pooled, outputs = self._capture.run(lambda images: self.net.forward_head(self.net.forward_features(images),
                                                                                   pre_logits=True), x)
        missing = [n for n in self.nodes if n != DEFAULT_NODE and n not in outputs]
        if missing:
            raise GraftError(f"node '{missing[0]}' is not reached by the backbone's forward pass; choose another")
        return pooled, outputs

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The node's raw output (before pooling); a multi-node cut has no single map."""
        if len(self.nodes) > 1:
            raise GraftError(f"cut at several nodes ({self.node}): there is no one feature map; cut at one node")
        pooled, outputs = self._outputs(x)
        return pooled if self.node == DEFAULT_NODE else first_tensor(outputs[self.node])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, outputs = self._outputs(x)
        parts = [pooled if n == DEFAULT_NODE else self.pool(first_tensor(outputs[n])) for n in self.nodes]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def parse_nodes(net: nn.Module, spec: str) -> list[str]:
    """``blocks.4,blocks.6,pre_logits`` → the node names, each checked against the backbone's modules.

    Raises:
        GraftError: for an unknown node (naming the closest real ones), an empty name or a node listed twice.
    """
    nodes = [part.strip() for part in str(spec).split(",")]
    modules = [name for name, _ in net.named_modules() if name]
    known = set(modules)
    for node in nodes:
        if node != DEFAULT_NODE and node not in known:
            near = difflib.get_close_matches(node, [*modules, DEFAULT_NODE], n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise GraftError(f"no node '{node:.60}' in this backbone (--cut-at); {hint}list the names with "
                             "`graft layers BACKBONE`")
    twice = [node for node in dict.fromkeys(nodes) if nodes.count(node) > 1]
    if twice:
        raise GraftError(f"--cut-at lists node '{twice[0]}' twice; name each node once")
    return nodes


def cut(net: nn.Module, node: str | None = None, pool: str = "avg", input_size=(224, 224)) -> tuple[Trunk, int]:
    """Cuts ``net`` at ``node`` (None: the default feature node), prunes what runs after it, returns (trunk, width).

    The width comes from one dry forward pass in eval mode (no running statistics are touched).
    """
    trunk = Trunk(net, node or DEFAULT_NODE, pool)
    called = _modules_called(trunk, input_size)
    if DEFAULT_NODE not in trunk.nodes:
        _prune_unused(net, called)
    with evaluating(trunk), torch.no_grad():
        width = trunk(torch.zeros(1, 3, *input_size)).shape[1]
    return trunk, int(width)


def modules_reached(net: nn.Module, forward: Callable[[], Any],
                    nodes: list[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Runs ``forward()`` (a pass through ``net``, possibly wrapped) and returns (the names of every module of ``net``
    it reached, {node: the modules reached before that node's output existed}) — what a node's output depends on."""
    modules = dict(net.named_modules())
    order: list[str] = []
    ends: dict[str, int] = {}

    def end(node: str) -> None:  # a hook's return value would replace the module's output: return nothing
        ends.setdefault(node, len(order))

    handles = [module.register_forward_pre_hook(lambda m, i, name=name: order.append(name))
               for name, module in modules.items() if name]
    # prepended after any capture's own hook, so it runs before that capture stops the pass
    handles += [modules[node].register_forward_hook(lambda m, i, o, node=node: end(node), prepend=True)
                for node in nodes]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return set(order), {node: set(order[:ends[node]]) for node in nodes if node in ends}


def _modules_called(trunk: Trunk, input_size) -> set[str]:
    with evaluating(trunk), torch.no_grad():
        return modules_reached(trunk.net, lambda: trunk(torch.zeros(1, 3, *input_size)), [])[0]


def _prune_unused(net: nn.Module, called: set[str]) -> None:
    """Replaces the largest modules never reached before the cut with Identity (they would be dead weight)."""
    for name, _ in list(net.named_modules()):
        if not name or name in called or any(c.startswith(name + ".") for c in called):
            continue
        parent_name, _, child = name.rpartition(".")
        if parent_name and parent_name not in called:
            continue  # its parent is pruned as a whole
        parent = net.get_submodule(parent_name) if parent_name else net
        if isinstance(parent, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) or hasattr(parent, child):
            try:
                setattr(parent, child, nn.Identity())
            except (TypeError, AttributeError):
                pass


# ------------------------------------------------------------------------------------------------------------- freezing


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


def freeze_trunk(trunk: nn.Module) -> None:
    """Freezes every trunk parameter; its batch-norm layers then stay in eval mode (see ``keep_frozen_norms_eval``)."""
    set_trainable(trunk, False)


def keep_frozen_norms_eval(module: nn.Module, every_norm: bool = False) -> int:
    """Puts batch-norm layers whose parameters are all frozen (or, with ``every_norm``, all of them) into eval mode;
    returns how many. Their affine weights may still train; their running statistics no longer move.

    The classic transfer-learning bug: ``model.train()`` switches frozen BN layers back to batch statistics, so
    their running mean/var drift on the new data although their weights are frozen (Keras sets trainable=False BN to
    inference mode for the same reason). Call after every ``train()``; ``GraftModel.train`` does.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, NORM_TYPES):
            params = list(layer.parameters(recurse=False))
            if every_norm or (params and not any(p.requires_grad for p in params)):
                layer.eval()
                count += 1
    return count


# --------------------------------------------------------------------------------------------------------------- stages


def stage_groups(net: nn.Module) -> list[list[str]]:
    """Parameter names grouped by stage, stem first, using the backbone's ``group_matcher(coarse=True)`` regexes."""
    from timm.models import group_parameters

    named = dict(net.named_parameters())
    if not named:
        return []
    matcher = net.group_matcher(coarse=True) if hasattr(net, "group_matcher") else {"blocks": r"^(.*)$"}
    grouped = group_parameters(net, matcher)
    groups = [names for _, names in sorted(grouped.items(), key=lambda item: item[0])]
    assigned = {n for g in groups for n in g}
    leftovers = [n for n in named if n not in assigned]  # parameters no regex claims go with the top stage
    if leftovers:
        groups.append(leftovers)
    return [g for g in groups if g]


def unfreeze_last(trunk: Trunk, stages: int | None) -> list[list[str]]:
    """Makes the last ``stages`` stage groups trainable (None: all); returns the trainable groups, stem first."""
    groups = stage_groups(trunk.net)
    chosen = groups if stages is None else groups[-stages:]
    params = dict(trunk.net.named_parameters())
    for group in chosen:
        for name in group:
            params[name].requires_grad_(True)
    return chosen
