"""Cold-start picks for active learning: typical images of uncovered clusters (TypiClust, Hacohen et al. 2022).

With two labels a class the probe's uncertainty mostly measures where its few labels happen to lie, and the most
uncertain images are often outliers, so labelling them teaches little; k-center greedy on its own picks outliers
too (the farthest points). What helps at a tiny budget is covering the data's dense regions: k-means the pool into
(labelled + N) clusters, take the N largest clusters that hold no labelled image, and from each the most typical
image (the highest inverse mean distance to its nearest neighbours inside the cluster). Plain NumPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FIT_SAMPLE", "kmeans", "typical_picks", "typicality"]

FIT_SAMPLE = 10_000  # k-means and typicality run on a seeded sample of at most this many pool rows (their cost)
NEIGHBOURS = 20  # typicality: mean distance to this many nearest neighbours in the cluster (TypiClust's choice)
ITERATIONS = 30


def _squared(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :], 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = ITERATIONS) -> np.ndarray:
    """Cluster index of each row of ``x`` (k-means++ seeding, then Lloyd's iterations until nothing moves); an
    emptied cluster is reseeded at the row farthest from its centre."""
    x = np.asarray(x, dtype=np.float32)
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    nearest = _squared(x, centres[0][None]).ravel()
    for _ in range(1, k):  # k-means++: each next centre drawn with probability ∝ squared distance to the nearest
        total = nearest.sum()
        pick = rng.choice(len(x), p=nearest / total) if total > 0 else rng.integers(len(x))
        centres.append(x[pick])
        nearest = np.minimum(nearest, _squared(x, x[pick][None]).ravel())
    centres = np.stack(centres)
    assigned = np.full(len(x), -1)
    for _ in range(iterations):
        distances = _squared(x, centres)
        moved = distances.argmin(1)
        if np.array_equal(moved, assigned):
            break
        assigned = moved
        for cluster in range(k):
            members = assigned == cluster
            if members.any():
                centres[cluster] = x[members].mean(0)
            else:
                far = int(distances[np.arange(len(x)), assigned].argmax())
                centres[cluster], assigned[far] = x[far], cluster
    return assigned


def typicality(x: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """One over each row's mean Euclidean distance to its ``neighbours`` nearest other rows (a lone row: 1)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 2:
        return np.ones(len(x))
    k = min(neighbours, len(x) - 1)
    distances = np.sqrt(_squared(x, x))
    np.fill_diagonal(distances, np.inf)
    mean = np.sort(distances, axis=1)[:, :k].mean(1)
    return 1.0 / np.maximum(mean, 1e-12)


def typical_picks(features: np.ndarray, n: int, labelled: np.ndarray | None = None, seed: int = 0,
                  weights: np.ndarray | None = None) -> list[int]:
    """``n`` row indices of ``features`` (the pool, L2-normalised): the most typical row of each of the ``n``
    largest clusters holding no labelled row (then of the largest others, when too few are uncovered).

    Args:
        labelled: features of the images already labelled (L2-normalised), clustered with the pool.
        weights: one per pool row (e.g. its uncertainty): inside a cluster the pick maximises typicality x weight.
    """
    x = np.asarray(features, dtype=np.float32)
    n = min(n, len(x))
    if n <= 0:
        return []
    rows = np.arange(len(x))
    if len(x) > FIT_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), FIT_SAMPLE, replace=False))
    known = np.zeros((0, x.shape[1]), np.float32) if labelled is None else np.asarray(labelled, np.float32)
    clusters = kmeans(np.concatenate([x[rows], known]), len(known) + n, seed)
    pool_clusters, covered = clusters[:len(rows)], set(clusters[len(rows):].tolist())
    sizes = np.bincount(clusters)
    order = sorted(set(pool_clusters.tolist()), key=lambda c: (c in covered, -sizes[c], c))
    picks = []
    for cluster in order[:n]:
        members = rows[pool_clusters == cluster]
        score = typicality(x[members]) * (1.0 if weights is None else np.asarray(weights)[members])
        picks.append(int(members[int(np.argmax(score))]))
    if len(picks) < n:  # fewer non-empty clusters than picks (many duplicates): the rest by typicality overall
        rest = np.setdiff1d(rows, picks)
        picks += [int(i) for i in rest[np.argsort(-typicality(x[rest]), kind="stable")[:n - len(picks)]]]
    return picks
