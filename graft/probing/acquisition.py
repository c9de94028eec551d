"""Which unlabelled images to label next (active learning), as plain NumPy: uncertainty balanced with diversity.

Uncertainty ranks the pool by how unsure the classifier is (``margin``: one minus the gap between the two most
probable classes; ``entropy``: the entropy of the probabilities divided by its maximum, log K). The most uncertain
images alone are often near-copies from one confusing pair of classes, so ``select`` first splits the N picks equally
over the classes the probe predicts (a class predicted for fewer images passes the rest of its share on), and inside
each class takes its ``candidates`` × share most uncertain and picks the share of them by k-center greedy on the
L2-normalised features: each pick is the candidate farthest from everything picked (and labelled) so far. The picks
are listed round-robin over the classes (each class's first, then each one's second ...), so the first rows of a
selection are spread over the classes too. (bench/bench_active.py: with class balance `graft suggest` is ahead of
random at every round on flowers5 and mnist_test10k over 10 seeds; k-center over the N × ``candidates`` most uncertain
of the whole pool fell behind random at 110 labels on flowers5's seeds 5-9. ``balance=False`` keeps that rule.)

At a cold start (fewer than ``COLD_START`` labelled images a class) the probe's uncertainty is mostly noise and
k-center picks outliers: ``select`` then takes the most typical image of each of the N largest k-means clusters that
hold no labelled image (``graft.probing.typical``), which covers the dense regions first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.probing.typical import typical_picks

__all__ = ["CANDIDATES", "COLD_START", "MEASURES", "Selection", "balanced_k_center", "entropy", "k_center_greedy",
           "margin", "normalised", "quotas", "select", "uncertainty"]

MEASURES = ("margin", "entropy")
CANDIDATES = 5  # candidates are this many times the picks (a class's: its share): room to spread, still uncertain
COLD_START = 10  # labelled images a class below which picks are typical, not uncertain (bench/bench_active.py)


def margin(probabilities: np.ndarray) -> np.ndarray:
    """One minus the gap between each row's two largest probabilities: 1 for a tie, 0 for a certain prediction."""
    top = np.sort(np.asarray(probabilities, dtype=np.float64), axis=1)
    return 1.0 - (top[:, -1] - top[:, -2])


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Each row's entropy divided by log K (K classes): 1 for a uniform row, 0 for a certain one."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=1) / np.log(p.shape[1])


