"""The evaluation report: one self-contained HTML page (inline CSS, images as data URIs, no scripts, no network) and
the same plots as PNG files beside it. The plots need matplotlib (``graft[plots]``); without it the page says so
in their place and everything else is written.

Sections: headline numbers (plain and with test-time augmentation), what each run chose on validation while
training (which makes val numbers optimistic), training curves from each run's history,
the confusion matrix as a heat map, per-class precision/recall/F1, a reliability diagram with the expected
calibration error, and a grid of the most confident mistakes.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import torch
from PIL import Image

from graft.data.images import load_image
from graft.errors import GraftError
from graft.evaluation.metrics import calibration_sentence, reliability_bins
from graft.models.run_folder import read_history
from graft.utils.files import atomic_write, read_json_object
from graft.utils.plotting import plots_skipped, pyplot
from graft.utils.text import display_name

__all__ = [
    "CSS", "MISTAKES", "PLOTS", "THUMBNAIL", "confident_mistakes", "jpeg_uri", "plot_confusion", "plot_mistakes",
    "plot_reliability", "plot_training_curves", "shown_path", "thumbnail", "training_curves_figure", "write_report"
]


MISTAKES = 24  # thumbnails in the grid
THUMBNAIL = 112  # pixels, longer side
PLOTS = ("training_curves", "confusion_matrix", "reliability", "mistakes")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left} .numbers td{font-size:1.1em}
img.plot{max-width:100%} .grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:130px;font-size:12px} figure img{display:block;max-width:120px;max-height:120px}
figure.mistake{width:250px} .pair{display:flex;gap:4px} .path{font-family:monospace;word-break:break-all}
.wrong{color:#b00} .muted{color:#777}
"""


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    return buffer.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def training_curves_figure(runs: list):
    """Loss, accuracy and learning rate per epoch for each run (a matplotlib figure, None without history).

    Dotted lines mark stage boundaries. Epochs are whole numbers on the x axis, which spans at least one epoch
    either side of a lone point: a one-epoch run shows a visible marker at 1, not a 0.96-1.04 scale.
    """
    histories = [(display_name(Path(run).name), read_history(run)) for run in runs]
    histories = [(name, rows) for name, rows in histories if rows]
    if not histories:
        return None
    from matplotlib.ticker import MaxNLocator

    figure, axes = pyplot().subplots(1, 3, figsize=(13, 3.4))
    longest = max(len(rows) for _, rows in histories)
    size = 3 if longest > 1 else 7  # a single point must be seen
    for name, rows in histories:
        epochs = [int(row["epoch"]) for row in rows]
        label = f"{name}: " if len(histories) > 1 else ""
        for axis, key in ((axes[0], "loss"), (axes[1], "acc")):
            axis.plot(epochs, [float(row[f"train_{key}"]) for row in rows], "-o", ms=size, label=f"{label}train")
            axis.plot(epochs, [float(row[f"val_{key}"]) for row in rows], "-s", ms=size, label=f"{label}val")
        axes[2].plot(epochs, [float(row["lr"]) for row in rows], "-o", ms=size, label=name)
        for previous, row in zip(rows, rows[1:]):
            if row["stage"] != previous["stage"]:
                for axis in axes:
                    axis.axvline(int(previous["epoch"]) + 0.5, color="#999", ls=":")
    first = min(int(rows[0]["epoch"]) for _, rows in histories)
    last = max(int(rows[-1]["epoch"]) for _, rows in histories)
    for axis, title in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if last - first < 2:
            axis.set_xlim(first - 1, last + 1)
    axes[1].set_ylim(-0.02, 1.02)  # accuracy is a fraction: a flat one-epoch value is not blown up to fill the axis
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    if all(float(row["lr"]) > 0 for _, rows in histories for row in rows):
        axes[2].set_yscale("log")  # a schedule that ends at 0 stays linear
    return figure


def plot_training_curves(runs: list) -> bytes | None:
    """``training_curves_figure`` as PNG bytes."""
    figure = training_curves_figure(runs)
    return None if figure is None else _png(figure)


