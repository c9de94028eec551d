"""`graft predict` and `graft evaluate`: using and measuring trained runs."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from graft.cli.shared import (
    BATCH_SIZES,
    TOP_K,
    DeviceOpt,
    RuntimeOpt,
    TTAOpt,
    app,
    check_options,
    check_runtime,
    err,
    friendly_errors,
    out,
    print_label_set_classes,
    print_table,
)
from graft.errors import GraftError

__all__ = ["evaluate", "predict"]


def _split_runs(paths: list[str]) -> tuple[list[str], list[str]]:
    """Leading arguments that are run folders (they hold graft.json) vs the rest."""
    runs = []
    for path in paths:
        if (Path(path) / "graft.json").is_file():
            runs.append(path)
        else:
            break
    if not runs:
        raise GraftError(f"{paths[0] if paths else 'RUN'}: not a run folder (no graft.json); give the folder fit wrote")
    return runs, paths[len(runs):]


@app.command()
@friendly_errors
def predict(
    paths: Annotated[list[str], typer.Argument(help="RUN [RUN...] then images, folders or glob patterns")],
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 3,
    output_format: Annotated[str, typer.Option("--format", help="table, csv, json or jsonl (JSON lines)")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write here instead of stdout")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    device: DeviceOpt = "auto",
    tta: TTAOpt = None,
    runtime: RuntimeOpt = "auto",
):
    """Classify images with a trained run (several runs: an ensemble). csv, json and jsonl rows are printed as each
    batch is done.

    Example: graft predict runs/pets img.jpg more_images/ --top-k 3 --format csv
    """
    from graft.evaluation.inference import iter_predictions

    check_options(("--top-k", top_k, *TOP_K), ("--batch-size", batch_size, *BATCH_SIZES))
    check_runtime(runtime)
    runs, inputs = _split_runs(paths)
    if not inputs:
        raise GraftError("no images given: graft predict RUN IMAGE_OR_FOLDER [...]")
    if output_format not in ("table", "csv", "json", "jsonl"):
        raise GraftError(f"format '{output_format}' not understood: choose table, csv, json or jsonl")
    rows = iter_predictions(runs, inputs, top_k=top_k, batch_size=batch_size, device=device, tta=tta,
                            runtime=runtime, log=err.print)
    if output_format == "table" and output is None:  # a table needs every row for its column widths
        print_table("predictions", ["file", "labels", "probabilities", "error"],
                    [[r.path, ", ".join(r.labels), ", ".join(f"{p:.3f}" for p in r.probabilities), r.error]
                     for r in rows])
        return
    counted = _Counted(rows)
    top_k = _columns(runs[0], top_k)
    chunks = _prediction_text(counted, top_k, "csv" if output_format == "table" else output_format)
    if output:
        from graft.utils.files import atomic_write

        atomic_write(output, lambda temp: _write_chunks(chunks, temp))
        err.print(f"wrote {counted.count} predictions to {output}")
    else:
        for chunk in chunks:
            _print_raw(chunk)


def _columns(run: str, top_k: int) -> int:
    """The label/probability column pairs of the CSV: top-k, or for a multi-label run one per class (a set may hold
    every label)."""
    from graft.models.run_folder import read_card

    card = read_card(run)
    return len(card["classes"]) if card.get("multi_label") else top_k


class _Counted:
    """Passes rows through, counting them."""

    def __init__(self, rows):
        self.rows, self.count = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.count += 1
            yield row


def _prediction_text(rows, top_k: int, kind: str):
    """The text of ``rows`` in pieces, one per row (plus header or brackets), made as each row arrives."""
    from graft.utils.text import safe_row

    if kind == "jsonl":
        yield from (json.dumps(row.__dict__) + "\n" for row in rows)
        return
    if kind == "json":  # a JSON array, still streamed: one row per line
        opening = "[\n"
        for row in rows:
            yield f"{opening}  {json.dumps(row.__dict__)}"
            opening = ",\n"
        yield "[]\n" if opening == "[\n" else "\n]\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path"] + [f"{name}{i + 1}" for i in range(top_k) for name in ("label", "prob")] + ["error"])
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        pairs = [v for label, prob in zip(row.labels, row.probabilities) for v in (label, f"{prob:.6f}")]
        writer.writerow(safe_row([row.path] + pairs + [""] * (2 * top_k - len(pairs)) + [row.error]))
        yield buffer.getvalue()


def _write_chunks(chunks, path: str) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:  # non-UTF-8 names: bytes
        for chunk in chunks:
            handle.write(chunk)


def _print_raw(text: str) -> None:
    """Writes ``text`` to stdout now; a non-UTF-8 file name goes out as the bytes it has on disk."""
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()  # what was printed as text before comes first
    stream.write(text.encode("utf-8", "surrogateescape"))
    stream.flush()


@app.command()
@friendly_errors
def evaluate(
    paths: Annotated[list[str], typer.Argument(help="RUN [RUN...] then the labelled DATA folder or CSV")],
    split: Annotated[Optional[str], typer.Option(help="train, val or test (default: test, else val, else all)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder for the results")] = None,
    device: DeviceOpt = "auto",
    tta: TTAOpt = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.html and PNG plots")] = True,
    runtime: RuntimeOpt = "auto",
):
    """Accuracy, top-k, per-class precision/recall/F1, calibration and the confusion matrix on labelled data; writes
    metrics.json, predictions.csv and a self-contained report.html (several runs: an ensemble). A multi-label run on a
    CSV of label sets: mAP, micro/macro F1 at its thresholds, exact match and per-class AP, F1 and thresholds.

    Example: graft evaluate runs/pets ./pets_test --tta flip
    """
    import os

    from graft.analysis.leaks import warn_near_copies
    from graft.evaluation.scoring import evaluate as evaluate_runs
    from graft.utils.distributed import launched

    check_options(("--top-k", top_k, *TOP_K))
    check_runtime(runtime)
    if launched() and os.environ["RANK"] != "0":
        return  # under torchrun rank 0 evaluates and writes; evaluation is one pass, not worth a sharded gather
    runs, rest = _split_runs(paths)
    if len(rest) != 1:
        raise GraftError("give exactly one DATA after the run folder(s): graft evaluate RUN DATA")
    metrics = evaluate_runs(runs, rest[0], split=split, top_k=top_k, device=device, output=output, tta=tta,
                            report=report, log=err.print, runtime=runtime)
    warn_near_copies(rest[0], split, Path(metrics["output"]).parent, err.print)
    if metrics.get("multi_label"):
        _print_label_set_metrics(metrics)
        return
    top_key = next(k for k in metrics if k.startswith("top") and k.endswith("_accuracy"))
    for name, numbers in [("", metrics)] + ([("with TTA ", metrics["tta"])] if "tta" in metrics else []):
        out.print(f"{name}accuracy {numbers['accuracy']:.4f}   {top_key.replace('_', ' ')} {numbers[top_key]:.4f}   "
                  f"macro F1 {numbers['macro_f1']:.4f}   ECE {numbers['ece']:.4f}   ({metrics['images']} images)")
    print_table("per class", ["class", "precision", "recall", "F1", "support"],
                [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]] for c in metrics["per_class"]])
    classes = metrics["classes"]
    print_table("confusion matrix (rows: true, columns: predicted)", ["true \\ pred"] + classes,
                [[name] + row for name, row in zip(classes, metrics["confusion_matrix"])])
    out.print(f"wrote {metrics['output']}" + (f" and {metrics['report']}" if "report" in metrics else ""))


def _print_label_set_metrics(metrics: dict) -> None:
    """A multi-label evaluation: mAP and F1 at the run's thresholds, plain and with TTA, then per class."""
    for name, numbers in [("", metrics)] + ([("with TTA ", metrics["tta"])] if "tta" in metrics else []):
        ap = "-" if numbers["mAP"] is None else f"{numbers['mAP']:.4f}"
        out.print(f"{name}mAP {ap}   micro F1 {numbers['micro_f1']:.4f}   macro F1 {numbers['macro_f1']:.4f}   "
                  f"exact match {numbers['exact_match']:.4f}   ({metrics['images']} images, multi-label)")
    print_label_set_classes("per class (F1 at the run's thresholds)", metrics["per_class"])
    out.print(f"wrote {metrics['output']}" + (f" and {metrics['report']}" if "report" in metrics else ""))
