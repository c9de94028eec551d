"""Duplicates and neighbours among images: exact copies by content hash, near copies and k-NN density by cosine
similarity of feature vectors.

Lives in the data layer (numpy only, faiss optional) so that both ``graft audit`` (analysis) and ``graft evaluate``
(evaluation) can use it without importing upwards. Up to ``EXACT_LIMIT`` vectors the search is exact: blocked
matrix products (``BLOCK`` x ``BLOCK`` similarities at a time, so memory stays bounded whatever N); above it faiss's
inverted lists (docs/decisions.md "audit: faiss inverted lists above 100k vectors").
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from graft.errors import GraftError
from graft.utils.files import file_sha256

__all__ = ["BLOCK", "CANDIDATE_SIMILARITY", "CELLS_PER_ROOT", "COMPARE_SIDE", "EXACT_LIMIT", "NEAR_SIMILARITY",
           "PROBED", "SAME_PICTURE", "SEARCHED", "SIGNATURE_FLOOR", "SIGNATURE_SIDE", "TRAINED_PER_CELL", "Neighbours",
           "candidate_pairs", "centred_unit", "content_digests", "copies_between", "exact_pairs", "image_signature",
           "near_copies", "neighbours", "picture_correlation"]

EXACT_LIMIT = 100_000  # vectors: above this, an approximate index instead of all pairs (N² products)
BLOCK = 2048  # rows and columns per similarity block: 2048² float32 = 16 MiB at a time
NEAR_SIMILARITY = 0.95  # cosine of centred features above which two images are called near-duplicates
CANDIDATE_SIMILARITY = 0.8  # cosine from which mutual nearest neighbours are compared at the pixels
SIGNATURE_SIDE = 16  # pixels a side of the grey thumbnails whose mutual nearest neighbours are compared too
SIGNATURE_FLOOR = 0.9  # correlation of two thumbnails from which mutual nearest neighbours are compared
COMPARE_SIDE = 64  # at most this many pixels a side when two images are compared
SAME_PICTURE = 0.99  # correlation of two images in grey, at the smaller's size, from which they are one picture
CELLS_PER_ROOT = 4  # approximate index: k-means cells = this x sqrt(N) (faiss's guidance: 4 to 16 x sqrt(N))
TRAINED_PER_CELL = 39  # vectors a cell that k-means trains on (faiss's minimum: a sample, so training stays cheap)
PROBED = 8  # cells searched for each row: every planted copy found at 100k and 1M (bench_audit.py --scaling)
SEARCHED = 16  # neighbours searched for each row (at least k): a row reports at most this many near copies


@dataclass
class Neighbours:
    """Pairs above a similarity and each vector's nearest neighbours.

    ``pairs``: (M, 2) int64 index pairs with i < j, ``similarity`` their cosines (M,), most similar first;
    ``nearest``: (N, k) cosines of each vector's k nearest other vectors, most similar first."""

    pairs: np.ndarray
    similarity: np.ndarray
    nearest: np.ndarray
    method: str  # "exact" (blocked products) or "faiss-ivf" (approximate index: faiss's inverted lists)
    nearest_index: np.ndarray | None = None  # (N, k) rows of those nearest vectors, in the same order


def content_digests(paths: list[str], workers: int = 4) -> list[str]:
    """The SHA-256 of each file's bytes (threads: hashing releases the GIL); a file that cannot be read is refused
    by name."""
    def digest(path: str) -> str:
        try:
            return file_sha256(path)
        except OSError as error:
            raise GraftError(f"{path}: cannot read it to hash ({error.strerror or error}); check the file") from None

    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        return list(pool.map(digest, paths))


