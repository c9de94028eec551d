"""Linear probes fitted to convergence on cached features: multinomial logistic regression with an L2 path.

Full-batch L-BFGS on standardised features (the problem is convex, so it converges to the optimum rather than
wherever E epochs of SGD happen to stop), over a log grid of L2 strengths from strong to weak, each warm-started
from the previous solution. The strength is chosen by stratified k-fold cross-validation on the training features
(lowest mean held-out log-loss: accuracy ties are common on small data and say nothing about confidence; a choice at
an end of the grid extends the grid past it), so the validation split stays an unbiased estimate; only when a class
has too few training images for two folds is it chosen on validation, and labelled so. The probabilities are then
calibrated by temperature scaling fitted on the folds' out-of-fold logits at the chosen strength (again training
images only; the temperature divides the logits, so the predicted class never changes). Very large problems switch
to minibatch Adam. The result folds the standardisation and the temperature into one ``nn.Linear``.

Mapping to scikit-learn: our objective is mean cross-entropy + λ/2·‖W‖² on standardised features (the bias is not
penalised); sklearn's ``LogisticRegression`` minimises C·Σ cross-entropy + ½‖W‖². Dividing sklearn's by C·N gives
ours, so ``C = 1 / (λ·N)`` with N the number of images the fit sees (a CV fold's training part: (k-1)/k of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CV_FOLDS", "DEFAULT_GRID", "FULL_BATCH_LIMIT", "GRID_LIMITS", "OUT_OF_FOLD_LIMIT", "ProbeResult",
           "class_weights", "fit_linear_probe", "fit_temperature", "lbfgs", "stratified_folds"]

# strong → weak; λ multiplies 0.5·‖W‖² per image. 1e1 and 1e0 reach the strong regularisation a cross-validated
# sklearn fit picked on a real 2-class dataset (C·N ≈ 2.5, λ ≈ 0.4), which the old 1e-1 end could not.
DEFAULT_GRID = tuple(10.0 ** e for e in range(1, -8, -1))
CV_FOLDS = 5
FULL_BATCH_LIMIT = 400_000_000  # N x D above this: minibatch Adam instead of full-batch L-BFGS
GRID_LIMITS = (1e4, 1e-10)  # how far a choice at an end of the grid may extend it (strongest, weakest λ)
OUT_OF_FOLD_LIMIT = 25_000_000  # N x classes x grid points of held-out logits kept in memory; above: a second pass


@dataclass
class ProbeResult:
    """The fitted linear layer (on raw features) and the validation path that chose it."""

    linear: nn.Linear
    l2: float
    grid: list[dict] = field(default_factory=list)  # per λ: train/val (and cv) accuracy and loss, iterations
    val_accuracy: float = math.nan
    selection: str = "validation"  # how λ was chosen: "cv-K" (K folds on train), "validation" or "fixed"
    cv_accuracy: float = math.nan  # the chosen λ's mean held-out accuracy over the folds
    temperature: float = 1.0  # the logits were divided by it (fitted on out-of-fold logits; 1: not calibrated)
    cv_loss: float = math.nan  # the chosen λ's mean held-out log-loss, before the temperature
    calibrated_cv_loss: float = math.nan  # the same out-of-fold logits' log-loss after it
    # (N, classes) probabilities of each training image from the fold that held it out, at the chosen λ and after the
    # temperature (None without CV): what `graft audit` gives cleanlab, at no extra solve
    out_of_fold: np.ndarray | None = None

    @property
    def optimistic(self) -> bool:
        """Whether the validation accuracy is biased upwards: λ was chosen on the validation split itself."""
        return self.selection == "validation"


def stratified_folds(labels: np.ndarray, folds: int = CV_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Held-out index sets of a seeded stratified k-fold split: each class's images shuffled, then dealt round-robin,
    so every fold holds ⌊n/k⌋ or ⌈n/k⌉ of each class. ``folds`` is capped by the smallest class (at least 2 needed)."""
    labels = np.asarray(labels)
    folds = min(folds, int(np.bincount(labels)[np.unique(labels)].min()))
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for i, index in enumerate(members):
            parts[(i + offset) % folds].append(int(index))
        offset += len(members)  # the next class continues where this one stopped: folds stay equal in size
    return [np.sort(np.array(part, dtype=np.int64)) for part in parts]


