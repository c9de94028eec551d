"""Predictions and metrics: accuracy, top-k, per-class precision/recall/F1, confusion matrix; predict on files."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from graft.data import (
    FileDataset, ImageDataset, TTAViews, discover, expand_inputs, parse_tta, readable,
)
from graft.errors import GraftError
from graft.memory import out_of_memory_hint
from graft.model import GraftModel, atomic_write, load, write_json
from graft.outputs import output_folder
from graft.text import safe_row


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GraftError(f"device '{spec}' not understood: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraftError(f"device '{spec}' asked for but CUDA is not available here; use --device cpu")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA where supported (no loss scaling needed), else fp16; None means fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.inference_mode()
def predict_logits(model: GraftModel, loader, device: torch.device, dtype=None, channels_last: bool = True,
                   limit_batches: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every batch of ``loader`` with the model in eval mode."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    slices = 1  # doubled after an out-of-memory error, for the rest of the pass
    for index, (images, labels, *_) in enumerate(loader):
        if limit_batches and index >= limit_batches:
            break
        images = to_device(images, device, channels_last)
        while True:
            try:
                with autocast(device, dtype):
                    logits = torch.cat([model(part) for part in images.chunk(slices)])
                break
            except torch.cuda.OutOfMemoryError:
                if slices >= len(images):
                    raise GraftError("out of memory evaluating one image at a time; use a smaller --image-size or "
                                     "free the device's memory") from None
                slices *= 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        all_logits.append(logits.float().cpu())
        all_labels.append(torch.as_tensor(labels))
    model.train(was_training)
    if not all_logits:
        return torch.zeros(0, len(model.classes)), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], top_k: int = 5) -> dict:
    """Loss, accuracy, top-k accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix
    (rows: true class, columns: predicted)."""
    count = len(classes)
    k = min(top_k, count)
    if len(labels) == 0:
        raise GraftError("no images to evaluate")
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(count, count, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = []
    for index, name in enumerate(classes):
        true_positive = confusion[index, index].item()
        precision = true_positive / max(1, confusion[:, index].sum().item())
        recall = true_positive / max(1, confusion[index].sum().item())
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                          "support": int(confusion[index].sum())})
    top = logits.topk(k, dim=1).indices
    return {
        "images": len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (predicted == labels).float().mean().item(),
        f"top{k}_accuracy": (top == labels[:, None]).any(dim=1).float().mean().item(),
        "macro_f1": sum(c["f1"] for c in per_class) / count,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }


def eval_loader(model: GraftModel, dataset, batch_size: int = 64, workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


class PerView(nn.Module):
    """Runs a model on (batch, views, 3, H, W) and returns per-view log-probabilities flattened to (batch, views*C)."""

    def __init__(self, model: GraftModel, channels_last: bool):
        super().__init__()
        self.model, self.classes, self.channels_last = model, model.classes, channels_last

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        batch = views.shape[0]
        images = views.flatten(0, 1)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images).float().log_softmax(1).reshape(batch, -1)


def ensemble_probabilities(models: list[GraftModel], samples: list, device: torch.device, tta: str | None = None,
                           batch_size: int = 64, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class probabilities averaged over ensemble members: (plain (N, C), with test-time augmentation (N, C), labels).

    Without ``tta`` both are the same tensor. View 0 of every TTA set is the plain evaluation view, so one pass gives
    both numbers.
    """
    plain, augmented, labels = None, None, None
    for member in models:
        views = TTAViews(member.preprocessing, tta)
        dataset = ImageDataset(samples, views, None)
        logits, labels = predict_logits(PerView(member, True), eval_loader(member, dataset, batch_size, workers),
                                        device, autocast_dtype(device), channels_last=False)
        probabilities = logits.reshape(len(labels), len(views), -1).exp()
        plain = probabilities[:, 0] if plain is None else plain + probabilities[:, 0]
        augmented = probabilities.mean(1) if augmented is None else augmented + probabilities.mean(1)
    plain, augmented = plain / len(models), augmented / len(models)
    return plain, (augmented if tta else plain), labels


def evaluate(run_dirs: str | os.PathLike | list, data: str | os.PathLike, split: str | None = None,
             batch_size: int = 64, workers: int = 0, device: str = "auto", top_k: int = 5,
             output: str | os.PathLike | None = None, tta: str | None = None, report: bool = True) -> dict:
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
    """
    runs, target, models = load_ensemble(run_dirs, device)
    model = models[0]
    out_dir = Path(output) if output else Path(runs[0]) / f"eval-{_data_name(data)}"
    output_folder(out_dir, "--output", ((data, "data"),))  # before the work: an unwritable folder wastes nothing
    samples, _ = _labelled_samples(data, split, model.classes)
    with out_of_memory_hint(batch_size):
        plain, augmented, labels = ensemble_probabilities(models, samples, target, tta, batch_size, workers)
    metrics = classification_metrics(plain.clamp_min(1e-12).log(), labels, model.classes, top_k)
    metrics.update({"data": str(data), "runs": [str(r) for r in runs],
                    "ece": expected_calibration_error(plain, labels)})
    if tta:
        metrics["tta"] = {"views": parse_tta(tta), "count": len(TTAViews(model.preprocessing, tta)),
                          **classification_metrics(augmented.clamp_min(1e-12).log(), labels, model.classes, top_k),
                          "ece": expected_calibration_error(augmented, labels)}
    write_json(out_dir / "metrics.json", metrics)
    write_predictions(out_dir / "predictions.csv", samples, plain, model.classes)
    metrics["output"] = str(out_dir / "metrics.json")
    if report:
        from graft.report import write_report

        metrics["report"] = str(write_report(out_dir, metrics, samples, plain, augmented if tta else None, runs))
    return metrics


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width confidence bins."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs(correct[inside].mean().item() - confidence[inside].mean().item())
            error += inside.float().mean().item() * gap
    return error


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


def load_ensemble(run_dirs, device: str) -> tuple[list, torch.device, list[GraftModel]]:
    """(run folders, device, models) for one run folder or several; an ensemble's members must share classes."""
    runs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    target = resolve_device(device)
    models = [load(run, target) for run in runs]
    for model, run in zip(models[1:], runs[1:]):
        if model.classes != models[0].classes:
            raise GraftError(f"{run}: its classes differ from {runs[0]}'s; an ensemble needs the same classes")
    return runs, target, models