def exact_pairs(digests: list[str]) -> list[tuple[int, int]]:
    """(first, other) index pairs of equal digests: every copy paired with the first of its group (a group of n
    copies gives n - 1 pairs, not n²)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(digests):
        groups[digest].append(index)
    return [(members[0], other) for members in groups.values() for other in members[1:]]


def copies_between(paths: list[str], reference: list[str]) -> list[tuple[str, str]]:
    """(path, reference path) for each of ``paths`` whose bytes equal a ``reference`` file's. Cheap on large data:
    sizes first (metadata only), then hashes of just the files whose size appears on both sides."""
    def sizes(files: list[str]) -> dict[str, int]:
        found = {}
        for path in files:
            try:
                found[path] = os.stat(path).st_size
            except OSError:  # gone since discovery: not a copy of anything
                continue
        return found

    mine, theirs = sizes(paths), sizes(reference)
    shared = set(mine.values()) & set(theirs.values())
    candidates = [p for p in paths if mine.get(p) in shared]
    others = [p for p in reference if theirs.get(p) in shared]
    if not candidates:
        return []
    by_digest: dict[str, str] = {}
    for digest, path in zip(content_digests(others), others):
        by_digest.setdefault(digest, path)  # the first copy named, as exact_pairs does
    return [(path, by_digest[digest]) for path, digest in zip(candidates, content_digests(candidates))
            if digest in by_digest]


def _grey(path: str):
    """The decoded image in grey, or None when it cannot be decoded (the pair is then judged on its features)."""
    from graft.data.images import load_image

    try:
        return load_image(path).convert("L")
    except (GraftError, OSError, ValueError):
        return None


def _unit(pixels) -> np.ndarray | None:
    vector = np.asarray(pixels, dtype=np.float32).ravel()
    vector = vector - vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-3 * np.sqrt(vector.size) else None  # one flat colour: nothing to compare


def image_signature(path: str, side: int = SIGNATURE_SIDE) -> np.ndarray | None:
    """The decoded image as a ``side`` × ``side`` grey thumbnail, centred and L2-normalised, or None when it cannot
    be decoded or is one flat colour. Only for finding candidates: at 16 px two different digits "1" correlate as
    well as a digit and its re-encoded copy; ``picture_correlation`` decides."""
    from PIL import Image

    grey = _grey(path)
    return None if grey is None else _unit(grey.resize((side, side), Image.BOX))


def picture_correlation(path_a: str, path_b: str, cap: int = COMPARE_SIDE) -> float:
    """Correlation of two decoded images in grey at the smaller one's own size (at most ``cap`` pixels a side):
    a resized, re-encoded copy keeps ≥ 0.99 there (0.993 for 25 px JPEG copies of 28 px digits) where different
    look-alike images fall under it (≤ 0.986 among MNIST's nearest digits). NaN when either cannot be compared."""
    from PIL import Image

    a, b = _grey(path_a), _grey(path_b)
    if a is None or b is None:
        return float("nan")
    small = min((a, b), key=lambda image: image.width * image.height)
    scale = min(1.0, cap / max(small.size))
    size = (max(1, round(small.width * scale)), max(1, round(small.height * scale)))
    first, second = _unit(a.resize(size, Image.LANCZOS)), _unit(b.resize(size, Image.LANCZOS))
    return float(first @ second) if first is not None and second is not None else float("nan")


def _signatures(paths: list[str], workers: int) -> np.ndarray:
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:  # decoding releases the GIL
        found = list(pool.map(image_signature, paths))
    rows = np.zeros((len(paths), SIGNATURE_SIDE ** 2), dtype=np.float32)  # none: a zero row, never a candidate
    for row, signature in enumerate(found):
        if signature is not None:
            rows[row] = signature
    return rows


def _mutual(found: Neighbours, floor: float) -> np.ndarray:
    """(i, j), i < j, of rows that are each other's nearest with similarity ≥ ``floor``."""
    if found.nearest_index is None or not found.nearest_index.shape[1]:
        return np.zeros((0, 2), np.int64)
    first = found.nearest_index[:, 0]
    rows = np.flatnonzero((first >= 0) & (found.nearest[:, 0] >= floor))
    rows = rows[first[first[rows]] == rows]
    return np.stack([np.minimum(rows, first[rows]), np.maximum(rows, first[rows])], 1)


def candidate_pairs(found: Neighbours, signatures: np.ndarray, floor: float = CANDIDATE_SIMILARITY) -> np.ndarray:
    """The pairs worth comparing at the pixels (i < j): those ``found`` above its threshold, mutual nearest
    neighbours (each the other's closest) by features with cosine ≥ ``floor``, and mutual nearest neighbours by
    grey thumbnails (``image_signature``) correlating ≥ ``SIGNATURE_FLOOR``: a copy's nearest image is its
    original, and where features move more than the pictures (digits re-encoded at 25 px) the thumbnails find it."""
    by_picture = neighbours(signatures, 2.0, k=1)  # a threshold over 1: only each row's nearest is wanted
    every = np.concatenate([found.pairs.reshape(-1, 2), _mutual(found, floor), _mutual(by_picture, SIGNATURE_FLOOR)])
    return np.unique(every.astype(np.int64), axis=0).reshape(-1, 2)


def near_copies(found: Neighbours, unit: np.ndarray, paths: list[str], threshold: float = NEAR_SIMILARITY,
                floor: float = CANDIDATE_SIMILARITY, workers: int = 4) -> Neighbours:
    """The near copies among the candidates (``candidate_pairs``), confirmed at the pixels: their decoded images
    correlate ≥ ``SAME_PICTURE`` (``picture_correlation``, then the pair's ``similarity``); a pair that cannot be
    compared keeps the features' verdict (cosine ≥ ``threshold``, its similarity). Features alone miss re-encoded
    copies under the threshold and, where images are alike by nature (digits), call look-alikes copies. Most
    similar first."""
    pairs = candidate_pairs(found, _signatures(paths, workers), floor)
    cosines = np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], 1) if len(pairs) else np.zeros(0, np.float32)
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        pictures = np.array(list(pool.map(lambda pair: picture_correlation(paths[pair[0]], paths[pair[1]]),
                                          pairs.tolist())), dtype=np.float32).reshape(-1)
    judged = np.isnan(pictures)
    keep = np.where(judged, cosines >= threshold, pictures >= SAME_PICTURE)
    similarity = np.where(judged, cosines, pictures)[keep]
    order = np.argsort(-similarity, kind="stable")
    return Neighbours(pairs[keep][order], similarity[order].astype(np.float32), found.nearest, found.method,
                      found.nearest_index)


