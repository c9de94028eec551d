"""`graft audit`: label issues, duplicates, leaks across splits and outliers from the cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from graft.cli.options import config_option
from graft.cli.shared import (
    IMAGE_SIZES,
    WORKERS,
    CacheOpt,
    DeviceOpt,
    ImageSizeOpt,
    PretrainedOpt,
    WorkersOpt,
    app,
    err,
    friendly_errors,
    out,
    print_table,
)
from graft.config import ModelConfig
from graft.utils.ranges import check_option
from graft.utils.text import display_name

__all__ = ["audit"]


@app.command()
@friendly_errors
def audit(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for label_issues.csv, duplicates.csv, "
                                                               "outliers.csv, audit.html and audit.json")],
    backbone: Annotated[str, config_option("model.backbone", with_default=True)] = ModelConfig.backbone,
    cut_at: Annotated[Optional[str], typer.Option(help="the node whose features are used (default: pooled)")] = None,
    similarity: Annotated[float, typer.Option(help="cosine of the centred features from which two images are "
                                                   "compared at the pixels as near-duplicates (and called so when "
                                                   "they cannot be decoded)")] = 0.95,
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    cache: CacheOpt = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
):
    """Know your data: likely mislabelled images (cleanlab on out-of-fold probe probabilities), exact and near
    duplicates (and leaks across splits), and outliers; nothing in DATA is changed.

    Example: graft audit ./pets -o pets-audit/ (then open pets-audit/audit.html)
    """
    from graft.analysis.audit import audit as run_audit

    check_option("--image-size", image_size, *IMAGE_SIZES)
    check_option("--workers", workers, *WORKERS)
    check_option("--similarity", similarity, 0, 1, low_open=True)
    result = run_audit(data, backbone, cut_at, output, cache, device, workers, pretrained, image_size,
                       similarity=similarity, log=_plain)
    counts = result.summary["counts"]
    print_table(f"audit of {data}", ["label issues", "exact duplicates", "near duplicates", "across splits"],
                [[counts["label_issues"], counts["exact"], counts["near"], counts["leaks"]]])
    for row in result.label_issues[:10]:
        out.print(Text(display_name(f"{row['path']}: given {row['given']}, suggested {row['suggested']} "
                                    f"({row['score']:.2f})")))
    out.print(Text(display_name(f"wrote {result.output / 'audit.html'} and the CSV files beside it")))


def _plain(line: str) -> None:
    """A progress line as plain text: file and class names may hold brackets rich would read as markup."""
    err.print(Text(display_name(line)))
