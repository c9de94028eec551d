"""Semi-supervised linear probes on cached features: an unlabelled pool helps the probe through pseudo-labels.

Two ways to pseudo-label the pool, both ending in the same linear probe refitted on labelled + pseudo-labelled
features (so the result is a graft head like any other):

- self-training: the probe predicts the pool; predictions above a confidence threshold join the training set; a few
  rounds, each admitting a larger share of the pool (round r of R: up to r/R of it), the pseudo-labels re-predicted
  each round (none is sticky). Threshold 0 is class-balanced top-k: no floor, each class's most confident share.
- label propagation (Zhou et al. 2004's label spreading): labels flow over a symmetric k-nearest-neighbour graph of
  the standardised, L2-normalised features (edge weights cosine³, as Iscen et al. 2019), F ← αSF + (1-α)Y; a pool
  image's normalised score row is its pseudo-label distribution.

Both are class-balanced: each class may take at most ``prior × pool size`` pseudo-labels (its share of the labelled
images), so a class the pool is full of, or one the probe over-predicts, cannot swallow the pool.

With a second view of every image (``second``: an earlier stage's features, ``graft.probing.cotrain``),
co-training is a third candidate: each view's probe pseudo-labels the pool for the other's.

Which method and which threshold is chosen by evidence: stratified k-fold cross-validation on the labelled training
images alone. The method runs on the rest of the labels with (a sample of) the pool, and the refitted probe is scored
on the held-out labels. The held-out images stay out of the pool, as validation images do in the final run (when
they joined it, a pool method pseudo-labelled the very images it was then scored on, and the CV favoured the pool
where validation did not). Labelled-only is a candidate too, and wins ties. Validation images never enter: the caller
compares the chosen result with the labelled-only probe on them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graft.probing.linear import fit_linear_probe, stratified_folds

__all__ = ["LabelGraph", "METHODS", "NEIGHBOURS", "ROUNDS", "SEARCH_FOLDS", "SemiResult", "THRESHOLDS", "LinearFit",
           "balanced_pick", "choose_and_fit", "class_prior", "label_graph", "probabilities", "propagate",
           "search_steps", "self_train", "with_pseudo"]

METHODS = ("self-training", "propagation")
# confidence a pseudo-label needs; the CV picks one. 0: no floor, each class takes its most confident share of the
# pool (class-balanced top-k): with propagation it won the CV at 1% labels and gained +7.2 points on flowers5 and
# +11.7 / +15.9 on mnist_test10k, where thresholds had pseudo-labelled a few hundred images (+3.2). 0.95 admits few
# images and scored lowest of the three in flowers5's CV (bench/RESULTS.md)
THRESHOLDS = (0.0, 0.8)  # 0.9 never won the CV on either dataset at 1/5/10% labels
ROUNDS = 3
NEIGHBOURS = 10
SEARCH_FOLDS = 3  # the labelled set is small by assumption: 3 folds keep each fold's training part useful
ALPHA = 0.9  # propagation: how far labels spread (α^iterations ≈ 0: converged)
ITERATIONS = 40
# the search only ranks candidates (as the λ folds do), on a sample of the pool: about 4x cheaper than full fits on
# the whole pool, with the same choices on flowers5 and mnist_test10k at 1/5/10% labels (bench/RESULTS.md)
SEARCH_ITERATIONS = 20
SEARCH_POOL = 1000


class LinearFit:
    """A fixed-strength linear probe (λ and temperature from the labelled-only probe's CV): ``fit(x, y)`` returns
    an ``nn.Linear`` on raw features with the temperature folded in."""

    def __init__(self, l2: float, temperature: float, classes: int, balanced: bool = False, device="cpu",
                 max_iter: int = 100):
        self.l2, self.temperature, self.classes = l2, temperature, classes
        self.balanced, self.device, self.max_iter = balanced, device, max_iter

    def __call__(self, x: np.ndarray, y: np.ndarray, start: nn.Linear | None = None) -> nn.Linear:
        """The probe on (``x``, ``y``); ``start``: an earlier fit of this one (its temperature taken out) to begin
        L-BFGS from: a nearby solution converges in fewer steps."""
        init = None
        if start is not None:
            init = nn.Linear(start.in_features, start.out_features)
            with torch.no_grad():
                init.weight.copy_(start.weight * self.temperature)
                init.bias.copy_(start.bias * self.temperature)
        result = fit_linear_probe(x, y, classes=self.classes, grid=[self.l2], balanced=self.balanced,
                                  device=self.device, max_iter=self.max_iter, cv=0, calibrate=False, init=init)
        linear = result.linear
        with torch.no_grad():
            linear.weight.div_(self.temperature)
            linear.bias.div_(self.temperature)
        return linear

    def ranking(self, max_iter: int) -> "LinearFit":
        """The same probe with at most ``max_iter`` L-BFGS steps: the search's folds only rank the candidates."""
        return LinearFit(self.l2, self.temperature, self.classes, self.balanced, self.device, max_iter)


def probabilities(linear: nn.Linear, x: np.ndarray) -> np.ndarray:
    """Softmax of the linear layer's logits on ``x``."""
    with torch.no_grad():
        logits = linear(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    return F.softmax(logits, dim=1).numpy()


def balanced_pick(probs: np.ndarray, threshold: float, prior: np.ndarray, share: float = 1.0) -> np.ndarray:
    """Pseudo-labels (-1: none) for rows of ``probs`` whose top probability reaches ``threshold``, each class taking
    its most confident rows up to ``share × prior[c] × rows`` (rounded down)."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    labels = np.full(len(probs), -1, dtype=np.int64)
    for label, fraction in enumerate(prior):
        quota = int(math.floor(share * fraction * len(probs) + 1e-9))
        candidates = np.flatnonzero((predicted == label) & (confidence >= threshold))
        chosen = candidates[np.argsort(-confidence[candidates], kind="stable")[:quota]]
        labels[chosen] = label
    return labels


def class_prior(labels: np.ndarray, classes: int) -> np.ndarray:
    """Each class's share of ``labels``."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    return counts / counts.sum()


def with_pseudo(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, pseudo: np.ndarray):
    """The labelled rows followed by the pool's pseudo-labelled ones (``pseudo`` -1: left out)."""
    used = pseudo >= 0
    return np.concatenate([x, pool_x[used]]), np.concatenate([y, pseudo[used]])


def self_train(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, fit: LinearFit, threshold: float,
               rounds: int = ROUNDS, log=None, start: nn.Linear | None = None) -> tuple[np.ndarray, nn.Linear]:
    """Self-training of the probe on labelled (``x``, ``y``) and the unlabelled ``pool_x``; returns (the pool's
    pseudo-labels, -1 for none; the probe refitted on labelled + pseudo-labelled). ``start``: the labelled-only
    probe when already fitted."""
    prior = class_prior(y, fit.classes)
    labelled_only = linear = start if start is not None else fit(x, y)
    pseudo = np.full(len(pool_x), -1, dtype=np.int64)
    for round_ in range(1, rounds + 1):
        pseudo = balanced_pick(probabilities(linear, pool_x), threshold, prior, round_ / rounds)
        # nothing picked: exactly the labelled-only probe (a refit would differ by solver noise and could win a tie)
        linear = fit(*with_pseudo(x, y, pool_x, pseudo), start=linear) if (pseudo >= 0).any() else labelled_only
        if log:
            log(f"self-training round {round_}/{rounds}: {int((pseudo >= 0).sum()):,} of {len(pool_x):,} pool "
                f"images pseudo-labelled (threshold {threshold:g})")
    return pseudo, linear


@dataclass
class LabelGraph:
    """A symmetric k-NN graph's normalised affinity S = D^-1/2 W D^-1/2 over the nodes, as a sparse tensor."""

    affinity: torch.Tensor
    nodes: int


def label_graph(features: np.ndarray, neighbours: int = NEIGHBOURS, chunk: int = 2048) -> LabelGraph:
    """The k-NN graph of ``features`` (cosine similarity of standardised, L2-normalised rows; edge weight s³ for
    s > 0), symmetrised (W + Wᵀ) and normalised."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    x = F.normalize(x, dim=1)
    n, k = len(x), min(neighbours, len(x) - 1)
    rows, columns, values = [], [], []
    for start in range(0, n, chunk):  # chunks: the full N x N similarity never sits in memory at once
        similarity = x[start:start + chunk] @ x.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -math.inf
        top, index = similarity.topk(k, dim=1)
        rows.append(torch.arange(start, start + len(similarity)).repeat_interleave(k))
        columns.append(index.reshape(-1))
        values.append(top.clamp_min(0).pow(3).reshape(-1))
    row, column, value = torch.cat(rows), torch.cat(columns), torch.cat(values)
    weights = torch.sparse_coo_tensor(torch.stack([torch.cat([row, column]), torch.cat([column, row])]),
                                      torch.cat([value, value]), (n, n), check_invariants=True).coalesce()
    degree = torch.zeros(n).index_add_(0, weights.indices()[0], weights.values())
    scale = degree.clamp_min(1e-12).rsqrt()
    i, j = weights.indices()
    affinity = torch.sparse_coo_tensor(weights.indices(), weights.values() * scale[i] * scale[j], (n, n),
                                       check_invariants=True).coalesce()
    with warnings.catch_warnings():  # torch calls CSR "beta" on every conversion; the product is exact (tested)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return LabelGraph(affinity.to_sparse_csr(), n)  # CSR: propagation's products run ~3.5x faster than on COO


def propagate(graph: LabelGraph, labels: np.ndarray, classes: int, alpha: float = ALPHA,
              iterations: int = ITERATIONS) -> np.ndarray:
    """Label spreading over ``graph``: ``labels`` (one per node, -1: unlabelled) → per-node class distributions
    (rows of the converged F, clipped at 0 and normalised; a node no label reached gets the uniform row)."""
    labels = np.asarray(labels)
    seeds = torch.zeros(graph.nodes, classes)
    known = np.flatnonzero(labels >= 0)
    seeds[torch.as_tensor(known), torch.as_tensor(labels[known])] = 1.0
    scores = seeds.clone()
    for _ in range(iterations):
        scores = alpha * (graph.affinity @ scores) + (1 - alpha) * seeds
    scores = scores.clamp_min(0)
    total = scores.sum(1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / classes)
    return torch.where(total > 0, scores / total.clamp_min(1e-30), uniform).numpy()


def _propagation_pick(graph: LabelGraph, y: np.ndarray, labelled: np.ndarray, unlabelled: np.ndarray, classes: int,
                      threshold: float) -> np.ndarray:
    """Pseudo-labels for the ``unlabelled`` nodes from propagating ``y`` of the ``labelled`` nodes."""
    labels = np.full(graph.nodes, -1, dtype=np.int64)
    labels[labelled] = y
    scores = propagate(graph, labels, classes)
    return balanced_pick(scores[unlabelled], threshold, class_prior(y, classes))


@dataclass
class SemiResult:
    """The method chosen on the labelled set's folds and the probe it gives on all of them (None: labelled-only)."""

    method: str  # "self-training", "propagation", or "labelled-only" when neither beat it in the folds
    threshold: float | None
    pool: int
    pseudo_labels: np.ndarray  # one per pool image, -1: none
    linear: nn.Linear | None
    search: list[dict] = field(default_factory=list)  # per candidate: method, threshold, mean held-out accuracy
    selection: str = ""  # how the method was chosen
    note: str = ""  # why the labelled-only probe came back when a method won the search but used no image

    @property
    def used(self) -> int:
        return int((self.pseudo_labels >= 0).sum())


def _candidates(thresholds, second: bool = False) -> list[tuple[str, float | None]]:
    return ([("labelled-only", None)] + [(method, t) for method in METHODS for t in thresholds] +
            ([("co-training", 0.0)] if second else []))


def _run(method: str, threshold: float | None, x, y, pool_x, fit: LinearFit, graph: LabelGraph | None,
         labelled: np.ndarray, unlabelled: np.ndarray, log=None, start: nn.Linear | None = None,
         second=None) -> tuple[np.ndarray, nn.Linear]:
    """One candidate on labelled (``x``, ``y``) and ``pool_x``; ``labelled``/``unlabelled``: their nodes in
    ``graph``; ``start``: the labelled-only probe when already fitted; ``second``: co-training's other view (a
    ``graft.probing.cotrain.SecondView``, which runs it: that module builds on this one)."""
    if method == "labelled-only":
        return np.full(len(pool_x), -1, dtype=np.int64), start if start is not None else fit(x, y)
    if method == "self-training":
        return self_train(x, y, pool_x, fit, threshold, log=log, start=start)
    if method == "co-training":
        return second.co_train(x, y, pool_x, fit, ROUNDS, start=start, log=log)
    pseudo = _propagation_pick(graph, y, labelled, unlabelled, fit.classes, threshold)
    if not (pseudo >= 0).any():  # nothing picked: exactly the labelled-only probe, as in self_train
        return _run("labelled-only", None, x, y, pool_x, fit, graph, labelled, unlabelled, start=start)
    return pseudo, fit(*with_pseudo(x, y, pool_x, pseudo), start=start)


def _search(x, y, pool_x, fit: LinearFit, graph: LabelGraph, thresholds, folds: list[np.ndarray],
            progress=None, second=None) -> list[dict]:
    """Mean held-out accuracy of every candidate over ``folds`` of the labelled images, each fit capped at
    ``SEARCH_ITERATIONS`` steps, on at most ``SEARCH_POOL`` pool images (a seeded sample; held-out images are scored,
    never pooled)."""
    candidates = _candidates(thresholds, second is not None)
    fit = fit.ranking(SEARCH_ITERATIONS)
    scores = np.zeros((len(candidates), 2))  # held-out accuracy, log-loss
    done = 0
    sample = np.arange(len(pool_x))
    if len(pool_x) > SEARCH_POOL:  # the search's cost stays flat however large the pool
        sample = np.sort(np.random.default_rng(0).choice(len(pool_x), SEARCH_POOL, replace=False))
    fold_pool, unlabelled = pool_x[sample], len(y) + sample  # graph nodes: the labelled images, then the pool
    for held in folds:
        keep = np.setdiff1d(np.arange(len(y)), held)
        start = fit(x[keep], y[keep])  # shared by labelled-only and every self-training candidate
        fold_second = None if second is None else second.fold(keep, sample)
        for i, (method, threshold) in enumerate(candidates):
            _, linear = _run(method, threshold, x[keep], y[keep], fold_pool, fit, graph, keep, unlabelled,
                             start=start, second=fold_second)
            probs = probabilities(linear, x[held])
            right = probs[np.arange(len(held)), y[held]]
            scores[i] += ((probs.argmax(1) == y[held]).mean(), -np.log(np.clip(right, 1e-12, 1)).mean())
            done += 1
            if progress is not None:
                progress.update(done)
    scores /= len(folds)
    return [{"method": m, "threshold": t, "cv_accuracy": round(float(acc), 4), "cv_loss": round(float(loss), 4)}
            for (m, t), (acc, loss) in zip(candidates, scores)]


def choose_and_fit(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, fit: LinearFit, thresholds=THRESHOLDS,
                   folds: int = SEARCH_FOLDS, seed: int = 0, progress: Callable[[int], object] | None = None,
                   log=None, start: nn.Linear | None = None, second=None) -> SemiResult:
    """Chooses the method and threshold by cross-validation on the labelled (``x``, ``y``) and runs it on all of
    them with ``pool_x``. With a class too small for two folds there is nothing to cross-validate on: self-training
    at the highest threshold, said in ``selection`` (the caller's validation check still decides).

    Args:
        progress: an object with ``update(done)`` (``graft.utils.progress.Progress`` over ``search_steps``).
        second: a second view of the labelled images and the pool (``graft.probing.cotrain.SecondView``): adds
            co-training to the candidates.
    """
    x, y, pool_x = (np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64),
                    np.asarray(pool_x, dtype=np.float32))
    graph = label_graph(np.concatenate([x, pool_x]))
    present = np.bincount(y)
    if present[present > 0].min() < 2:
        method, threshold, search, how = "self-training", max(thresholds), [], "a class has one labelled image: no CV"
    else:
        splits = stratified_folds(y, folds, seed)
        search = _search(x, y, pool_x, fit, graph, thresholds, splits, progress, second)
        # higher held-out accuracy, then lower log-loss (few labels tie often); labelled-only wins exact ties
        best = max(search, key=lambda row: (row["cv_accuracy"], -row["cv_loss"]))
        method, threshold = best["method"], best["threshold"]
        how = f"{len(splits)}-fold CV on the labelled images"
    labelled = np.arange(len(y))
    pool_nodes = np.arange(len(y), len(y) + len(pool_x))
    pseudo, linear = _run(method, threshold, x, y, pool_x, fit, graph, labelled, pool_nodes, log, start, second)
    if method != "labelled-only" and not (pseudo >= 0).any():
        # a method that pseudo-labelled nothing is the labelled-only probe: say so, never report it as used
        note = (f"{method}{'' if threshold is None else f' (threshold {threshold:g})'} won {how} but pseudo-labelled "
                "none of the pool")
        return SemiResult("labelled-only", None, len(pool_x), pseudo, None, search, how, note)
    return SemiResult(method, threshold, len(pool_x), pseudo, None if method == "labelled-only" else linear, search,
                      how)


def search_steps(labels: np.ndarray, thresholds=THRESHOLDS, folds: int = SEARCH_FOLDS, second: bool = False) -> int:
    """How many candidate fits ``choose_and_fit``'s search runs (for a progress total)."""
    labels = np.asarray(labels, dtype=np.int64)
    present = np.bincount(labels)
    if present[present > 0].min() < 2:
        return 0
    return len(_candidates(thresholds, second)) * len(stratified_folds(labels, folds))
