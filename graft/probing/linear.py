"""Linear probes fitted to convergence on cached features: multinomial logistic regression with an L2 path.

Full-batch L-BFGS on standardised features (the problem is convex, so it converges to the optimum rather than
wherever E epochs of SGD happen to stop), over a log grid of L2 strengths from strong to weak, each warm-started
from the previous solution; the strength with the best validation accuracy (then loss) wins. Very large problems
switch to minibatch Adam. The result folds the standardisation into one ``nn.Linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_GRID", "FULL_BATCH_LIMIT", "ProbeResult", "class_weights", "fit_linear_probe"]

DEFAULT_GRID = tuple(10.0 ** e for e in range(-1, -8, -1))  # strong → weak; λ multiplies 0.5·‖W‖² per image
FULL_BATCH_LIMIT = 400_000_000  # N x D above this: minibatch Adam instead of full-batch L-BFGS


@dataclass
class ProbeResult:
    """The fitted linear layer (on raw features) and the validation path that chose it."""

    linear: nn.Linear
    l2: float
    grid: list[dict] = field(default_factory=list)  # per λ: train/val accuracy and loss, iterations
    val_accuracy: float = math.nan


def class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 over the images (sklearn's ``class_weight='balanced'``)."""
    counts = torch.bincount(labels, minlength=classes).float().clamp_min(1)
    return labels.numel() / (classes * counts)


def _loss(weight, bias, x, y, l2, sample_weight):
    logits = x @ weight.T + bias
    per_image = F.cross_entropy(logits, y, reduction="none")
    data = (per_image * sample_weight).sum() / sample_weight.sum()
    return data + 0.5 * l2 * weight.pow(2).sum()


def _lbfgs(weight, bias, x, y, l2, sample_weight, max_iter: int) -> int:
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = _loss(weight, bias, x, y, l2, sample_weight)
        loss.backward()
        return loss

    optimizer.step(closure)
    return calls


def _minibatch(weight, bias, x, y, l2, sample_weight, batch: int = 4096, min_steps: int = 1000,
               min_epochs: int = 10) -> int:
    """Adam with a cosine-decayed rate over at least ``min_steps`` steps and ``min_epochs`` epochs (the L2 term is
    in the loss, so plain Adam, not AdamW); returns the number of steps."""
    per_epoch = math.ceil(len(y) / batch)
    epochs = max(min_epochs, math.ceil(min_steps / per_epoch))
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)  # standardised features: a large, decaying step is safe
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=generator).split(batch):
            index = index.to(x.device)
            optimizer.zero_grad()
            _loss(weight, bias, x[index], y[index], l2, sample_weight[index]).backward()
            optimizer.step()
            scheduler.step()
    return epochs * per_epoch


def _evaluate(weight, bias, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = x @ weight.T + bias
        return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None = None,
                     val_y: np.ndarray | None = None, classes: int | None = None, grid=DEFAULT_GRID,
                     balanced: bool = False, device: str | torch.device = "cpu", max_iter: int = 300,
                     log=None) -> ProbeResult:
    """Fits multinomial logistic regression with the L2 strength chosen on (val_x, val_y).

    Args:
        train_x: (N, D) features; any float dtype (float16 caches are upcast).
        val_x: validation features; without them the middle of the grid is used.
        grid: L2 strengths λ (objective: mean cross-entropy + λ/2·‖W‖²; sklearn's C = 1 / (λ·N)).
        balanced: weight classes by inverse frequency.
        max_iter: L-BFGS iterations per grid point (warm starts make later points cheap).
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(train_y, dtype=np.int64), device=device)
    classes = classes or int(y.max().item()) + 1
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardising makes one λ grid fit every backbone
    x = (x - mean) / std
    has_val = val_x is not None and len(val_x) > 0
    if has_val:
        vx = (torch.as_tensor(np.asarray(val_x, dtype=np.float32), device=device) - mean) / std
        vy = torch.as_tensor(np.asarray(val_y, dtype=np.int64), device=device)
    sample_weight = class_weights(y, classes)[y] if balanced else torch.ones(len(y), device=device)
    weight = torch.zeros(classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    full_batch = x.numel() <= FULL_BATCH_LIMIT
    if not has_val:  # nothing to choose with: a middle-of-the-road strength
        grid = [sorted(grid)[len(grid) // 2]]
    path, best = [], None
    for l2 in sorted(grid, reverse=True):
        iterations = (_lbfgs(weight, bias, x, y, l2, sample_weight, max_iter) if full_batch
                      else _minibatch(weight, bias, x, y, l2, sample_weight))
        train_acc, train_loss = _evaluate(weight, bias, x, y)
        row = {"l2": l2, "C": 1 / (l2 * len(y)), "train_acc": train_acc, "train_loss": train_loss,
               "iterations": iterations}
        if has_val:
            row["val_acc"], row["val_loss"] = _evaluate(weight, bias, vx, vy)
        path.append(row)
        if log:
            val_text = f", val acc {row['val_acc']:.4f}" if has_val else ""
            log(f"probe λ={l2:.0e}: train acc {train_acc:.4f}{val_text}")
        score = (row["val_acc"], -row["val_loss"]) if has_val else None
        if best is None or (score is not None and score > best[0]):
            best = (score, l2, weight.detach().clone(), bias.detach().clone())
    _, l2, best_weight, best_bias = best
    linear = nn.Linear(x.shape[1], classes)
    with torch.no_grad():  # fold the standardisation in: W·(x-μ)/σ + b = (W/σ)·x + (b - W·μ/σ)
        linear.weight.copy_((best_weight / std).cpu())
        linear.bias.copy_((best_bias - (best_weight * (mean / std)).sum(1)).cpu())
    chosen = next(row for row in path if row["l2"] == l2) if has_val else {}
    return ProbeResult(linear, l2, path, chosen.get("val_acc", math.nan))
