"""`graft fit --exclude FILE`: the listed files left out or relabelled (graft.data.exclusions), recorded in the run
folder (``excluded.csv``, and a summary in graft.json and metrics.json), and held fixed across --resume."""

from __future__ import annotations

from pathlib import Path

from graft.config import FitConfig
from graft.data.discovery import DatasetSplits
from graft.data.exclusions import apply_exclusions, excluded_text, parse_exclude
from graft.errors import GraftError
from graft.utils.files import atomic_write
from graft.utils.runtime import Runtime

__all__ = ["EXCLUDED", "exclude_listed"]

EXCLUDED = "excluded.csv"


def exclude_listed(config: FitConfig, splits: DatasetSplits, run_dir: Path, resume: bool,
                   runtime: Runtime) -> tuple[DatasetSplits, dict | None]:
    """``splits`` as ``config.data.exclude``'s lists say, and their summary (None without lists).

    A resumed run must train on the images it started with: its lists are the saved config's, and when their
    content changed since (the same files edited), the run is refused rather than continued on other data.
    """
    lists = parse_exclude(config.data.exclude)
    if not lists:
        return splits, None
    splits, record = apply_exclusions(splits, lists)
    text = excluded_text(record)
    if resume:
        _check_unchanged(run_dir, text, lists)
    if runtime.is_main:
        atomic_write(run_dir / EXCLUDED, lambda temp: Path(temp).write_bytes(text.encode("utf-8", "surrogateescape")))
    for line in record.lines():
        runtime.log(line)
    return splits, record.summary()


def _check_unchanged(run_dir: Path, text: str, lists: list[str]) -> None:
    try:
        saved = (run_dir / EXCLUDED).read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        saved = None  # started before it was written: nothing to compare with
    if saved is not None and saved != text:
        raise GraftError(f"{run_dir / EXCLUDED}: the files listed in {', '.join(lists)} changed since the run "
                         "started; --resume continues on the same images: restore the list, or start again with "
                         "--overwrite")