def plot_confusion(confusion: list[list[int]], classes: list[str]) -> bytes:
    """Rows are true classes, columns predictions; colour is the row-normalised rate, text the count."""
    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    size = min(14, 2.5 + 0.45 * len(classes))
    figure, axis = pyplot().subplots(figsize=(size, size * 0.85))
    image = axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of the true class")
    ticks = range(len(classes))
    axis.set_xticks(ticks, [c[:20] for c in classes], rotation=60, ha="right", fontsize=8)
    axis.set_yticks(ticks, [c[:20] for c in classes], fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(classes) <= 25:
        for row in ticks:
            for column in ticks:
                value = int(counts[row, column])
                if value:
                    colour = "white" if rates[row, column] > 0.5 else "black"
                    axis.text(column, row, str(value), ha="center", va="center", fontsize=8, color=colour)
    return _png(figure)


def plot_reliability(curves: dict[str, tuple[list[dict], float]]) -> bytes:
    """Accuracy against confidence per bin (a calibrated model sits on the diagonal); ECE in the legend."""
    figure, axis = pyplot().subplots(figsize=(5, 4.6))
    axis.plot([0, 1], [0, 1], color="#999", ls="--", label="perfect calibration")
    for name, (rows, ece) in curves.items():
        used = [row for row in rows if row["count"]]
        axis.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], "-o", ms=4,
                  label=f"{name} (ECE {ece:.3f})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence (top-1 probability)")
    axis.set_ylabel("accuracy")
    axis.legend(fontsize=8, loc="upper left")
    axis.grid(alpha=0.3)
    return _png(figure)


def _calibration_verdict(metrics: dict) -> str:
    """'The model is over-confident: ...' (escaped), or nothing for metrics written before the verdict existed."""
    return f"The model is {html.escape(calibration_sentence(metrics))}." if "calibration" in metrics else ""


def confident_mistakes(samples: list, probabilities: torch.Tensor, classes: list[str], limit: int = MISTAKES):
    """The wrong predictions with the highest confidence: (path, true class, predicted class, p(predicted), p(true))."""
    confidence, predicted = probabilities.max(1)
    labels = torch.tensor([label for _, label in samples])
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:limit].tolist()
    return [(samples[i][0], classes[samples[i][1]], classes[predicted[i]], confidence[i].item(),
             probabilities[i, samples[i][1]].item()) for i in order]


def thumbnail(path: str) -> Image.Image:
    """The image at ``path`` shrunk to ``THUMBNAIL`` pixels on its longer side; a grey tile when it cannot be read."""
    try:
        image = load_image(path)
    except Exception:  # noqa: BLE001 - a file changed since evaluation: a grey tile, not a failed report
        image = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def plot_mistakes(mistakes: list) -> bytes | None:
    if not mistakes:
        return None
    columns = min(6, len(mistakes))
    rows = (len(mistakes) + columns - 1) // columns
    figure, axes = pyplot().subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (path, true, predicted, confidence, _) in zip(axes.flat, mistakes):
        axis.imshow(thumbnail(path))
        axis.set_title(f"true {true[:14]}\npred {predicted[:14]} {confidence:.2f}", fontsize=7)
    return _png(figure)