def centred_unit(features: np.ndarray) -> np.ndarray:
    """Features minus their mean, L2-normalised, float32: pooled CNN features are all positive, so raw cosines of
    unrelated images are high; centred, a cosine near 1 means the same picture."""
    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def neighbours(unit: np.ndarray, threshold: float = NEAR_SIMILARITY, k: int = 10,
               exact_limit: int = EXACT_LIMIT, block: int = BLOCK) -> Neighbours:
    """Pairs of rows of ``unit`` (L2-normalised) with cosine ≥ ``threshold`` and each row's ``k`` nearest others.

    Exact (blocked products) up to ``exact_limit`` rows, else faiss's inverted lists searched for ``max(k, SEARCHED)``
    neighbours per row (a row then has at most that many near-duplicates reported)."""
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    k = max(0, min(k, len(unit) - 1))
    if len(unit) <= exact_limit:
        found = _blocked(unit, threshold, k, block)
    else:
        found = _approximate(unit, threshold, k)
    order = np.argsort(-found.similarity, kind="stable")
    found.pairs, found.similarity = found.pairs[order], found.similarity[order]
    return found


def _blocked(unit: np.ndarray, threshold: float, k: int, block: int) -> Neighbours:
    n = len(unit)
    nearest = np.full((n, k), -np.inf, dtype=np.float32)
    nearest_index = np.full((n, k), -1, dtype=np.int64)
    pairs, sims = [], []
    for start in range(0, n, block):
        rows = unit[start:start + block]
        best = np.full((len(rows), k), -np.inf, dtype=np.float32)
        best_index = np.full((len(rows), k), -1, dtype=np.int64)
        for column in range(0, n, block):
            if column < start and not k:
                continue  # pairs come from the blocks on or above the diagonal; below it only the k-NN needs them
            sim = rows @ unit[column:column + block].T
            if column == start:  # a row is not its own neighbour
                np.fill_diagonal(sim, -np.inf)
            if column >= start:  # each pair once (i < j): blocks on or above the diagonal
                i, j = np.nonzero(sim >= threshold)
                keep = start + i < column + j
                pairs.append(np.stack([start + i[keep], column + j[keep]], 1))
                sims.append(sim[i[keep], j[keep]])
            if k:
                best, best_index = _top_k(best, best_index, sim, column, k)
        nearest[start:start + len(rows)] = best
        nearest_index[start:start + len(rows)] = best_index
    pairs_array = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
    sims_array = np.concatenate(sims).astype(np.float32) if sims else np.zeros(0, np.float32)
    return Neighbours(pairs_array.reshape(-1, 2), sims_array, nearest, "exact", nearest_index)