def uncertainty(probabilities: np.ndarray, by: str = "margin") -> np.ndarray:
    """``margin`` or ``entropy`` of each row (higher: less sure)."""
    if by not in MEASURES:
        raise ValueError(f"uncertainty measure '{by}' not understood: choose {' or '.join(MEASURES)}")
    return margin(probabilities) if by == "margin" else entropy(probabilities)


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 length (a zero row stays zero), in float32."""
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def k_center_greedy(features: np.ndarray, n: int, first: int = 0, labelled: np.ndarray | None = None,
                    weights: np.ndarray | None = None) -> list[int]:
    """``n`` row indices of ``features`` picked farthest-first (Euclidean): each the row farthest from every row
    picked before it and from ``labelled`` (features already labelled, taken as centres from the start).

    Args:
        first: the row picked first when nothing is labelled (the rest follow by distance).
        weights: one per row (e.g. its uncertainty): each pick maximises distance x weight instead of distance.
    """
    count = len(features)
    n = min(n, count)
    if n <= 0:
        return []
    x = np.asarray(features, dtype=np.float32)
    nearest = np.full(count, np.inf, dtype=np.float32)  # distance from each row to its nearest centre so far
    if labelled is not None and len(labelled):
        for start in range(0, len(labelled), 1024):  # in blocks: a large labelled set never makes an N x L matrix
            block = np.asarray(labelled[start:start + 1024], dtype=np.float32)
            nearest = np.minimum(nearest, _distances(x, block).min(axis=1))
        chosen = [_farthest(nearest, weights)]
    else:
        chosen = [int(first)]
    while True:
        nearest = np.minimum(nearest, _distances(x, x[chosen[-1]][None]).ravel())
        nearest[chosen[-1]] = -np.inf  # never again, even among exact duplicates
        if len(chosen) == n:
            return chosen
        chosen.append(_farthest(nearest, weights))


def _farthest(nearest: np.ndarray, weights: np.ndarray | None) -> int:
    """The row farthest from its nearest centre (times its weight); argmax takes the first of ties: deterministic."""
    if weights is None:
        return int(np.argmax(nearest))
    return int(np.argmax(np.where(np.isneginf(nearest), -np.inf, nearest * weights)))


def _distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.sqrt(np.maximum(squared, 0.0))


@dataclass
class Selection:
    """The picks (row indices into the pool, in the order picked), their uncertainty scores and predicted classes."""

    indices: list[int]
    scores: list[float]
    predicted: list[int]
    candidates: int  # how many of the most uncertain k-center chose from (cold start: the whole pool)
    method: str = "k-center"  # or "typical" (the cold start: too few labels to trust the uncertainty)


def quotas(n: int, counts: np.ndarray) -> np.ndarray:
    """``n`` split as equally as possible over the classes, none above its ``counts`` (the rows predicted as it): each
    next unit goes to the open class holding the fewest, ties to the one with more rows, then the lower index."""
    counts = np.asarray(counts)
    share = np.zeros(len(counts), dtype=np.int64)
    for _ in range(min(n, int(counts.sum()))):
        open_ = np.flatnonzero(counts > share)
        share[min(open_, key=lambda c: (share[c], -counts[c], c))] += 1
    return share


def balanced_k_center(scores: np.ndarray, predicted: np.ndarray, features: np.ndarray, n: int,
                      candidates: float = CANDIDATES, labelled: np.ndarray | None = None,
                      weighted: bool = False) -> tuple[list[int], int]:
    """(``n`` row indices, how many candidates they came from): each predicted class its ``quotas`` share, picked by
    k-center greedy among its ``candidates`` × share highest ``scores``, away from ``labelled`` and the earlier
    classes' picks; listed round-robin over the classes.

    Args:
        features: L2-normalised rows; ``labelled`` likewise (or None).
        weighted: each pick maximises distance x score (not distance alone) among its class's candidates.
    """
    scores, predicted = np.asarray(scores), np.asarray(predicted)
    share = quotas(n, np.bincount(predicted, minlength=int(predicted.max(initial=0)) + 1))
    known = np.zeros((0, features.shape[1]), np.float32) if labelled is None else np.asarray(labelled, np.float32)
    per_class, pooled = [], 0
    for c in np.flatnonzero(share):
        rows = np.flatnonzero(predicted == c)
        rows = rows[np.lexsort((rows, -scores[rows]))][:max(int(share[c]), int(np.ceil(candidates * share[c])))]
        pooled += len(rows)
        picked = [int(rows[i]) for i in k_center_greedy(features[rows], int(share[c]), 0, known,
                                                          scores[rows] if weighted else None)]
        known = np.concatenate([known, features[picked]])
        per_class.append(picked)
    order = [picks[rank] for rank in range(max(map(len, per_class), default=0)) for picks in per_class
             if rank < len(picks)]
    return order, pooled


def select(probabilities: np.ndarray, features: np.ndarray, n: int, by: str = "margin",
           candidates: float = CANDIDATES, labelled: np.ndarray | None = None, weighted: bool = False,
           cold_start: float = COLD_START, balance: bool = True) -> Selection:
    """The ``n`` pool rows whose labels should help most: an equal share per predicted class, each picked by k-center
    greedy on the L2-normalised ``features`` of that class's ``candidates`` × share most uncertain rows (by ``by``;
    ``balanced_k_center``); with fewer than ``cold_start`` labelled images a class, the typical picks of uncovered
    clusters instead.

    Args:
        labelled: features of images already labelled (raw, normalised here): picks keep away from them too.
        weighted: each pick maximises distance x uncertainty (not distance alone) among its class's candidates.
        cold_start: labelled images a class (``labelled`` rows over the classes) below which the picks are typical;
            0: never (without ``labelled`` there is nothing to count: never either).
        balance: False: no class shares, k-center over the ``candidates`` × n most uncertain of the whole pool (the
            rule before class balance, kept for bench/bench_active.py's comparison).
    """
    probabilities = np.asarray(probabilities)
    if len(probabilities) != len(features):
        raise ValueError(f"{len(probabilities)} probability rows for {len(features)} feature rows")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1 (x N), got {candidates}")
    scores = uncertainty(probabilities, by)
    predicted = probabilities.argmax(axis=1)
    if labelled is not None and 0 < len(labelled) < cold_start * probabilities.shape[1]:
        picked = typical_picks(normalised(features), n, normalised(labelled))
        return Selection(picked, [float(scores[i]) for i in picked], [int(predicted[i]) for i in picked],
                         len(scores), "typical")
    centres = None if labelled is None or not len(labelled) else normalised(labelled)
    if balance:
        picked, pooled = balanced_k_center(scores, predicted, normalised(features), n, candidates, centres, weighted)
    else:
        pool = np.lexsort((np.arange(len(scores)), -scores))[:max(n, int(np.ceil(candidates * n)))]
        weights = scores[pool] if weighted else None
        picked = [int(pool[i]) for i in k_center_greedy(normalised(np.asarray(features)[pool]), n, 0, centres, weights)]
        pooled = len(pool)
    return Selection(picked, [float(scores[i]) for i in picked], [int(predicted[i]) for i in picked], pooled)
