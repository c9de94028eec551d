"""`graft audit`: know your data before training on it — mislabelled images, duplicates, leaks across splits and
outliers, all from the cached features.

* **Label issues**: the k-fold linear probe on the features of every labelled image (train, val and test) gives each
  image probabilities from a head that never saw it (``ProbeResult.out_of_fold``, no extra solve); cleanlab's
  confident learning (``find_label_issues``) flags the likely wrong labels. ``label_issues.csv``:
  ``path,given,suggested,score`` — ``score`` is cleanlab's label quality (the held-out probability of the given label
  for ``self_confidence``; lower is more suspicious), rows most suspicious first.
* **Duplicates**: exact copies by SHA-256 of the bytes; near copies found by the centred features (cosine) and by
  small grey thumbnails (mutual nearest neighbours), then confirmed at the pixels: the two images in grey at the
  smaller one's size correlate ≥ 0.99 (``graft.data.duplicates.near_copies``). ``duplicates.csv``:
  ``path_a,path_b,similarity,kind`` with kind ``exact`` or ``near``, and ``-leak`` appended when the two images are
  in different splits (``near-leak``); a near pair's similarity is that pixel correlation (the features' cosine
  where the images could not be decoded).
* **Outliers**: mean cosine distance to the k nearest neighbours (low density: off-domain images, blank frames).
  ``outliers.csv``: ``path,split,score``, most isolated first.
* ``audit.html`` (self-contained, like the report) and ``audit.json`` (counts, thresholds, backbone, node).

Nothing in the data folder is moved or edited: the audit only writes into its output folder.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graft.config import ModelConfig
from graft.data.discovery import discover
from graft.data.duplicates import (CANDIDATE_SIMILARITY, EXACT_LIMIT, NEAR_SIMILARITY, SAME_PICTURE, Neighbours,
                                   centred_unit, content_digests, exact_pairs, near_copies, neighbours)
from graft.data.scan import scan
from graft.errors import GraftError
from graft.evaluation.report import CSS, jpeg_uri, shown_path, thumbnail
from graft.models.surgery import DEFAULT_NODE
from graft.probing.linear import CV_FOLDS, fit_linear_probe
from graft.utils.files import atomic_write, write_csv, write_json
from graft.utils.progress import Progress
from graft.utils.text import display_name, safe_record

__all__ = ["DUPLICATE_COLUMNS", "ISSUE_COLUMNS", "NEIGHBOURS", "OUTLIER_COLUMNS", "RANKINGS", "AuditResult", "audit",
           "duplicate_rows", "find_label_issues", "outlier_scores", "require_cleanlab", "write_audit_page"]

ISSUE_COLUMNS = ("path", "given", "suggested", "score")
DUPLICATE_COLUMNS = ("path_a", "path_b", "similarity", "kind")
OUTLIER_COLUMNS = ("path", "split", "score")
RANKINGS = ("self_confidence", "normalized_margin")
NEIGHBOURS = 10  # k of the k-NN density
SHOWN = 48  # thumbnails per section of the page
LEAK = "-leak"  # appended to a duplicate's kind when its two images are in different splits


@dataclass
class AuditResult:
    """What ``audit`` found (rows as written to the CSV files) and where it wrote them."""

    output: Path
    label_issues: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def require_cleanlab():
    """The ``cleanlab.filter`` and ``cleanlab.rank`` modules, or a one-line error naming the extra."""
    try:
        from cleanlab import filter as cleanlab_filter
        from cleanlab import rank as cleanlab_rank
    except ImportError:
        raise GraftError("graft audit's label check needs cleanlab: pip install 'graft[audit]'") from None
    return cleanlab_filter, cleanlab_rank


def find_label_issues(probabilities: np.ndarray, labels: np.ndarray,
                      ranked_by: str = "self_confidence") -> list[tuple[int, int, float]]:
    """(index, suggested class, label quality) of each image cleanlab's confident learning flags, most suspicious
    first; ``probabilities`` must be out-of-sample (each row from a model that never saw that image)."""
    if ranked_by not in RANKINGS:
        raise GraftError(f"ranking '{ranked_by}' not understood: choose one of {', '.join(RANKINGS)}")
    cleanlab_filter, cleanlab_rank = require_cleanlab()
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    flagged = cleanlab_filter.find_label_issues(labels, probabilities, return_indices_ranked_by=ranked_by, n_jobs=1)
    quality = cleanlab_rank.get_label_quality_scores(labels, probabilities, method=ranked_by)
    suggested = probabilities.argmax(1)
    return [(int(i), int(suggested[i]), float(quality[i])) for i in flagged]


def outlier_scores(nearest: np.ndarray) -> np.ndarray:
    """Mean cosine distance to the k nearest neighbours (``Neighbours.nearest``): high means isolated."""
    if nearest.shape[1] == 0:
        return np.zeros(len(nearest))
    return (1.0 - nearest.astype(np.float64)).mean(1)


def duplicate_rows(paths: list[str], splits: list[str], digests: list[str], found: Neighbours) -> list[dict]:
    """duplicates.csv's rows: exact copies (same bytes) first, then near copies by similarity; a pair of images in
    different splits gets ``-leak`` appended to its kind."""
    rows, exact = [], set()
    for a, b in exact_pairs(digests):
        exact.add((min(a, b), max(a, b)))
        rows.append((a, b, 1.0, "exact"))
    for (a, b), similarity in zip(found.pairs.tolist(), found.similarity.tolist()):
        if (a, b) not in exact:
            rows.append((a, b, similarity, "near"))
    return [{"path_a": paths[a], "path_b": paths[b], "similarity": round(min(similarity, 1.0), 6),
             "kind": kind + (LEAK if splits[a] != splits[b] else "")} for a, b, similarity, kind in rows]


def audit(data: str | os.PathLike, backbone: str = ModelConfig.backbone, cut_at: str | None = None,
          output: str | os.PathLike = "audit", cache: str | None = None, device: str = "auto", workers: int = -1,
          pretrained: bool = True, image_size: int | None = None, folds: int = CV_FOLDS,
          similarity: float = NEAR_SIMILARITY, ranked_by: str = "self_confidence", log=None) -> AuditResult:
    """Audits a labelled dataset (class folders or a CSV manifest) and writes ``label_issues.csv``,
    ``duplicates.csv``, ``outliers.csv``, ``audit.html`` and ``audit.json`` into ``output``.

    Args:
        cut_at: the one node whose features are used (default: the pooled features).
        folds: of the out-of-fold probe (capped by the smallest class).
        similarity: cosine of the centred features from which two images count as near-duplicates.
        ranked_by: cleanlab's ranking, ``self_confidence`` or ``normalized_margin``.
        log: where progress lines go; None: quiet.
    """
    from graft.probing.cache import cache_folder
    from graft.probing.leaderboard import stage_features
    from graft.utils.outputs import output_folder

    if cut_at and "," in cut_at:
        raise GraftError(f"--cut-at '{cut_at}': the audit uses one node's features; give one node")
    if not 0 < similarity <= 1:
        raise GraftError(f"--similarity {similarity}: a cosine in (0, 1], e.g. {NEAR_SIMILARITY}")
    require_cleanlab()  # before the work: a missing extra costs nothing
    out_dir = output_folder(output, "--output", ((data, "data"), (cache_folder(cache), "feature cache")))
    splits = discover(data)
    scan(splits, log=log)
    node = cut_at or DEFAULT_NODE
    _, _, sets = stage_features(splits, backbone, [node], image_size, "avg", pretrained, cache, device,
                                workers=workers, log=log)
    features = sets[node]
    names = [name for name in ("train", "val", "test") if len(features.labels[name])]
    x = np.concatenate([features.features[name] for name in names]).astype(np.float32)
    y = np.concatenate([features.labels[name] for name in names])
    paths = [os.path.abspath(p) for name in names for p in features.paths[name]]
    split_of = [name for name in names for _ in features.paths[name]]
    issues, probe = _label_issues(x, y, features.classes, folds, device, ranked_by, log)
    digests = _digests(paths, log)
    found = _neighbours(x, paths, similarity, log)
    result = AuditResult(out_dir)
    result.label_issues = [{"path": paths[i], "given": features.classes[y[i]], "suggested": features.classes[s],
                            "score": round(score, 6)} for i, s, score in issues]
    result.duplicates = duplicate_rows(paths, split_of, digests, found)
    scores = outlier_scores(found.nearest)
    result.outliers = [{"path": paths[i], "split": split_of[i], "score": round(float(scores[i]), 6)}
                       for i in np.argsort(-scores, kind="stable")]
    result.summary = _summary(result, data, backbone, node, pretrained, probe, found, similarity, ranked_by, names,
                              split_of, y, features.classes)
    _write_files(result, data, features.classes, paths, y)
    if log:
        log(f"audit: {len(result.label_issues)} label issue(s), {len(result.duplicates)} duplicate pair(s) "
            f"({result.summary['counts']['leaks']} across splits); wrote {out_dir / 'audit.html'}")
    return result


def _label_issues(x, y, classes, folds: int, device: str, ranked_by: str, log):
    from graft.utils.runtime import resolve_device

    counts = np.bincount(y, minlength=len(classes))
    if counts[counts > 0].min() < 2:
        raise GraftError(f"class '{classes[int(np.flatnonzero(counts == 1)[0])]}' has one image: the out-of-fold "
                         "probe needs at least two per class; add images or remove the class")
    if log:
        log(f"audit: {folds}-fold probe on {len(y)} images (out-of-fold probabilities for the label check)")
    with Progress("audit: out-of-fold probe", 1, "solves", log, log is not None) as progress:
        probe = fit_linear_probe(x, y, classes=len(classes), cv=folds, device=resolve_device(device))
        progress.update(1)
    if probe.out_of_fold is None:
        raise GraftError("the probe could not cross-validate (a class with fewer than two images)")
    if log:
        log(f"audit: {probe.selection} probe, held-out accuracy {probe.cv_accuracy:.4f}; confident learning "
            f"(cleanlab, ranked by {ranked_by})")
    return find_label_issues(probe.out_of_fold, y, ranked_by), probe


def _digests(paths: list[str], log) -> list[str]:
    digests: list[str] = []
    chunk = 256
    if log:
        log(f"audit: content hashes of {len(paths)} images (exact duplicates)")
    with Progress("audit: content hashes", len(paths), "images", log, log is not None) as progress:
        for start in range(0, len(paths), chunk):
            digests += content_digests(paths[start:start + chunk])
            progress.update(len(digests))
    return digests


def _neighbours(x: np.ndarray, paths: list[str], similarity: float, log) -> Neighbours:
    """Each image's nearest neighbours (outliers) and the near copies: candidates from the features, confirmed at
    the pixels (``near_copies``)."""
    if log:
        search = "blocked exact products" if len(x) <= EXACT_LIMIT else "faiss inverted lists (approximate)"
        log(f"audit: neighbour search over {len(x)} images ({search}): near duplicates and outliers")
    unit = centred_unit(x)
    with Progress("audit: neighbour search", len(x), "images", log, log is not None) as progress:
        found = neighbours(unit, similarity, NEIGHBOURS)
        progress.update(len(x))
    if log:
        log("audit: near-duplicate candidates (features and grey thumbnails) compared at the pixels")
    return near_copies(found, unit, paths, similarity)


def _summary(result: AuditResult, data, backbone, node, pretrained, probe, found, similarity, ranked_by, names,
             split_of, y, classes) -> dict:
    kinds = Counter(row["kind"] for row in result.duplicates)
    return {
        "data": str(data), "backbone": backbone, "node": node, "pretrained": pretrained,
        "images": {name: split_of.count(name) for name in names},
        "counts": {"label_issues": len(result.label_issues), "duplicates": len(result.duplicates),
                   "exact": sum(v for k, v in kinds.items() if k.startswith("exact")),
                   "near": sum(v for k, v in kinds.items() if k.startswith("near")),
                   "leaks": sum(v for k, v in kinds.items() if k.endswith(LEAK)), "outliers_ranked": len(split_of)},
        "thresholds": {"near_similarity": similarity, "candidate_similarity": CANDIDATE_SIMILARITY,
                       "same_picture": SAME_PICTURE, "neighbours": NEIGHBOURS, "features": "centred, L2-normalised"},
        "label_check": {"method": "cleanlab.filter.find_label_issues", "ranked_by": ranked_by,
                        "probe": probe.selection, "l2": probe.l2, "held_out_accuracy": probe.cv_accuracy,
                        "temperature": probe.temperature},
        "neighbour_search": found.method, "classes": list(classes),
        "files": {"label_issues": "label_issues.csv", "duplicates": "duplicates.csv", "outliers": "outliers.csv",
                  "page": "audit.html"},
    }


def _write_files(result: AuditResult, data, classes: list[str], paths: list[str], y: np.ndarray) -> None:
    out_dir = result.output
    for name, columns, rows in (("label_issues.csv", ISSUE_COLUMNS, result.label_issues),
                                ("duplicates.csv", DUPLICATE_COLUMNS, result.duplicates),
                                ("outliers.csv", OUTLIER_COLUMNS, result.outliers)):
        write_csv(out_dir / name, list(columns), [safe_record(row) for row in rows])  # names are data: quoted
    class_of = {path: classes[label] for path, label in zip(paths, y.tolist())}
    write_audit_page(out_dir / "audit.html", result, data, class_of)
    write_json(out_dir / "audit.json", result.summary)


def _escaped(text) -> str:
    return html.escape(display_name(str(text)), quote=True)


def _figure(path: str, data, caption: str) -> str:
    shown = _escaped(shown_path(path, data))
    return (f"<figure><img src='{jpeg_uri(thumbnail(path))}' alt='{shown}'><figcaption><span class='path'>{shown}"
            f"</span><br>{caption}</figcaption></figure>")


def _class_table(result: AuditResult, class_of: dict[str, str]) -> str:
    issues = Counter(row["given"] for row in result.label_issues)
    duplicates = Counter(class_of.get(row["path_b"], "?") for row in result.duplicates)
    outliers = Counter(class_of.get(row["path"], "?") for row in result.outliers[:SHOWN])
    images = Counter(class_of.values())
    body = "".join(f"<tr><td>{_escaped(name)}</td><td>{images[name]}</td><td>{issues[name]}</td>"
                   f"<td>{duplicates[name]}</td><td>{outliers[name]}</td></tr>" for name in sorted(images))
    return (f"<table><tr><th>class</th><th>images</th><th>label issues</th><th>duplicates</th>"
            f"<th>among the {SHOWN} top outliers</th></tr>{body}</table>")


def write_audit_page(path: Path, result: AuditResult, data, class_of: dict[str, str]) -> Path:
    """``audit.html``: one self-contained page (inline CSS, thumbnails as data URIs, no scripts); every file and
    class name is escaped (they are data)."""
    issues = "".join(_figure(row["path"], data, f"given <b>{_escaped(row['given'])}</b><br><span class='wrong'>"
                                                f"suggested {_escaped(row['suggested'])}</span> {row['score']:.2f}")
                     for row in result.label_issues[:SHOWN])
    pairs = "".join(f"<figure class='mistake'><div class='pair'><img src='{jpeg_uri(thumbnail(row['path_a']))}' "
                    f"alt='{_escaped(shown_path(row['path_a'], data))}'><img src='{jpeg_uri(thumbnail(row['path_b']))}'"
                    f" alt='{_escaped(shown_path(row['path_b'], data))}'></div><figcaption><b>{_escaped(row['kind'])}"
                    f"</b> {row['similarity']:.3f}<br><span class='path'>{_escaped(shown_path(row['path_a'], data))}"
                    f"<br>{_escaped(shown_path(row['path_b'], data))}</span></figcaption></figure>"
                    for row in result.duplicates[:SHOWN])
    outliers = "".join(_figure(row["path"], data, f"{_escaped(row['split'])}, distance {row['score']:.3f}")
                       for row in result.outliers[:SHOWN // 2])
    summary = result.summary
    counts = summary["counts"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graft audit: {_escaped(data)}</title><style>{CSS}</style></head>
<body>
<h1>graft audit: {_escaped(data)}</h1>
<p class="muted">{sum(summary['images'].values())} images; features of {_escaped(summary['backbone'])} at
{_escaped(summary['node'])}; label check: {_escaped(summary['label_check']['method'])} on out-of-fold probabilities
({_escaped(summary['label_check']['probe'])} probe); near-duplicates: nearest neighbours by features
({_escaped(summary['neighbour_search'])} search) and by grey thumbnails, confirmed when the two images correlate
≥ {SAME_PICTURE} in grey at the smaller one's size. Nothing in the data was changed.</p>
<h2 id="per-class">Per class</h2>
{_class_table(result, class_of)}
<h2 id="labels">Possible label issues ({counts['label_issues']})</h2>
<p class="muted">Most suspicious first; the number is cleanlab's label quality (lower: more suspicious).
All rows: label_issues.csv.</p>
<div class="grid">{issues or "<p>None found.</p>"}</div>
<h2 id="duplicates">Duplicates ({counts['exact']} exact, {counts['near']} near, {counts['leaks']} across splits)</h2>
<p class="muted">A kind ending in -leak pairs images of different splits. All rows: duplicates.csv.</p>
<div class="grid">{pairs or "<p>None found.</p>"}</div>
<h2 id="outliers">Most isolated images</h2>
<p class="muted">Mean cosine distance to the {NEIGHBOURS} nearest images. All rows: outliers.csv.</p>
<div class="grid">{outliers or "<p>None.</p>"}</div>
</body></html>
"""
    page = display_name(page)
    atomic_write(path, lambda temp: Path(temp).write_text(page, encoding="utf-8"))
    return path