def _top_k(best: np.ndarray, best_index: np.ndarray, sim: np.ndarray, column: int, k: int):
    """The k largest of the running best and one block's similarities, largest first, with their column rows.

    Only the entries that beat a row's current k-th best can enter: after the first blocks they are a few per row,
    so they are merged by one small sort instead of partitioning the whole block (which cost more than the product)."""
    i, j = np.nonzero(sim > best[:, -1:])
    if len(i) > 4 * best.size:  # the first blocks of a row: most entries are candidates
        return _top_k_all(best, best_index, sim, column, k)
    if not len(i):
        return best, best_index
    n = len(best)
    rows = np.concatenate([np.repeat(np.arange(n), k), i])
    values = np.concatenate([best.ravel(), sim[i, j]])
    columns = np.concatenate([best_index.ravel(), j + column])
    order = np.lexsort((-values, rows))  # by row, then largest first; every row has at least its k old entries
    first = np.searchsorted(rows[order], np.arange(n))
    take = order[first[:, None] + np.arange(k)]
    return values[take], columns[take]


def _top_k_all(best: np.ndarray, best_index: np.ndarray, sim: np.ndarray, column: int, k: int):
    both = np.concatenate([best, sim], 1)
    index = np.concatenate([best_index, np.broadcast_to(np.arange(column, column + sim.shape[1]), sim.shape)], 1)
    top = np.argpartition(both, both.shape[1] - k, 1)[:, -k:]
    values = np.take_along_axis(both, top, 1)
    order = np.argsort(-values, 1, kind="stable")
    return np.take_along_axis(values, order, 1), np.take_along_axis(np.take_along_axis(index, top, 1), order, 1)


def _approximate(unit: np.ndarray, threshold: float, k: int) -> Neighbours:
    """faiss's inverted lists (IVF-Flat; inner product of unit vectors = cosine): the vectors in k-means cells, each
    row compared exactly with the rows of its ``PROBED`` nearest cells (docs/decisions.md "audit: faiss inverted
    lists above 100k vectors")."""
    try:
        import faiss
    except ImportError:
        raise GraftError(f"{len(unit)} images need an approximate neighbour index: pip install 'graft[audit]' "
                         "(faiss-cpu)") from None
    n, dim = unit.shape
    cells = max(1, min(int(CELLS_PER_ROOT * np.sqrt(n)), n // TRAINED_PER_CELL))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, min(n, TRAINED_PER_CELL * cells), replace=False)
    index.train(unit[np.sort(sample)])  # k-means on a sample: enough points a cell at a fraction of the cost
    index.add(unit)
    index.nprobe = min(PROBED, cells)
    sims, keys = index.search(unit, min(max(k, SEARCHED) + 1, n))  # + 1: the row itself comes back among its matches
    return _from_matches(keys.astype(np.int64), sims.astype(np.float32), threshold, k, "faiss-ivf")


def _from_matches(keys: np.ndarray, sims: np.ndarray, threshold: float, k: int, method: str) -> Neighbours:
    """``Neighbours`` from an index's (N, count) matches of every row: the row itself and unfilled slots (keys out of
    range) dropped, each pair above ``threshold`` once."""
    n = len(keys)
    rows = np.repeat(np.arange(n)[:, None], keys.shape[1], 1)
    other = (keys != rows) & (keys >= 0) & (keys < n)  # not itself; unfilled slots are out of range
    masked = np.where(other, sims, -np.inf)
    order = np.argsort(-masked, 1, kind="stable")[:, :k]
    nearest = np.take_along_axis(masked, order, 1)
    nearest_index = np.where(np.isfinite(nearest), np.take_along_axis(keys, order, 1), -1)
    chosen = other & (sims >= threshold)
    a, b = rows[chosen], keys[chosen]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # found from both ends: once
    return Neighbours(pairs.reshape(-1, 2), sims[chosen][first], nearest, method, nearest_index)