def class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 over the images (sklearn's ``class_weight='balanced'``)."""
    counts = torch.bincount(labels, minlength=classes).float().clamp_min(1)
    return labels.numel() / (classes * counts)


def _loss(weight, bias, x, y, l2, sample_weight):
    logits = x @ weight.T + bias
    per_image = F.cross_entropy(logits, y, reduction="none")
    data = (per_image * sample_weight).sum() / sample_weight.sum()
    return data + 0.5 * l2 * weight.pow(2).sum()


def lbfgs(parameters: list[torch.Tensor], objective, max_iter: int) -> int:
    """Minimises ``objective()`` over ``parameters`` with full-batch L-BFGS (strong Wolfe line search), the solver of
    every probe (softmax here, one-vs-rest in ``graft.probing.multilabel``); returns the objective's evaluations."""
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=max_iter, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    return calls


def _lbfgs(weight, bias, x, y, l2, sample_weight, max_iter: int) -> int:
    return lbfgs([weight, bias], lambda: _loss(weight, bias, x, y, l2, sample_weight), max_iter)


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


def _path(x, y, sample_weight, grid, classes: int, max_iter: int, full_batch: bool, evaluate_on=(), log=None,
          start: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Fits every λ of ``grid`` (strong → weak, warm-started; the first from ``start``'s (weight, bias) on the
    standardised features, else zeros); yields (λ, row, weight, bias) with the row's metrics on each (name, x, y) of
    ``evaluate_on``."""
    weight = torch.zeros(classes, x.shape[1], device=x.device)
    bias = torch.zeros(classes, device=x.device)
    if start is not None:
        weight, bias = start[0].to(x.device, torch.float32).clone(), start[1].to(x.device, torch.float32).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    for l2 in grid:
        iterations = (_lbfgs(weight, bias, x, y, l2, sample_weight, max_iter) if full_batch
                      else _minibatch(weight, bias, x, y, l2, sample_weight))
        row = {"l2": l2, "C": 1 / (l2 * len(y)), "iterations": iterations}
        for name, ex, ey in evaluate_on:
            row[f"{name}_acc"], row[f"{name}_loss"] = _evaluate(weight, bias, ex, ey)
        yield l2, row, weight, bias


def _cross_validate(x, y, sample_weight, grid, classes: int, folds: list[np.ndarray], max_iter: int,
                    full_batch: bool, keep_logits: bool) -> tuple[list[tuple[float, float]], torch.Tensor | None]:
    """Mean held-out (accuracy, loss) per λ over the folds, each fold running its own warm-started path; with
    ``keep_logits``, also every image's out-of-fold logits per λ, (grid, N, classes)."""
    totals = np.zeros((len(grid), 2))
    logits = torch.zeros(len(grid), len(y), classes, device=x.device) if keep_logits else None
    for held in folds:
        mask = torch.ones(len(y), dtype=torch.bool, device=x.device)
        mask[torch.as_tensor(held, device=x.device)] = False
        evaluate_on = [("cv", x[~mask], y[~mask])]
        for i, (_, row, weight, bias) in enumerate(_path(x[mask], y[mask], sample_weight[mask], grid, classes,
                                                         max_iter, full_batch, evaluate_on)):
            totals[i] += (row["cv_acc"], row["cv_loss"])
            if logits is not None:
                with torch.no_grad():
                    logits[i, ~mask] = x[~mask] @ weight.T + bias
    return [(acc, loss) for acc, loss in totals / len(folds)], logits


def _choose_by_cv(x, y, sample_weight, grid: list[float], classes: int, folds: list[np.ndarray], max_iter: int,
                  full_batch: bool):
    """Cross-validates ``grid`` (strong → weak) and picks the λ of lowest held-out log-loss (then higher accuracy);
    while that is an end of the grid, the grid grows a decade past it (up to ``GRID_LIMITS``) and is scored again.
    Returns (grid, scores, chosen index, the chosen λ's out-of-fold logits)."""
    iterations = max(20, max_iter // 3)  # the folds only rank the strengths (weak λ on separable data hits the cap)
    while True:
        keep = len(y) * classes * len(grid) <= OUT_OF_FOLD_LIMIT
        scores, logits = _cross_validate(x, y, sample_weight, grid, classes, folds, iterations, full_batch, keep)
        chosen = min(range(len(grid)), key=lambda i: (scores[i][1], -scores[i][0]))
        if chosen == 0 and grid[0] * 10 <= GRID_LIMITS[0]:
            grid = [grid[0] * 10, *grid]
        elif chosen == len(grid) - 1 and len(grid) > 1 and grid[-1] / 10 >= GRID_LIMITS[1]:
            grid = [*grid, grid[-1] / 10]
        else:
            break
    if logits is None:  # too large to keep every λ's: the chosen one's, from a second pass over the folds
        _, logits = _cross_validate(x, y, sample_weight, [grid[chosen]], classes, folds, iterations, full_batch, True)
        return grid, scores, chosen, logits[0]
    return grid, scores, chosen, logits[chosen]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The temperature T minimising the mean cross-entropy of ``logits / T`` (Guo et al. 2017's temperature
    scaling): a golden-section search over log T in [-5, 5], the loss being unimodal in it. None when the loss has
    no minimum inside: every image right (sharpening lowers it for ever: T would go to 0 and the model claim
    certainty) or none right; nothing is learnt about confidence from such a set."""
    logits, labels = logits.double(), labels.long()  # float32's loss is too coarse near the flat minimum
    right = (logits.argmax(dim=1) == labels).float().mean().item()
    if right in (0.0, 1.0):
        return None

    def loss(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    low, high, ratio = -5.0, 5.0, (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(60):  # the bracket shrinks by 0.618 a step: 10 x 0.618^60 < 1e-11
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    found = (low + high) / 2
    return None if abs(found) > 4.9 else math.exp(found)  # at the edge of the search: no minimum inside it


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None = None,
                     val_y: np.ndarray | None = None, classes: int | None = None, grid=DEFAULT_GRID,
                     balanced: bool = False, device: str | torch.device = "cpu", max_iter: int = 300,
                     log=None, cv: int = CV_FOLDS, seed: int = 0, calibrate: bool = True,
                     init: nn.Linear | None = None) -> ProbeResult:
    """Fits multinomial logistic regression with the L2 strength chosen by stratified k-fold CV on the training
    features, then refits on all of them at that strength.

    Args:
        train_x: (N, D) features; any float dtype (float16 caches are upcast).
        val_x: validation features: evaluated along the path (``grid``'s rows) and, only when CV is impossible, used
            to choose λ (``selection="validation"``, an optimistic estimate). Without CV or them: the grid's middle.
        grid: L2 strengths λ (objective: mean cross-entropy + λ/2·‖W‖²; sklearn's C = 1 / (λ·N)).
        balanced: weight classes by inverse frequency.
        max_iter: L-BFGS iterations per grid point (warm starts make later points cheap).
        cv: folds (capped by the smallest class's image count; 0 or a class with one image: no CV).
        seed: the folds' shuffle.
        calibrate: temperature-scale the probabilities on the out-of-fold logits (with CV only; else T = 1).
        init: a linear layer on the raw features to start the final fit's path from (a nearby solution, e.g. the
            previous round of self-training: L-BFGS then needs fewer steps); zeros without it.
    """
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(train_y, dtype=np.int64), device=device)
    classes = classes or int(y.max().item()) + 1
    # standardised with all training features' statistics, folds included: unsupervised (no labels), and it keeps
    # one λ grid meaningful for every backbone
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    evaluate_on = [("train", x, y)]
    has_val = val_x is not None and len(val_x) > 0
    if has_val:
        vx = (torch.as_tensor(np.asarray(val_x, dtype=np.float32), device=device) - mean) / std
        evaluate_on.append(("val", vx, torch.as_tensor(np.asarray(val_y, dtype=np.int64), device=device)))
    sample_weight = class_weights(y, classes)[y] if balanced else torch.ones(len(y), device=device)
    full_batch = x.numel() <= FULL_BATCH_LIMIT
    grid = sorted(grid, reverse=True)
    present = np.bincount(np.asarray(train_y, dtype=np.int64))
    can_cv = cv >= 2 and len(grid) > 1 and present[present > 0].min() >= 2
    temperature, calibration, held_out = 1.0, (math.nan, math.nan), None
    if can_cv:
        folds = stratified_folds(np.asarray(train_y, dtype=np.int64), cv, seed)
        grid, scores, chosen, out_of_fold = _choose_by_cv(x, y, sample_weight, grid, classes, folds, max_iter,
                                                          full_batch)
        selection = f"cv-{len(folds)}"
        fitted = fit_temperature(out_of_fold, y) if calibrate else None
        if fitted is not None:
            temperature = fitted
            calibration = (scores[chosen][1], F.cross_entropy(out_of_fold / temperature, y).item())
        held_out = torch.softmax(out_of_fold.double() / temperature, dim=1).cpu().numpy()
    elif len(grid) == 1 or not has_val:  # nothing to choose with: the one given, or a middle-of-the-road strength
        grid, chosen, selection = [grid[len(grid) // 2]], 0, "fixed"
    else:  # a class with one training image: no two folds, so the labelled, optimistic fallback
        chosen, selection = None, "validation"
    path, best = [], None
    start = None
    if init is not None:  # raw → standardised: W·x + b = (W·σ)·(x-μ)/σ + (b + W·μ)
        with torch.no_grad():
            raw_weight, raw_bias = init.weight.to(device, torch.float32), init.bias.to(device, torch.float32)
            start = (raw_weight * std, raw_bias + raw_weight @ mean)
    for i, (l2, row, weight, bias) in enumerate(_path(x, y, sample_weight, grid, classes, max_iter, full_batch,
                                                      evaluate_on, start=start)):
        if can_cv:
            row["cv_acc"], row["cv_loss"] = scores[i]
        path.append(row)
        if log:
            shown = "".join(f", {k[:-4]} acc {row[k]:.4f}" for k in ("cv_acc", "val_acc") if k in row)
            log(f"probe λ={l2:.0e}: train acc {row['train_acc']:.4f}{shown}")
        if not can_cv and selection == "validation":
            score = (row["val_acc"], -row["val_loss"])
            if best is None or score > best[0]:
                best = (score, i, weight.detach().clone(), bias.detach().clone())
        elif i == chosen:
            best = (None, i, weight.detach().clone(), bias.detach().clone())
        if can_cv and i == chosen and not has_val:
            break  # the weaker strengths after the chosen one only fill the table
    _, chosen, best_weight, best_bias = best
    linear = nn.Linear(x.shape[1], classes)
    with torch.no_grad():  # fold the standardisation and temperature in: (W·(x-μ)/σ + b)/T = (W/σT)·x + (b - W·μ/σ)/T
        linear.weight.copy_((best_weight / std / temperature).cpu())
        linear.bias.copy_(((best_bias - (best_weight * (mean / std)).sum(1)) / temperature).cpu())
    row = path[chosen]
    return ProbeResult(linear, row["l2"], path, row.get("val_acc", math.nan), selection, row.get("cv_acc", math.nan),
                       temperature, *calibration, held_out)