def jpeg_uri(image: Image.Image) -> str:
    """``image`` as a JPEG data URI (a page stays one self-contained file)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def _numbers_table(metrics: dict) -> str:
    top_key = next(k for k in metrics if k.startswith("top") and k.endswith("_accuracy"))
    rows = [("plain", metrics)] + ([(f"TTA ({', '.join(metrics['tta']['views'])}; {metrics['tta']['count']} views)",
                                     metrics["tta"])] if "tta" in metrics else [])
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{m['accuracy']:.4f}</td><td>{m[top_key]:.4f}</td>"
                   f"<td>{m['macro_f1']:.4f}</td><td>{m['loss']:.4f}</td><td>{m['ece']:.4f}</td></tr>"
                   for name, m in rows)
    return (f"<table class='numbers'><tr><th></th><th>accuracy</th><th>{top_key.replace('_', ' ')}</th>"
            f"<th>macro F1</th><th>loss</th><th>ECE</th></tr>{body}</table>")


def _per_class_table(metrics: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(c['class'])}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
                   f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>" for c in metrics["per_class"])
    return f"<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{body}</table>"


def shown_path(path: str, data: str | os.PathLike) -> str:
    """A sample's path as the report shows it: relative to the data folder (a CSV's folder) when inside it."""
    root = Path(data)
    root = root.parent if root.is_file() else root
    try:
        return os.path.relpath(path, root) if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)) \
            else str(path)
    except ValueError:  # another drive on Windows
        return str(path)


def mistake_overlays(model, mistakes: list) -> list[Image.Image | None] | None:
    """Grad-CAM thumbnails (for the predicted class: what fooled the model) per mistake; None without the extra."""
    if model is None or not mistakes:
        return None
    from graft.evaluation.explain import available, explain_images

    if not available():
        return None
    overlays: list[Image.Image | None] = []
    names = {display_name(name): name for name in model.classes}  # the mistakes carry display names
    for path, _, predicted, _, _ in mistakes:
        try:
            row = explain_images(model, [load_image(path)], top_k=1, target=names.get(predicted, predicted))[0]
        except GraftError:  # a file changed since evaluation, or a trunk with no spatial map: the thumbnail alone
            overlays.append(None)
            continue
        row.overlay.thumbnail((THUMBNAIL, THUMBNAIL))
        overlays.append(row.overlay)
    return overlays if any(image is not None for image in overlays) else None


def _mistake_grid(mistakes: list, data: str | os.PathLike, overlays: list | None) -> str:
    if not mistakes:
        return "<p>No mistakes.</p>"
    note = ("<p class='muted'>Beside each image, Grad-CAM: where the model looked for the class it predicted.</p>"
            if overlays else "<p class='muted'>Grad-CAM overlays need the explain extra (pip install "
                             "'graft[explain]') and a trunk with a spatial feature map.</p>")
    figures = []
    for index, (path, true, predicted, confidence, p_true) in enumerate(mistakes):
        shown = html.escape(display_name(shown_path(path, data)), quote=True)
        cam = overlays[index] if overlays else None
        images = f"<img src='{jpeg_uri(thumbnail(path))}' alt='{shown}'>" + (
            f"<img src='{jpeg_uri(cam)}' alt='Grad-CAM of {shown} for {html.escape(predicted, quote=True)}'>"
            if cam is not None else "")
        figures.append(f"<figure class='mistake'><div class='pair'>{images}</div><figcaption><span class='path'>"
                       f"{shown}</span><br>true <b>{html.escape(true)}</b><br><span class='wrong'>predicted "
                       f"{html.escape(predicted)} {confidence:.2f}</span><br><span class='muted'>p(true) "
                       f"{p_true:.2f}</span></figcaption></figure>")
    return f"{note}<div class='grid'>{''.join(figures)}</div>"


def _training_choices(runs: list) -> str:
    """What each run chose on its validation split while training (metrics.json's ``selected_on_validation``) and
    its headline: numbers on that split are optimistic, a test split's are not (README "Honest numbers")."""
    items = []
    for run in runs:
        trained = read_json_object(Path(run) / "metrics.json", max_bytes=10_000_000)  # ours are a few KB
        if not trained:
            continue
        chosen = [str(item) for item in trained.get("selected_on_validation") or [] if isinstance(item, str)]
        headline = trained.get("headline") if isinstance(trained.get("headline"), dict) else {}
        text = "selected on validation: " + "; ".join(chosen) if chosen else "nothing selected on validation"
        if trained.get("kept") == "probe" and trained.get("strategy") != "probe":
            text += (" — the saved model is the probe: the fine-tune it was compared with did not beat it and was "
                     "discarded (its epochs are the training curves below)")
        if isinstance(headline.get("accuracy"), (int, float)):
            text += (f" — training headline: {headline.get('split', '?')} accuracy {headline['accuracy']:.4f} "
                     f"({headline.get('note', '')})")
        items.append(f"<li><b>{html.escape(Path(run).name)}</b>: {html.escape(display_name(text))}</li>")
    if not items:
        return ""
    return ("<h2 id='choices'>Chosen on validation while training</h2><ul>" + "".join(items) + "</ul>"
            "<p class='muted'>Evaluated on the validation split a run was trained with, these numbers are optimistic "
            "(they chose the epoch, the strategy or the probe's strength); a test split — the data's own, or "
            "<code>graft fit --test-fraction</code> — gives the unbiased estimate.</p>")


def write_report(out_dir: str | Path, metrics: dict, samples: list, probabilities: torch.Tensor,
                 tta_probabilities: torch.Tensor | None, runs: list, model=None) -> Path:
    """Writes ``report.html`` and the PNG plots into ``out_dir``; returns the HTML's path.

    With ``model`` (the GraftModel evaluated) and the explain extra installed, each confident mistake gets its
    Grad-CAM overlay beside the thumbnail.
    """
    out_dir = Path(out_dir)
    labels = torch.tensor([label for _, label in samples])
    classes = [display_name(name) for name in metrics["classes"]]  # plots and HTML need valid Unicode
    curves = {"plain": (reliability_bins(probabilities, labels), metrics["ece"])}
    if tta_probabilities is not None:
        curves["TTA"] = (reliability_bins(tta_probabilities, labels), metrics["tta"]["ece"])
    mistakes = confident_mistakes(samples, probabilities, classes)
    skipped = plots_skipped("the report's plots")
    plots = dict.fromkeys(PLOTS) if skipped else {
        "training_curves": plot_training_curves(runs),
        "confusion_matrix": plot_confusion(metrics["confusion_matrix"], classes),
        "reliability": plot_reliability(curves), "mistakes": plot_mistakes(mistakes)}
    for name, data in plots.items():
        if data is not None:
            atomic_write(out_dir / f"{name}.png", lambda temp, data=data: Path(temp).write_bytes(data))

    def plot(name: str, alt: str) -> str:
        data = plots[name]
        if skipped:
            return f"<p class='muted'>{html.escape(skipped.removeprefix('note: '))}</p>"
        return f"<img class='plot' src='{_data_uri(data)}' alt='{alt}'>" if data else "<p class='muted'>none</p>"

    title = html.escape(", ".join(Path(r).name for r in runs))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graft report: {title}</title><style>{CSS}</style></head>
<body>
<h1>graft evaluation: {title}</h1>
<p class="muted">{len(samples)} images from {html.escape(str(metrics['data']))}; {len(runs)} run(s):
{html.escape(', '.join(str(r) for r in runs))}</p>
<h2 id="summary">Summary</h2>
{_numbers_table(metrics)}
{_training_choices(runs)}
<h2 id="training">Training curves</h2>
{plot("training_curves", "loss, accuracy and learning rate per epoch")}
<h2 id="confusion">Confusion matrix</h2>
{plot("confusion_matrix", "confusion matrix")}
<h2 id="per-class">Per class</h2>
{_per_class_table(metrics)}
<h2 id="calibration">Calibration</h2>
<p>Expected calibration error {metrics['ece']:.4f}: the average gap between confidence and accuracy.
{_calibration_verdict(metrics)}</p>
{plot("reliability", "reliability diagram")}
<h2 id="mistakes">Most confident mistakes</h2>
{_mistake_grid(mistakes, metrics['data'], mistake_overlays(model, mistakes))}
</body></html>
"""
    path = out_dir / "report.html"
    page = display_name(page)  # paths and class names that are not UTF-8, shown as \xNN: the page says it is UTF-8
    atomic_write(path, lambda temp: Path(temp).write_text(page, encoding="utf-8"))
    return path
