"""Multi-label linear probes on cached features: one-vs-rest logistic regression, solved together, with per-class
decision thresholds.

One sigmoid per class on standardised features, the mean binary cross-entropy summed over the classes plus
λ/2·‖W‖² (the bias not penalised): the classes share nothing but λ, so this is exactly one L2-regularised logistic
regression per class, and sklearn's ``OneVsRestClassifier(LogisticRegression(C=1 / (λ·N)))`` minimises the same
objective. Full-batch L-BFGS over the same warm-started λ grid as the single-label probe (``graft.probing.linear``),
λ chosen by k-fold cross-validation on the training features (lowest mean held-out binary cross-entropy; folds are
seeded, not stratified: an image has several classes). Each class's threshold is then chosen on the validation split
to maximise that class's F1 (``choose_thresholds``); a class with no positive validation image keeps 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graft.probing.linear import CV_FOLDS, DEFAULT_GRID, lbfgs

__all__ = ["DEFAULT_THRESHOLD", "MultiLabelProbeResult", "choose_thresholds", "fit_multilabel_probe", "random_folds"]

DEFAULT_THRESHOLD = 0.5  # a class with no positive validation image: nothing to choose on


@dataclass
class MultiLabelProbeResult:
    """The fitted linear layer (on raw features; sigmoid of its outputs are the probabilities), λ and thresholds."""

    linear: nn.Linear
    l2: float
    thresholds: list[float]
    grid: list[dict] = field(default_factory=list)  # per λ: train (and cv, val) binary cross-entropy, iterations
    selection: str = "fixed"  # how λ was chosen: "cv-K" (K folds on train) or "fixed"
    cv_loss: float = math.nan


def random_folds(count: int, folds: int = CV_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Held-out index sets of a seeded k-fold split (``folds`` capped by ``count``)."""
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, min(folds, count))]


def _loss(weight, bias, x, y, l2):
    logits = x @ weight.T + bias
    return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y) + 0.5 * l2 * weight.pow(2).sum()


def _lbfgs(weight, bias, x, y, l2, max_iter: int) -> int:
    return lbfgs([weight, bias], lambda: _loss(weight, bias, x, y, l2), max_iter)


def _bce(weight, bias, x, y) -> float:
    """Mean binary cross-entropy per image, summed over the classes (the data term of the objective)."""
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(x @ weight.T + bias, y, reduction="sum").item() / len(y)


def _path(x, y, grid, max_iter: int, evaluate_on=()):
    """Fits every λ of ``grid`` (strong → weak, warm-started); yields (λ, row, weight, bias)."""
    weight = torch.zeros(y.shape[1], x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(y.shape[1], device=x.device, requires_grad=True)
    for l2 in grid:
        row = {"l2": l2, "C": 1 / (l2 * len(y)), "iterations": _lbfgs(weight, bias, x, y, l2, max_iter)}
        for name, ex, ey in evaluate_on:
            row[f"{name}_loss"] = _bce(weight, bias, ex, ey)
        yield l2, row, weight, bias


def _cv_losses(x, y, grid, folds: list[np.ndarray], max_iter: int) -> list[float]:
    totals = np.zeros(len(grid))
    for held in folds:
        mask = torch.ones(len(y), dtype=torch.bool, device=x.device)
        mask[torch.as_tensor(held, device=x.device)] = False
        for i, (_, row, _, _) in enumerate(_path(x[mask], y[mask], grid, max_iter, [("cv", x[~mask], y[~mask])])):
            totals[i] += row["cv_loss"]
    return list(totals / len(folds))


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per class, the threshold maximising F1 of ``probability >= threshold`` on these images: halfway between the
    lowest probability kept positive and the next one below it (the widest margin that gives the same F1 here); ties
    go to the higher threshold. A class without a positive image gets ``DEFAULT_THRESHOLD``."""
    thresholds = []
    for scores, truth in zip(np.asarray(probabilities, dtype=np.float64).T, np.asarray(targets).T > 0.5):
        if not truth.any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(-scores, kind="stable")
        ranked, hits = scores[order], truth[order]
        last = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]  # the last image of each distinct score
        true_positives = np.cumsum(hits)[last]
        predicted = last + 1
        f1 = 2 * true_positives / (predicted + truth.sum())
        best = int(np.flatnonzero(f1 == f1.max())[0])  # the first: the highest threshold of the best F1
        below = ranked[last[best] + 1] if last[best] + 1 < len(ranked) else 0.0
        thresholds.append(float((ranked[last[best]] + below) / 2))
    return thresholds


def fit_multilabel_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None = None,
                         val_y: np.ndarray | None = None, grid=DEFAULT_GRID, device: str | torch.device = "cpu",
                         max_iter: int = 300, cv: int = CV_FOLDS, seed: int = 0, log=None) -> MultiLabelProbeResult:
    """Fits one-vs-rest logistic regression with λ chosen by k-fold CV on the training features (lowest held-out
    binary cross-entropy), refits on all of them, and chooses per-class thresholds on the validation features.

    Args:
        train_x: (N, D) features; train_y: (N, classes) multi-hot targets (0/1).
        val_x, val_y: validation features and targets: the thresholds are chosen on them (without them: 0.5 each).
        grid: L2 strengths λ (sklearn's C = 1 / (λ·N) per class).
        cv: folds (0 or 1, or a grid of one: no CV, the grid's middle).
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(train_y, dtype=np.float32), device=device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    grid = sorted(grid, reverse=True)
    has_val = val_x is not None and len(val_x) > 0
    evaluate_on = [("train", x, y)]
    if has_val:
        vx = (torch.as_tensor(np.asarray(val_x, dtype=np.float32), device=device) - mean) / std
        evaluate_on.append(("val", vx, torch.as_tensor(np.asarray(val_y, dtype=np.float32), device=device)))
    if cv >= 2 and len(grid) > 1 and len(y) >= 2 * cv:
        losses = _cv_losses(x, y, grid, random_folds(len(y), cv, seed), max(20, max_iter // 3))
        chosen, selection = int(np.argmin(losses)), f"cv-{cv}"
    else:
        losses, chosen, selection = None, len(grid) // 2, "fixed"
    rows, best = [], None
    for i, (l2, row, weight, bias) in enumerate(_path(x, y, grid, max_iter, evaluate_on)):
        if losses is not None:
            row["cv_loss"] = losses[i]
        rows.append(row)
        if log:
            shown = "".join(f", {k[:-5]} BCE {row[k]:.4f}" for k in ("cv_loss", "val_loss") if k in row)
            log(f"multi-label probe λ={l2:.0e}: train BCE {row['train_loss']:.4f}{shown}")
        if i == chosen:
            best = (weight.detach().clone(), bias.detach().clone())
            break  # the weaker strengths after the chosen one would only fill the table
    linear = nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():  # fold the standardisation in: W·(x-μ)/σ + b = (W/σ)·x + (b - W·μ/σ)
        linear.weight.copy_((best[0] / std).cpu())
        linear.bias.copy_((best[1] - (best[0] * (mean / std)).sum(1)).cpu())
    thresholds = [DEFAULT_THRESHOLD] * y.shape[1]
    if has_val:
        with torch.no_grad():
            val_probabilities = torch.sigmoid(linear(torch.as_tensor(np.asarray(val_x, dtype=np.float32)))).numpy()
        thresholds = choose_thresholds(val_probabilities, np.asarray(val_y))
    return MultiLabelProbeResult(linear, grid[chosen], thresholds, rows, selection,
                                 losses[chosen] if losses is not None else math.nan)
