"""`graft suggest`: which unlabelled images to label next, from a trained run and a pool of images.

The pool's features come from the run's own trunk through the feature cache (``graft.probing.extraction``), so a
second call on the same pool reads them back instead of running the network; the run's head turns them into
probabilities. ``graft.probing.acquisition.select`` then picks N: an equal share per predicted class, each uncertain
(margin or entropy) and spread out (k-center greedy on the features, seeded with the run's labelled images' features
so the picks also keep away from what is labelled already), so they are not all one confusing pair. Written:
``suggestions.csv`` (``path,predicted,score``, in the order picked) and ``suggestions.html`` (a self-contained page
of thumbnails). Nothing in the pool is moved or written.
"""

from __future__ import annotations

import csv
import html
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from graft.data.discovery import DatasetSplits, discover
from graft.data.pool import Pool, read_pool
from graft.data.scan import ScanCache, check_files
from graft.errors import GraftError
from graft.evaluation.report import CSS, jpeg_uri, shown_path, thumbnail
from graft.models.run_folder import config_from_card, load, read_card
from graft.probing.acquisition import CANDIDATES, COLD_START, MEASURES, select
from graft.probing.extraction import extract_features
from graft.utils.files import atomic_write
from graft.utils.outputs import output_folder
from graft.utils.runtime import resolve_device
from graft.utils.text import display_name, safe_row

__all__ = ["COLUMNS", "LABELLED_SAMPLE", "Suggestion", "Suggestions", "labelled_images", "pool_probabilities",
           "suggest"]

COLUMNS = ("path", "predicted", "score")
LABELLED_SAMPLE = 5000  # k-center's labelled centres: a seeded sample of at most this many (their extraction costs)


@dataclass
class Suggestion:
    path: str  # absolute
    predicted: str  # the run's class for it now
    score: float  # uncertainty in [0, 1]: 1 is a tie between the two likeliest classes (margin) or uniform (entropy)


@dataclass
class Suggestions:
    """The picks in the order chosen, and what they were chosen from."""

    rows: list[Suggestion]
    pool_size: int
    candidates: int
    by: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    method: str = "k-center"  # or "typical": a cold start (``graft.probing.acquisition.select``)


