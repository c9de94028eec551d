"""`evaluate` on a multi-label run: the model's sigmoid probabilities on a CSV of label sets, scored at the thresholds
its graft.json holds (``graft.evaluation.multilabel``); written as metrics.json, predictions.csv (the true and
predicted sets and every class's probability) and a report.html with the per-class table (AP, F1 at the thresholds)
and the precision-recall curves."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np

from graft.data.discovery import discover
from graft.data.scan import readable
from graft.data.transforms import TTAViews, parse_tta
from graft.errors import GraftError
from graft.evaluation.inference import ensemble_probabilities
from graft.evaluation.multilabel import label_sets, multilabel_metrics, plot_precision_recall
from graft.utils.files import atomic_write, write_json
from graft.utils.plotting import plots_skipped
from graft.utils.text import display_name, safe_row

__all__ = ["evaluate_label_sets", "labelled_sets", "write_label_set_report"]

SPLITS = ("train", "val", "test")


def labelled_sets(data, split: str | None, model_classes: list[str]) -> tuple[list[str], np.ndarray]:
    """The readable images of ``data`` (a CSV of label sets; ``split`` or every row) and their (N, model classes)
    multi-hot targets in the model's class order."""
    if split and split not in SPLITS:
        raise GraftError(f"--split '{split}' not understood: choose one of {', '.join(SPLITS)}")
    splits = discover(data, val_fraction=0.5, labels="multi")
    unknown = sorted(set(splits.classes) - set(model_classes))
    if unknown:
        raise GraftError(f"{data}: classes the model does not know: {', '.join(unknown[:5])}")
    chosen = readable(getattr(splits, split) if split else splits.train + splits.val + splits.test)
    if not chosen:
        raise GraftError(f"{data}: no readable images to evaluate")
    paths = [path for path, _ in chosen]
    targets = np.zeros((len(paths), len(model_classes)), dtype=np.float32)
    targets[:, [model_classes.index(name) for name in splits.classes]] = splits.targets(paths)
    return paths, targets


def evaluate_label_sets(runs: list, model, data, out_dir: Path, split: str | None, target, tta: str | None,
                        batch_size: int, workers: int, log, runtime: str, report: bool) -> dict:
    """``graft.evaluation.scoring.evaluate`` for one multi-label run (``model``, loaded from ``runs[0]``)."""
    paths, targets = labelled_sets(data, split, model.classes)
    plain, augmented, _ = ensemble_probabilities([model], [(path, 0) for path in paths], target, tta, batch_size,
                                                 workers, log, runs, runtime)
    metrics = multilabel_metrics(plain.numpy(), targets, model.classes, model.thresholds)
    metrics.update({"data": str(data), "runs": [str(r) for r in runs], "split": split or "all"})
    if tta:
        metrics["tta"] = {"views": parse_tta(tta), "count": len(TTAViews(model.preprocessing, tta)),
                          **multilabel_metrics(augmented.numpy(), targets, model.classes, model.thresholds)}
    write_json(out_dir / "metrics.json", metrics)
    _write_predictions(out_dir / "predictions.csv", paths, targets, plain.numpy(), model.classes, model.thresholds)
    metrics["output"] = str(out_dir / "metrics.json")
    if report:
        metrics["report"] = str(write_label_set_report(out_dir, metrics, plain.numpy(), targets, runs))
    return metrics


def _names(row, classes: list[str]) -> str:
    return " ".join(name for name, present in zip(classes, row) if present)


def _write_predictions(path: Path, paths: list[str], targets: np.ndarray, probabilities: np.ndarray,
                       classes: list[str], thresholds) -> None:
    """One row per image: path, the true set, the predicted set (space-separated, fastai's convention) and each
    class's probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(safe_row(["path", "true", "predicted", *(f"p_{name}" for name in classes)]))
    for file, truth, predicted, row in zip(paths, targets > 0.5, label_sets(probabilities, thresholds), probabilities):
        writer.writerow(safe_row([file, _names(truth, classes), _names(predicted, classes),
                                  *(f"{value:.6f}" for value in row)]))
    atomic_write(path, lambda temp: Path(temp).write_text(buffer.getvalue(), encoding="utf-8",
                                                          errors="surrogateescape"))


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"  # AP/mAP are None without a positive image


def _summary_table(metrics: dict) -> str:
    rows = [("plain", metrics)] + ([(f"TTA ({', '.join(metrics['tta']['views'])})", metrics["tta"])]
                                   if "tta" in metrics else [])
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{_number(m['mAP'])}</td><td>{m['micro_f1']:.4f}</td>"
                   f"<td>{m['macro_f1']:.4f}</td><td>{m['exact_match']:.4f}</td><td>{m['loss']:.4f}</td></tr>"
                   for name, m in rows)
    return ("<table class='numbers'><tr><th></th><th>mAP</th><th>micro F1</th><th>macro F1</th><th>exact match</th>"
            f"<th>loss (BCE)</th></tr>{body}</table>")


def _classes_table(metrics: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(c['class'])}</td><td>{_number(c['ap'], 3)}</td>"
                   f"<td>{c['threshold']:.3f}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
                   f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>" for c in metrics["per_class"])
    return ("<table><tr><th>class</th><th>AP</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>images</th></tr>{body}</table>")


def write_label_set_report(out_dir: Path, metrics: dict, probabilities: np.ndarray, targets: np.ndarray,
                           runs: list) -> Path:
    """``report.html`` for a multi-label evaluation: the summary, the per-class table (AP; precision, recall and F1
    at the run's thresholds) and the precision-recall curves (``precision_recall.png``, also embedded)."""
    from graft.evaluation.report import CSS, plot_training_curves

    classes = [display_name(name) for name in metrics["classes"]]
    skipped = plots_skipped("the report's plots")
    curves, figures = "", {}
    if skipped:
        curves = f"<p class='muted'>{html.escape(skipped.removeprefix('note: '))}</p>"
    else:
        plot_precision_recall(probabilities, targets, classes, "precision-recall", out_dir / "precision_recall.png")
        figures["precision_recall"] = (out_dir / "precision_recall.png").read_bytes()
        figures["training_curves"] = plot_training_curves(runs)
    embedded = {name: (f"<img class='plot' src='data:image/png;base64,{base64.b64encode(data).decode()}'"
                       f" alt='{name.replace('_', ' ')}'>" if data else "<p class='muted'>none</p>")
                for name, data in figures.items()}
    title = html.escape(", ".join(Path(r).name for r in runs))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graft report: {title}</title><style>{CSS}</style></head>
<body>
<h1>graft evaluation: {title} (multi-label)</h1>
<p class="muted">{metrics['images']} images from {html.escape(str(metrics['data']))} ({html.escape(metrics['split'])});
a class is in an image's predicted set when its probability reaches the class's threshold (chosen on validation at
training time, stored in graft.json). mAP does not use the thresholds.</p>
<h2 id="summary">Summary</h2>
{_summary_table(metrics)}
<h2 id="per-class">Per class</h2>
{_classes_table(metrics)}
<h2 id="precision-recall">Precision-recall</h2>
{embedded.get("precision_recall", curves)}
<h2 id="training">Training curves</h2>
{embedded.get("training_curves", curves)}
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write(path, lambda temp: Path(temp).write_text(display_name(page), encoding="utf-8"))
    return path
