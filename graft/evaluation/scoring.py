"""`evaluate`: a run (or an ensemble) on labelled data, written as metrics.json, predictions.csv and a report."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graft.data.discovery import discover
from graft.data.duplicates import copies_between
from graft.data.scan import readable
from graft.data.transforms import TTAViews, parse_tta
from graft.errors import GraftError
from graft.evaluation.inference import ensemble_probabilities, load_ensemble
from graft.evaluation.metrics import classification_metrics
from graft.utils.files import atomic_write, write_json
from graft.utils.memory import out_of_memory_hint
from graft.utils.outputs import output_folder
from graft.utils.text import safe_row

__all__ = ["evaluate", "evaluation_split", "write_predictions"]


def evaluate(run_dirs: str | os.PathLike | list, data: str | os.PathLike, split: str | None = None,
             batch_size: int = 64, workers: int = -1, device: str = "auto", top_k: int = 5,
             output: str | os.PathLike | None = None, tta: str | None = None, report: bool = True, log=None,
             runtime: str = "torch") -> dict:
    """Evaluates a run folder (or an ensemble) on labelled data; writes ``metrics.json``, ``predictions.csv`` and,
    with ``report``, a self-contained ``report.html`` with its plots as PNG files.

    Args:
        run_dirs: the run folder (or several: their probabilities are averaged, an ensemble).
        data: a class-per-folder tree or CSV. With train/val/test splits the ``test`` split is used when present,
            else ``val``; a plain tree is used whole.
        split: force a split (train, val or test).
        output: the folder for the results; default ``RUN/eval-<data folder name>/``.
        tta: test-time augmentation, ``flip``, ``crops`` or ``flip,crops``: metrics["tta"] holds the averaged
            views' numbers beside the plain ones.
        log: where progress lines go (``graft.utils.progress``); None: quiet.
        runtime: torch, onnx or auto, as ``predict``'s (``graft.evaluation.inference.runtime_members``).
        workers: -1 decodes in threads on the CPU; a count: DataLoader workers.
    """
    runs, target, models = load_ensemble(run_dirs, device, label_sets=True)  # one multi-label run, not several
    model = models[0]
    out_dir = Path(output) if output else Path(runs[0]) / f"eval-{_data_name(data)}"
    output_folder(out_dir, "--output", ((data, "data"),))  # before the work: an unwritable folder wastes nothing
    if model.multi_label:
        from graft.evaluation.labelsets import evaluate_label_sets

        with out_of_memory_hint(batch_size):
            return evaluate_label_sets(runs, model, data, out_dir, split, target, tta, batch_size, workers, log,
                                       runtime, report)
    samples, training = _labelled_samples(data, split, model.classes)
    copies = copies_between([path for path, _ in samples], training)  # sizes first: only same-size files are hashed
    if copies and log:
        log(f"warning: {len(copies)} evaluated image(s) are byte-identical copies of training images (e.g. "
            f"{copies[0][0]} = {copies[0][1]}): the numbers are optimistic; graft audit lists them, near copies too")
    with out_of_memory_hint(batch_size):
        plain, augmented, labels = ensemble_probabilities(models, samples, target, tta, batch_size, workers, log,
                                                            runs, runtime)
    metrics = classification_metrics(plain.clamp_min(1e-12).log(), labels, model.classes, top_k)
    metrics.update({"data": str(data), "runs": [str(r) for r in runs], "copies_of_training": len(copies)})
    if tta:
        metrics["tta"] = {"views": parse_tta(tta), "count": len(TTAViews(model.preprocessing, tta)),
                          **classification_metrics(augmented.clamp_min(1e-12).log(), labels, model.classes, top_k)}
    write_json(out_dir / "metrics.json", metrics)
    write_predictions(out_dir / "predictions.csv", samples, plain, model.classes)
    metrics["output"] = str(out_dir / "metrics.json")
    if report:
        from graft.evaluation.report import write_report

        metrics["report"] = str(write_report(out_dir, metrics, samples, plain, augmented if tta else None, runs,
                                             model=model))  # an ensemble's overlays: its first member's
    return metrics


def write_predictions(path: Path, samples: list, probabilities: torch.Tensor, classes: list[str]) -> None:
    """One row per image: path, true class, predicted class, its probability, and the true class's probability.

    Names that a spreadsheet would run as formulas get a leading quote; names that are not UTF-8 are written as their
    bytes on disk."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "confidence", "p_true"])
    confidence, predicted = probabilities.max(1)
    for (file, label), guess, value, row in zip(samples, predicted.tolist(), confidence.tolist(), probabilities):
        writer.writerow(safe_row([file, classes[label], classes[guess], f"{value:.6f}", f"{row[label].item():.6f}"]))
    atomic_write(path, lambda temp: Path(temp).write_text(buffer.getvalue(), encoding="utf-8",
                                                          errors="surrogateescape"))


def _data_name(data) -> str:
    path = Path(data).resolve()
    return path.stem if path.is_file() else path.name


SPLITS = ("train", "val", "test")


def evaluation_split(data, split: str | None = None) -> tuple[list, list[str], list[str]]:
    """What ``evaluate`` measures: (the chosen split's (path, label) samples, its classes, the paths of the data's
    training split when another split is evaluated — to look for copies of them; else none)."""
    if split and split not in SPLITS:  # checked before the data is read: it names an attribute below
        raise GraftError(f"--split '{split}' not understood: choose one of {', '.join(SPLITS)}")
    splits = discover(data, val_fraction=0.5)
    path = Path(data)
    has_splits = path.is_dir() and any((path / name).is_dir() for name in ("train", "val", "test", "valid"))
    training = [path for path, _ in splits.train] if split in ("val", "test") or has_splits and not split else []
    if split:
        chosen = getattr(splits, split)
    elif has_splits:
        chosen = splits.test or splits.val
    else:
        chosen = splits.train + splits.val  # a plain tree: every image
    return chosen, splits.classes, training


def _labelled_samples(data, split: str | None, model_classes: list[str]) -> tuple[list, list[str]]:
    """Samples of the evaluation data with labels re-indexed to the model's class order, and the paths of the data's
    training split when another split is evaluated (``evaluation_split``)."""
    chosen, classes, training = evaluation_split(data, split)
    unknown = sorted(set(classes) - set(model_classes))
    if unknown:
        raise GraftError(f"{data}: classes the model does not know: {', '.join(unknown[:5])}")
    chosen = readable(chosen)
    if not chosen:
        raise GraftError(f"{data}: no readable images to evaluate")
    index = {name: model_classes.index(name) for name in classes}
    return [(path, index[classes[label]]) for path, label in chosen], training