def suggest(run: str | os.PathLike, pool: str | os.PathLike, n: int = 20, output: str | os.PathLike | None = None,
            by: str = "margin", candidates: float = CANDIDATES, device: str = "auto",
            cache_dir: str | os.PathLike | None = None, workers: int = 0, labelled: str | os.PathLike | None = None,
            log=None) -> Suggestions:
    """The ``n`` images of ``pool`` whose labels should help ``run`` most; with ``output``, writes
    ``suggestions.csv`` and ``suggestions.html`` there.

    Args:
        pool: a folder, a glob pattern or a CSV with a ``path`` column (its paths inside its folder).
        by: ``margin`` (default) or ``entropy``.
        candidates: k-center greedy chooses among the ``candidates`` × share most uncertain images of each predicted
            class (about ``candidates`` × n in all).
        labelled: the labelled images (a dataset folder or manifest) the picks keep away from; None: the data the
            run was fitted on, when it is still there; "": none.
        log: where progress lines go (none without it).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GraftError(f"-n {n!r}: the number of suggestions must be a whole number of at least 1")
    if by not in MEASURES:
        raise GraftError(f"--by '{by}' not understood: choose {' or '.join(MEASURES)}")
    if not isinstance(candidates, (int, float)) or not 1 <= candidates <= 1000:
        raise GraftError(f"--candidates {candidates!r}: choose a number from 1 to 1000 (times N)")
    say = log or (lambda message: None)
    images = read_pool(pool)
    folder = output_folder(output, "-o", _protected(images)) if output is not None else None
    say(f"suggest: {len(images.paths)} images in the pool {images.source}")
    known, notes = labelled_images(run, labelled)
    paths, unreadable = _readable(images, say, known)
    notes += unreadable
    probabilities, features = pool_probabilities(run, paths, images.root, device, cache_dir, workers, say)
    centres = None
    if known:
        say(f"suggest: the picks keep away from {len(known):,} labelled images too")
        _, centres = pool_probabilities(run, known, "", device, cache_dir, workers, say)
    chosen = select(probabilities, features, n, by, candidates, labelled=centres)
    classes = read_card(run)["classes"]
    rows = [Suggestion(paths[i], classes[c], round(s, 6)) for i, s, c in
            zip(chosen.indices, chosen.scores, chosen.predicted)]
    spread = Counter(row.predicted for row in rows)
    how = (f"an equal share per predicted class, each by k-center greedy among that class's most uncertain "
           f"({chosen.candidates} candidates in all, by {by})" if chosen.method == "k-center"
           else f"typicality: fewer than {COLD_START} labelled images a class, so the most typical image of each "
                f"large k-means cluster no labelled image is in (the probe's uncertainty is not used yet)")
    say(f"suggest: {len(rows)} chosen by {how}; predicted "
        f"{', '.join(f'{display_name(k)} {v}' for k, v in spread.most_common())}")
    result = Suggestions(rows, len(paths), chosen.candidates, by, notes=images.notes + notes, method=chosen.method)
    if folder is not None:
        result.files = [str(write_csv(folder / "suggestions.csv", rows)),
                        str(write_page(folder / "suggestions.html", result, run, images))]
        say(f"suggest: wrote {result.files[0]} and {result.files[1]}")
    return result


def _protected(pool: Pool) -> tuple[tuple[str, str], ...]:
    """The folders the output may not overlap: the pool's folder, or each folder a pattern's images lie in."""
    source = Path(pool.source)
    if source.is_dir() or source.is_file() and source.suffix.lower() in (".csv", ".tsv"):
        return ((str(pool.root), "pool"),)
    return tuple((folder, "pool") for folder in sorted({os.path.dirname(path) for path in pool.paths}))


def labelled_images(run: str | os.PathLike, labelled: str | os.PathLike | None) -> tuple[list[str], list[str]]:
    """(a seeded sample of the labelled images' paths, notes): ``labelled``'s images, or with None those of the data
    the run was fitted on (graft.json's ``data.path``, as ``graft export --quantize`` reads it) when still there."""
    if labelled == "":
        return [], []
    config = config_from_card(read_card(run))
    source = labelled if labelled is not None else config.data.path
    if labelled is None and (not source or not Path(source).exists()):
        return [], [f"the run's data ({source or 'not recorded'}) is not there: the picks keep apart from each other "
                    "but not from the labelled images"]
    try:
        splits = discover(source, config.data.val_fraction, config.train.seed, config.data.test_fraction,
                          *((config.data.image_column, config.data.label_column) if labelled is None else (None, None)))
    except GraftError as error:
        if labelled is not None:  # the user named it: their mistake to hear about
            raise
        return [], [f"the run's data could not be read ({error}): the picks keep apart from each other only"]
    paths = sorted({os.path.abspath(path) for split in (splits.train, splits.val, splits.test) for path, _ in split})
    if len(paths) > LABELLED_SAMPLE:
        paths = sorted(random.Random(0).sample(paths, LABELLED_SAMPLE))
    return paths, []


def _readable(pool: Pool, say, labelled: list[str] = ()) -> tuple[list[str], list[str]]:
    """The pool's images that decode (the scan's cache makes a second call cheap) and are not ``labelled``, and a
    note about the rest."""
    known = {os.path.realpath(path) for path in labelled}
    listed = [path for path in pool.paths if os.path.realpath(path) not in known]
    notes = [f"{len(pool.paths) - len(listed)} pool image(s) already labelled left out"] if len(listed) < len(
        pool.paths) else []
    checked = check_files(listed, cache=ScanCache(), log=say)
    paths = [path for path in listed if checked[path][1] is None]
    if len(paths) < len(listed):
        bad = next(path for path in listed if checked[path][1] is not None)
        notes.append(f"{len(listed) - len(paths)} unreadable image(s) left out, e.g. {bad}: {checked[bad][1]}")
        say(f"warning: {notes[-1]}")
    if not paths:
        raise GraftError(f"{pool.source}: none of the pool's {len(pool.paths)} images could be read (or all are "
                         "labelled already)")
    return paths, notes


def pool_probabilities(run: str | os.PathLike, paths: list[str], root: str | os.PathLike | None = None,
                       device: str = "auto", cache_dir: str | os.PathLike | None = None, workers: int = 0,
                       log=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), trunk features (N, D)) of ``paths`` under the run: the features through the cache
    (keyed by the run's trunk weights, so a fine-tuned trunk has entries of its own), the head applied to them."""
    target = resolve_device(device)
    model = load(run, target)
    splits = DatasetSplits(list(model.classes), [(path, 0) for path in paths], [], root=str(root or ""))
    sets = extract_features(splits, model.trunk, model.preprocessing, read_card(run)["backbone"], cache_dir,
                            workers=workers, device=target, log=log)
    features = np.asarray(sets[model.trunk.node].features["train"], dtype=np.float32)
    with torch.no_grad():
        logits = model.head.eval()(torch.from_numpy(features).to(target))
    return torch.softmax(logits.float(), dim=1).cpu().numpy(), features


def write_csv(path: Path, rows: list[Suggestion]) -> Path:
    """``path,predicted,score`` (paths absolute and as on disk, class names spreadsheet-safe)."""
    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows([row.path, *safe_row([row.predicted]), f"{row.score:.6f}"] for row in rows)

    atomic_write(path, write)
    return path


def write_page(path: Path, result: Suggestions, run: str | os.PathLike, pool: Pool) -> Path:
    """A self-contained page (inline CSS, thumbnails as data URIs, no script): the picks in order, with names and
    classes escaped."""
    figures = []
    for rank, row in enumerate(result.rows, start=1):
        shown = html.escape(display_name(shown_path(row.path, pool.root)), quote=True)
        figures.append(f"<figure><img src='{jpeg_uri(thumbnail(row.path))}' alt='{shown}'><figcaption>#{rank} "
                       f"<span class='path'>{shown}</span><br>predicted <b>{html.escape(display_name(row.predicted))}"
                       f"</b><br><span class='muted'>{result.by} {row.score:.3f}</span></figcaption></figure>")
    title = html.escape(display_name(Path(run).name))
    notes = "".join(f"<p class='muted'>{html.escape(display_name(note))}</p>" for note in result.notes)
    chosen = (f"an equal share per predicted class, among each class's most uncertain ({result.candidates} in all, by "
              f"{result.by}) to be far apart from each other"
              if result.method == "k-center" else "as the most typical images of clusters no labelled image is in "
              f"(fewer than {COLD_START} labelled images a class: too few to trust the run's uncertainty)")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graft suggest: {title}</title><style>{CSS}</style></head>
<body>
<h1>Label these next: {title}</h1>
<p class="muted">{len(result.rows)} of {result.pool_size} images from {html.escape(display_name(pool.source))}, chosen
{chosen}. Label them with
<code>graft serve {html.escape(display_name(str(run)))} --label POOL --suggestions suggestions.csv</code>.</p>
{notes}
<div class="grid">{''.join(figures)}</div>
</body></html>
"""
    atomic_write(path, lambda temp: Path(temp).write_text(page, encoding="utf-8"))
    return path
