"""Duplicates and neighbours among images: exact copies by content hash, near copies and k-NN density by cosine
similarity of feature vectors.

Lives in the data layer (numpy only, usearch optional) so that both ``graft audit`` (analysis) and ``graft evaluate``
(evaluation) can use it without importing upwards. Up to ``EXACT_LIMIT`` vectors the search is exact: blocked
matrix products (``BLOCK`` x ``BLOCK`` similarities at a time, so memory stays bounded whatever N); above it an
approximate HNSW index from usearch (docs/decisions.md "audit: usearch for the approximate neighbour search").
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from graft.errors import GraftError
from graft.utils.files import file_sha256

__all__ = ["BLOCK", "EXACT_LIMIT", "NEAR_SIMILARITY", "Neighbours", "centred_unit", "content_digests",
           "copies_between", "exact_pairs", "neighbours"]

EXACT_LIMIT = 100_000  # vectors: above this, an approximate index instead of all pairs (N² products)
BLOCK = 2048  # rows and columns per similarity block: 2048² float32 = 16 MiB at a time
NEAR_SIMILARITY = 0.95  # cosine of centred features above which two images are called near-duplicates


@dataclass
class Neighbours:
    """Pairs above a similarity and each vector's nearest neighbours.

    ``pairs``: (M, 2) int64 index pairs with i < j, ``similarity`` their cosines (M,), most similar first;
    ``nearest``: (N, k) cosines of each vector's k nearest other vectors, most similar first."""

    pairs: np.ndarray
    similarity: np.ndarray
    nearest: np.ndarray
    method: str  # "exact" (blocked products) or "usearch" (approximate index)


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


def centred_unit(features: np.ndarray) -> np.ndarray:
    """Features minus their mean, L2-normalised, float32: pooled CNN features are all positive, so raw cosines of
    unrelated images are high; centred, a cosine near 1 means the same picture."""
    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def neighbours(unit: np.ndarray, threshold: float = NEAR_SIMILARITY, k: int = 10,
               exact_limit: int = EXACT_LIMIT, block: int = BLOCK) -> Neighbours:
    """Pairs of rows of ``unit`` (L2-normalised) with cosine ≥ ``threshold`` and each row's ``k`` nearest others.

    Exact (blocked products) up to ``exact_limit`` rows, else an approximate usearch index searched for
    ``max(k, 32)`` neighbours per row (a row then has at most that many near-duplicates reported)."""
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
    pairs, sims = [], []
    for start in range(0, n, block):
        rows = unit[start:start + block]
        best = np.full((len(rows), k), -np.inf, dtype=np.float32)
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
                both = np.concatenate([best, sim], 1)
                best = -np.sort(-np.partition(both, both.shape[1] - k, 1)[:, -k:], 1)
        nearest[start:start + len(rows)] = best
    pairs_array = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
    sims_array = np.concatenate(sims).astype(np.float32) if sims else np.zeros(0, np.float32)
    return Neighbours(pairs_array.reshape(-1, 2), sims_array, nearest, "exact")


def _approximate(unit: np.ndarray, threshold: float, k: int) -> Neighbours:
    try:
        from usearch.index import Index
    except ImportError:
        raise GraftError(f"{len(unit)} images need an approximate neighbour index: pip install 'graft[audit]' "
                         "(usearch)") from None
    count = min(max(k, 32) + 1, len(unit))  # + 1: the row itself comes back among its matches
    index = Index(ndim=unit.shape[1], metric="cos", dtype="f32")
    index.add(np.arange(len(unit), dtype=np.uint64), unit)
    matches = index.search(unit, count)
    keys = matches.keys.astype(np.int64)
    sims = (1.0 - matches.distances).astype(np.float32)
    rows = np.repeat(np.arange(len(unit))[:, None], keys.shape[1], 1)
    other = (keys != rows) & (keys >= 0) & (keys < len(unit))  # not itself; unfilled slots are out of range
    masked = np.where(other, sims, -np.inf)
    nearest = -np.sort(-masked, 1)[:, :k]
    chosen = other & (sims >= threshold)
    a, b = rows[chosen], keys[chosen]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # found from both ends: once
    return Neighbours(pairs.reshape(-1, 2), sims[chosen][first], nearest, "usearch")
