"""Why does a network train badly? The lecture's diagnostics as functions (and `graft diagnose`, `graft lr-find`,
`graft stats`):

- activation statistics per layer for one batch: mean, std, the fraction of dead ReLU units and of saturated
  tanh/sigmoid outputs, with per-layer histograms ("collapse to zero / saturate / just right");
- gradient flow for one optimiser step: per-layer gradient norm and the update/weight ratio (~1e-3 is healthy);
- the learning-rate finder: an exponential LR sweep, the loss curve and a suggested rate;
- dataset statistics: per-channel mean and std and the mean image, what scratch training normalises with.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import GraftError
from graft.models.backbones.lab import Maxout
from graft.utils.modes import evaluating
from graft.utils.plotting import plots_skipped, pyplot, save_figure

__all__ = [
    "ACTIVATION_TYPES", "COLLAPSE_RATIO", "DEAD_FLAG", "Diagnosis", "LayerActivity", "LayerGradient", "RELU_LIKE",
    "SATURATED_FLAG", "SQUASHING", "UPDATE_RATIO_RANGE", "activation_statistics", "diagnose", "gradient_flow",
    "plot_activations"
]

RELU_LIKE = (nn.ReLU, nn.ReLU6)  # exact zeros: a unit that is always zero is dead
SQUASHING = {nn.Tanh: (-0.99, 0.99), nn.Sigmoid: (0.01, 0.99), nn.Hardtanh: (-0.99, 0.99)}  # saturated outside
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                    nn.Hardtanh, nn.Hardswish, nn.Mish, Maxout)
DEAD_FLAG = 0.5  # flag a layer when more than half its units never fire
SATURATED_FLAG = 0.25  # a quarter of outputs in the flat tails already starves the gradient
COLLAPSE_RATIO = 0.1  # std below a tenth of the first activation layer's: collapsing towards zero
UPDATE_RATIO_RANGE = (1e-4, 1e-2)  # around the rule of thumb of 1e-3


@dataclass
class LayerActivity:
    name: str
    kind: str
    mean: float
    std: float
    dead: float | None  # fraction of channels (units) that are zero for every image and position; ReLU only
    saturated: float | None  # fraction of outputs in the flat tails; tanh/sigmoid only
    flags: list[str] = field(default_factory=list)
    sample: np.ndarray | None = None  # a subsample of the values, for the histogram


def activation_statistics(model: nn.Module, images: torch.Tensor, sample: int = 20_000) -> list[LayerActivity]:
    """Statistics of every activation layer's output for one batch, in forward order, with flags."""
    captured: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda m, i, o, name=name: captured.append((name, m, o.detach())))
               for name, module in model.named_modules() if isinstance(module, ACTIVATION_TYPES)]
    try:
        with evaluating(model), torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise GraftError("no activation layers (ReLU, tanh, ...) found as modules in this network")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, module, output in captured:
        values = output.float()
        flat = values.flatten()
        dead = None
        if isinstance(module, RELU_LIKE) and values.ndim >= 2:
            per_unit = values.transpose(0, 1).reshape(values.shape[1], -1)
            dead = (per_unit.abs().amax(dim=1) == 0).float().mean().item()
        saturated = None
        for kind, (low, high) in SQUASHING.items():
            if isinstance(module, kind):
                saturated = ((flat < low) | (flat > high)).float().mean().item()
        picks = torch.randperm(flat.numel(), generator=generator)[:sample]
        rows.append(LayerActivity(name, type(module).__name__, flat.mean().item(), flat.std().item(), dead, saturated,
                                  sample=flat[picks].numpy()))
    _flag_activity(rows)
    return rows


def _flag_activity(rows: list[LayerActivity]) -> None:
    reference = rows[0].std or 1e-12
    for row in rows:
        if row.dead is not None and row.dead > DEAD_FLAG:
            row.flags.append(f"dead: {row.dead:.0%} of units never fire")
        if row.saturated is not None and row.saturated > SATURATED_FLAG:
            row.flags.append(f"saturated: {row.saturated:.0%} of outputs in the flat tails")
        if row.std < COLLAPSE_RATIO * reference:
            row.flags.append(f"collapsing: std {row.std:.2e} vs {reference:.2e} at the first layer")
        elif row.std > reference / COLLAPSE_RATIO:
            row.flags.append(f"exploding: std {row.std:.2e} vs {reference:.2e} at the first layer")


