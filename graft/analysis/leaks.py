"""Near copies of training images in an evaluated split, from features already in the feature cache.

``graft evaluate`` hashes the evaluated files against the training split (byte copies); a resized or re-encoded
copy has other bytes. When the feature cache already holds features of both splits (a probe, fit or audit ran on
this data), the same check as ``graft audit``'s runs on them — candidates by cosine, confirmed at the pixels
(``graft.data.duplicates.near_copies``) — and costs a neighbour search, no extraction. Without such features it is
skipped (it never extracts: evaluate would then cost a whole embedding pass more).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graft.data.duplicates import NEAR_SIMILARITY, centred_unit, content_digests, near_copies, neighbours
from graft.evaluation.scoring import evaluation_split
from graft.probing.cache import INDEX, CacheSpace, cache_folder, file_key
from graft.utils.files import write_csv
from graft.utils.text import safe_record

__all__ = ["LEAKS_FILE", "cached_features", "training_near_copies", "warn_near_copies", "write_leaks"]

LEAKS_FILE = "near_copies_of_training.csv"


def cached_features(paths: list[str], cache: str | os.PathLike | None = None) -> np.ndarray | None:
    """Features of every path, in order, from the first space of the feature cache (by name) that holds them all
    for the files as they are now (path, size and time), or None when no space does."""
    root = cache_folder(cache)
    try:
        keys = [file_key(path) for path in paths]
        spaces = sorted(folder for folder in root.iterdir() if (folder / INDEX).is_file())
    except OSError:  # no cache yet, or a file gone since discovery: nothing cached to use
        return None
    for folder in spaces:
        space = CacheSpace(folder, {})
        found, missing = space.lookup(keys)
        if not missing:
            return space.gather([found[key] for key in keys]).astype(np.float32)
    return None


def training_near_copies(evaluated: list[str], training: list[str], cache: str | os.PathLike | None = None,
                         threshold: float = NEAR_SIMILARITY) -> list[tuple[str, str, float]] | None:
    """(evaluated path, training path, cosine) of each near copy across the two lists, most similar first; None
    when the cache holds no features of them all (the check is skipped, not failed)."""
    if not evaluated or not training:
        return []
    paths = list(evaluated) + list(training)
    features = cached_features(paths, cache)
    if features is None:
        return None
    unit = centred_unit(features)
    found = near_copies(neighbours(unit, threshold, k=1), unit, paths, threshold)
    cut = len(evaluated)
    pairs = [(paths[a], paths[b], float(s)) for (a, b), s in zip(found.pairs.tolist(), found.similarity.tolist())
             if a < cut <= b]  # pairs are (i < j): one evaluated, one training
    named = sorted({path for a, b, _ in pairs for path in (a, b)})
    digest = dict(zip(named, content_digests(named)))
    return [pair for pair in pairs if digest[pair[0]] != digest[pair[1]]]  # byte copies: evaluate's own warning


def write_leaks(folder: str | os.PathLike, pairs: list[tuple[str, str, float]]) -> Path:
    """``near_copies_of_training.csv`` in ``folder``: ``path_a,path_b,similarity,kind`` as ``graft audit``'s
    duplicates.csv (path_a evaluated, path_b training, kind ``near-leak``)."""
    path = Path(folder) / LEAKS_FILE
    rows = [{"path_a": a, "path_b": b, "similarity": round(min(similarity, 1.0), 6), "kind": "near-leak"}
            for a, b, similarity in pairs]
    write_csv(path, ["path_a", "path_b", "similarity", "kind"], [safe_record(row) for row in rows])
    return path


def warn_near_copies(data, split: str | None, folder: str | os.PathLike, log,
                     cache: str | os.PathLike | None = None) -> int | None:
    """``graft evaluate``'s near-copy warning: one line with the count of evaluated images that are near copies of
    training images and the CSV listing the pairs (written into the evaluation's ``folder``); returns the count, or
    None when the check was skipped (no split to compare with, or no cached features)."""
    evaluated, _, training = evaluation_split(data, split)
    pairs = training_near_copies([path for path, _ in evaluated], training, cache)
    if pairs is None or not training:
        return None
    if pairs:
        listed = write_leaks(folder, pairs)
        log(f"warning: {len({a for a, _, _ in pairs})} evaluated image(s) are near copies of training images "
            f"(resized or re-encoded; found in the cached features, confirmed at the pixels): the numbers are "
            f"optimistic; the pairs are in {listed}")
    return len({a for a, _, _ in pairs})