def _labelled_samples(data, split: str | None, model_classes: list[str]) -> tuple[list, list[str]]:
    """Samples of the evaluation data with labels re-indexed to the model's class order."""
    splits = discover(data, val_fraction=0.5)
    path = Path(data)
    has_splits = path.is_dir() and any((path / name).is_dir() for name in ("train", "val", "test", "valid"))
    if split:
        chosen = getattr(splits, split)
    elif has_splits:
        chosen = splits.test or splits.val
    else:
        chosen = splits.train + splits.val  # a plain tree: every image
    unknown = sorted(set(splits.classes) - set(model_classes))
    if unknown:
        raise GraftError(f"{data}: classes the model does not know: {', '.join(unknown[:5])}")
    chosen = readable(chosen)
    if not chosen:
        raise GraftError(f"{data}: no readable images to evaluate")
    index = {name: model_classes.index(name) for name in splits.classes}
    return [(path, index[splits.classes[label]]) for path, label in chosen], model_classes


@dataclass
class Prediction:
    """Top-k labels and probabilities for one file, or the error that prevented it."""

    path: str
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""


def predict(run_dirs, inputs: list[str], top_k: int = 3, batch_size: int = 32, device: str = "auto",
            workers: int = 0, tta: str | None = None) -> list[Prediction]:
    """Classifies files, folders and glob patterns; unreadable files give a row with an error, never a crash.

    Several run folders form an ensemble (probabilities averaged; they must share classes). ``tta`` (flip, crops or
    flip,crops) averages each model's probabilities over those views first. ``iter_predictions`` gives the same rows
    one batch at a time.
    """
    return list(iter_predictions(run_dirs, inputs, top_k, batch_size, device, workers, tta))


def iter_predictions(run_dirs, inputs: list[str], top_k: int = 3, batch_size: int = 32, device: str = "auto",
                     workers: int = 0, tta: str | None = None) -> Iterator[Prediction]:
    """``predict``'s rows, yielded as each batch is computed: the first arrive after one batch, and memory stays flat
    however many images there are. The models and inputs are checked before the first row."""
    _, target, models = load_ensemble(run_dirs, device)
    paths = expand_inputs(inputs)
    return _prediction_rows(models, paths, target, top_k, batch_size, workers, tta)


def _prediction_rows(models: list[GraftModel], paths: list[str], target: torch.device, top_k: int, batch_size: int,
                     workers: int, tta: str | None) -> Iterator[Prediction]:
    # one loader per member over the same paths in the same order: zipped, they give each batch for every member
    loaders = []
    for model in models:
        views = TTAViews(model.preprocessing, tta)
        dataset = FileDataset(paths, views, (len(views), 3, *model.preprocessing.input_size))
        loaders.append(eval_loader(model, dataset, batch_size, workers))
    members = [PerView(model, True).eval() for model in models]
    classes = models[0].classes
    k = min(top_k, len(classes))
    start = 0
    for batches in zip(*loaders):
        with out_of_memory_hint(batch_size):
            probabilities = _ensemble_batch(members, [images for images, _, _ in batches], target)
        _, ok, messages = batches[0]  # a file that fails to decode fails for every member
        for offset, (good, message) in enumerate(zip(ok.tolist(), messages)):
            path = paths[start + offset]
            if not good:
                yield Prediction(path, error=message)
                continue
            values, indices = probabilities[offset].topk(k)
            yield Prediction(path, [classes[i] for i in indices.tolist()],
                             [round(v, 6) for v in values.tolist() if not math.isnan(v)])
        start += len(ok)


@torch.inference_mode()
def _ensemble_batch(members: list[PerView], batches: list[torch.Tensor], target: torch.device) -> torch.Tensor:
    """Class probabilities of one batch, averaged over the test-time views and then over the ensemble's members."""
    total = None
    for per_view, images in zip(members, batches):
        with autocast(target, autocast_dtype(target)):
            log_probabilities = per_view(images.to(target)).reshape(len(images), images.shape[1], -1)
        probabilities = log_probabilities.float().exp().mean(1).cpu()
        total = probabilities if total is None else total + probabilities
    return total / len(members)