def plot_activations(rows: list[LayerActivity], path) -> None:
    """Per-layer histograms in forward order, like the lecture's plots."""
    columns = min(5, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure, axes = pyplot().subplots(lines, columns, figsize=(3 * columns, 2.3 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row in zip(axes.flat, rows):
        axis.axis("on")
        axis.hist(row.sample, bins=50, color="#c33" if row.flags else "#369")
        axis.set_title(f"{row.name[-28:]}\nmean {row.mean:.2f} std {row.std:.2f}", fontsize=7)
        axis.tick_params(labelsize=6)
    save_figure(figure, path)


@dataclass
class LayerGradient:
    name: str
    grad_norm: float
    weight_norm: float
    update_ratio: float  # ||Δw|| / ||w|| after one optimiser step
    flags: list[str] = field(default_factory=list)


def gradient_flow(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  create_optimizer) -> list[LayerGradient]:
    """One optimiser step on a copy of ``model``: per weight tensor, the gradient norm and how far the step moved it
    relative to its size. ``create_optimizer(parameters)`` builds the optimiser the run would use."""
    trial = copy.deepcopy(model).train()
    parameters = [(name, p) for name, p in trial.named_parameters() if p.requires_grad and p.ndim > 1]
    if not parameters:
        raise GraftError("nothing trainable with weights in this network (a frozen trunk and no head?)")
    before = {name: p.detach().clone() for name, p in parameters}
    optimizer = create_optimizer([p for _, p in parameters])
    optimizer.zero_grad()
    F.cross_entropy(trial(images), labels).backward()
    grads = {name: (p.grad.norm().item() if p.grad is not None else 0.0) for name, p in parameters}
    optimizer.step()
    rows = []
    for name, p in parameters:
        weight_norm = before[name].norm().item()
        ratio = (p.detach() - before[name]).norm().item() / max(weight_norm, 1e-12)
        row = LayerGradient(name, grads[name], weight_norm, ratio)
        if grads[name] == 0:
            row.flags.append("no gradient reaches this layer")
        elif ratio < UPDATE_RATIO_RANGE[0]:
            row.flags.append(f"update/weight {ratio:.1e}: learning too slowly (raise the lr?)")
        elif ratio > UPDATE_RATIO_RANGE[1]:
            row.flags.append(f"update/weight {ratio:.1e}: steps too large (lower the lr?)")
        rows.append(row)
    return rows


@dataclass
class Diagnosis:
    activations: list[LayerActivity]
    gradients: list[LayerGradient]
    nodes: list  # graft.models.inspection.NodeInfo: output size and receptive field per stage node
    flags: list[str]

    def to_dict(self) -> dict:
        strip = lambda row: {k: v for k, v in row.__dict__.items() if k != "sample"}  # noqa: E731
        return {"activations": [strip(r) for r in self.activations], "gradients": [strip(r) for r in self.gradients],
                "nodes": [n.__dict__ for n in self.nodes], "flags": self.flags}


def diagnose(target: str, data: str, output: str | None = None, batch_size: int = 64, lr: float | None = None,
             image_size: int | None = None, pretrained: bool = False, model_options: dict | None = None,
             seed: int = 0) -> Diagnosis:
    """Activation statistics, gradient flow and per-node receptive fields for a run folder or a backbone name
    (randomly initialised unless ``pretrained``), on one batch of ``data``; writes diagnosis.json and
    activations.png into ``output`` when given."""
    from pathlib import Path

    from graft.config import load_config
    from graft.data.discovery import discover
    from graft.data.images import load_image
    from graft.data.scan import readable
    from graft.data.transforms import create_transform
    from graft.models.grafted import create_model
    from graft.models.run_folder import load, read_card, refuse_label_sets
    from graft.models.inspection import list_nodes
    from graft.utils.outputs import output_folder

    if output:
        output_folder(output, "--output", ((data, "data"),))  # before the work: an unwritable folder wastes nothing
    torch.manual_seed(seed)
    splits = discover(data, seed=seed)
    if Path(target, "graft.json").is_file():
        refuse_label_sets(read_card(target), target, "graft diagnose")
        model = load(target)
        lr = lr or float(read_card(target).get("config", {}).get("train", {}).get("lr", 1e-3))
    else:
        values = {"model.backbone": target, "model.pretrained": pretrained, "data.image_size": image_size,
                  "train.strategy": "finetune" if pretrained else "scratch", **(model_options or {})}
        model, _ = create_model(load_config(None, values), splits.classes)
        lr = lr or 1e-3
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # diagnose the whole network, whatever a run froze
    known = {name: model.classes.index(name) for name in splits.classes if name in model.classes}
    pool = [(path, known[splits.classes[label]]) for path, label in splits.train if splits.classes[label] in known]
    samples = readable(pool[::max(1, len(pool) // (batch_size * 2))][: batch_size * 2])[:batch_size]
    if not samples:
        raise GraftError(f"{data}: no readable training images of the model's classes")
    transform = create_transform(model.preprocessing)
    images = torch.stack([transform(load_image(path)) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    activations = activation_statistics(model, images)
    gradients = gradient_flow(model, images, labels, lambda params: torch.optim.AdamW(params, lr=lr))
    net = model.trunk.net
    stage_nodes = [info["module"] for info in getattr(net, "feature_info", [])]
    nodes = list_nodes(net, model.preprocessing.input_size, stages_only=True, stage_nodes=stage_nodes)
    flags = [f"{row.name}: {flag}" for row in activations + gradients for flag in row.flags]
    diagnosis = Diagnosis(activations, gradients, nodes, flags)
    if output:
        import json

        from graft.utils.files import atomic_write

        folder = Path(output)
        if not plots_skipped("activations.png"):
            plot_activations(activations, folder / "activations.png")
        text = json.dumps(diagnosis.to_dict(), indent=1, default=float)
        atomic_write(folder / "diagnosis.json", lambda temp: Path(temp).write_text(text))
    return diagnosis
