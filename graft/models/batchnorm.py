"""Batch norm at test time, as the lecture has it: fold it into the preceding conv/linear layer ("zero overhead at
test time"), and recompute its statistics over the whole training set after training ("precise BN").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from graft.utils.modes import evaluating

__all__ = [
    "BATCH_NORMS", "FOLDABLE", "FoldResult", "batch_norms", "find_foldable_pairs", "fold_batch_norms",
    "max_logit_difference", "recompute_statistics"
]

# torch's batch norms (timm's BatchNormAct2d, SyncBatchNormAct and SplitBatchNorm2d subclass them), named through the
# public API rather than torch's private base class _BatchNorm; quantized batch norms (torch.ao) are left out on purpose
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d,
               nn.LazyBatchNorm3d)
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weights with output channels first (not transposed convs)


@dataclass
class FoldResult:
    """What ``fold_batch_norms`` did: the folded pairs (producer, batch norm) and those left alone, with why."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (batch-norm name, reason)

    @property
    def count(self) -> int:
        return len(self.folded)


def find_foldable_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], list[tuple]]:
    """(producer, batch norm) pairs where the batch norm's input *is* the conv/linear output, found by running
    ``example`` through the model with hooks (so any architecture works, traceable or not).

    Returns:
        The pairs, and (batch norm, reason) for the batch norms that cannot be folded.
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    norm_inputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, FOLDABLE):
            handles.append(module.register_forward_hook(
                # the tensor itself is kept too, so no id is reused by a later tensor
                lambda m, i, o, name=name: outputs.__setitem__(id(o), (name, o))))
        elif isinstance(module, BATCH_NORMS):
            handles.append(module.register_forward_pre_hook(
                lambda m, i, name=name: norm_inputs.append((name, i[0]))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    pairs, skipped, seen = [], [], set()
    for norm_name, tensor in norm_inputs:
        if norm_name in seen:
            continue
        seen.add(norm_name)
        producer = outputs.get(id(tensor))
        if producer is None or producer[1] is not tensor:
            skipped.append((norm_name, "its input is not a conv/linear output (pre-activation or after a sum)"))
        else:
            pairs.append((producer[0], norm_name))
    return pairs, skipped


def _fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Rewrites ``layer``'s weight and bias so ``layer(x)`` equals ``norm(layer(x))`` with the running statistics."""
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.affine:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale + (norm.bias.double() if norm.affine else 0.0)
        weight = layer.weight.double() * scale.reshape(-1, *([1] * (layer.weight.ndim - 1)))
        bias = (layer.bias.double() * scale if layer.bias is not None else 0.0) + shift
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:  # bias-free convs before a norm (the usual case) gain one
            layer.bias = nn.Parameter(layer.weight.new_zeros(layer.weight.shape[0]))
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _without_norm(norm: nn.Module) -> nn.Module:
    """What replaces a folded batch norm: nothing, or the activation (and dropout) a fused norm+act layer applied
    after normalising (timm's ``BatchNormAct2d``)."""
    after = [getattr(norm, name) for name in ("drop", "act") if isinstance(getattr(norm, name, None), nn.Module)]
    return nn.Sequential(*after) if after else nn.Identity()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def max_logit_difference(first: nn.Module, second: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return (first(inputs).float() - second(inputs).float()).abs().max().item()


def fold_batch_norms(model: nn.Module, inputs: torch.Tensor, tolerance: float = 1e-4) -> tuple[nn.Module, FoldResult]:
    """A copy of ``model`` (in eval mode) with every batch norm that directly follows a conv/linear folded into it.

    Each pair is verified on ``inputs``: if folding everything moves any logit by more than ``tolerance`` (a producer
    whose output also feeds something besides its batch norm), pairs are folded one at a time and only those that
    keep the logits are kept.

    Returns:
        The folded copy and what was folded or skipped.
    """
    reference = copy.deepcopy(model).eval()
    pairs, skipped = find_foldable_pairs(reference, inputs[:1])
    candidate = _apply(reference, pairs)
    if max_logit_difference(reference, candidate, inputs) <= tolerance:
        return candidate, FoldResult(pairs, skipped)
    kept, current = [], reference
    for pair in pairs:  # slow path: only for unusual graphs
        trial = _apply(current, [pair])
        if max_logit_difference(reference, trial, inputs) <= tolerance:
            kept.append(pair)
            current = trial
        else:
            skipped.append((pair[1], f"folding into {pair[0]} changed the logits (its output is used elsewhere)"))
    return current, FoldResult(kept, skipped)


def _apply(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    folded = copy.deepcopy(model)
    for producer, norm_name in pairs:
        norm = folded.get_submodule(norm_name)
        _fold_into(folded.get_submodule(producer), norm)
        _replace(folded, norm_name, _without_norm(norm))
    return folded.eval()


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]


@torch.no_grad()
def recompute_statistics(model: nn.Module, loader, device: torch.device, channels_last: bool = False) -> int:
    """Precise BN: replaces every batch norm's running mean and variance by their average over ``loader`` (the
    whole training set in evaluation preprocessing), instead of the exponential average of the last batches.

    Everything else stays in eval mode (no dropout). Returns the number of images seen.
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    seen = 0
    with evaluating(model):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the batches
            norm.train()
        try:
            for images, *_ in loader:
                images = images.to(device)
                model(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
                seen += len(images)
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
    return seen
