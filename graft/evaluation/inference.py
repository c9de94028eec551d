"""Predictions and metrics: accuracy, top-k, per-class precision/recall/F1, confusion matrix; predict on files."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from graft.data.datasets import FileDataset, ImageDataset, loader_options
from graft.data.discovery import expand_inputs
from graft.data.prefetch import DecodePlan, engine_plan, plan_batches
from graft.data.transforms import TTAViews
from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.models.onnx_engine import resolve_engine, run_forward
from graft.models.prediction import Prediction, label_set_prediction
from graft.models.run_folder import load
from graft.utils.memory import out_of_memory_hint
from graft.utils.modes import evaluating
from graft.utils.progress import Progress
from graft.utils.runtime import autocast, autocast_dtype, resolve_device, to_device

__all__ = [
    "PerView", "Prediction", "ensemble_probabilities", "eval_loader", "iter_predictions", "load_ensemble", "predict",
    "predict_logits", "prediction_plan", "runtime_members"
]


@torch.inference_mode()
def predict_logits(model: GraftModel, loader, device: torch.device, dtype=None, channels_last: bool = True,
                   limit_batches: int = 0, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every batch of ``loader`` with the model in eval mode; ``progress``
    (``graft.utils.progress``) is told the images done after each batch."""
    with evaluating(model):
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
            if progress is not None:
                progress.update(sum(len(part) for part in all_labels))
    if not all_logits:
        return torch.zeros(0, len(model.classes)), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def eval_loader(dataset, batch_size: int = 64, workers: int = 0, device: torch.device | str = "cpu") -> DataLoader:
    """One pass in file order; pinned memory when the batches go to a CUDA ``device`` (``loader_options``)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(device, workers))


class PerView(nn.Module):
    """Runs a model on (batch, views, 3, H, W) and returns per-view log-probabilities flattened to (batch, views*C).

    ``forward``: what computes the logits instead of ``model`` itself, e.g. its ONNX Runtime session
    (``run_forward``); ``model`` still gives the classes."""

    def __init__(self, model: GraftModel, channels_last: bool, forward: nn.Module | None = None):
        super().__init__()
        self.model = forward if forward is not None else model
        self.classes, self.channels_last = model.classes, channels_last
        self.multi_label = model.multi_label

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        batch = views.shape[0]
        images = views.flatten(0, 1)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.model(images).float()
        # a multi-label model's classes are independent: each its own sigmoid (exp() gives the probabilities back)
        scores = F.logsigmoid(logits) if self.multi_label else logits.log_softmax(1)
        return scores.reshape(batch, -1)


def ensemble_probabilities(models: list[GraftModel], samples: list, device: torch.device, tta: str | None = None,
                           batch_size: int = 64, workers: int = -1, log=None, runs: list | None = None,
                           runtime: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class probabilities averaged over ensemble members: (plain (N, C), with test-time augmentation (N, C), labels).

    Without ``tta`` both are the same tensor. View 0 of every TTA set is the plain evaluation view, so one pass gives
    both numbers. ``log``: where progress lines go (none without it). ``runs`` (the models' run folders) and
    ``runtime``: each member's forward as ``predict --runtime`` runs it (``runtime_members``); ``workers`` -1 decodes in
    threads on the CPU (``prediction_plan``).
    """
    plan = prediction_plan(runtime if runs else "torch", device, workers)
    members = (runtime_members(runs, models, device, runtime, log, plan.compute_threads if plan else None) if runs
               else [PerView(member, True) for member in models])
    plain, augmented, labels = None, None, None
    for number, (member, per_view) in enumerate(zip(models, members), start=1):
        views = TTAViews(member.preprocessing, tta)
        dataset = ImageDataset(samples, views, None)
        loader = plan_batches(dataset, batch_size, plan) if plan else eval_loader(dataset, batch_size, max(workers, 0),
                                                                                  device)
        what = "evaluate" + (f" (model {number}/{len(models)})" if len(models) > 1 else "")
        with Progress(what, len(samples), "images", log, log is not None) as progress:
            logits, labels = predict_logits(per_view, loader, device, autocast_dtype(device), channels_last=False,
                                            progress=progress)
        probabilities = logits.reshape(len(labels), len(views), -1).exp()
        plain = probabilities[:, 0] if plain is None else plain + probabilities[:, 0]
        augmented = probabilities.mean(1) if augmented is None else augmented + probabilities.mean(1)
    plain, augmented = plain / len(models), augmented / len(models)
    return plain, (augmented if tta else plain), labels


def load_ensemble(run_dirs, device: str, label_sets: bool = False, command: str = "this command"
                  ) -> tuple[list, torch.device, list[GraftModel]]:
    """(run folders, device, models) for one run folder or several; an ensemble's members must share classes.

    Args:
        label_sets: the caller handles a multi-label model (one; not an ensemble of them). Otherwise such a run is
            refused in one line naming ``command``.
    """
    runs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    target = resolve_device(device)
    models = [load(run, target) for run in runs]
    for model, run in zip(models, runs):
        if model.multi_label and not label_sets:
            raise GraftError(f"{run}: a multi-label model (label sets); {command} handles single-label models only: "
                             "graft predict gives its label sets with probabilities")
        if model.multi_label and len(runs) > 1:
            raise GraftError(f"{run}: a multi-label model cannot join an ensemble (each keeps its own thresholds); "
                             "pass it alone (one run at a time)")
    for model, run in zip(models[1:], runs[1:]):
        if model.classes != models[0].classes:
            raise GraftError(f"{run}: its classes differ from {runs[0]}'s; an ensemble needs the same classes")
    return runs, target, models


def runtime_members(runs: list, models: list[GraftModel], target: torch.device, runtime: str = "torch",
                    log=None, threads: int | None = None) -> list[PerView]:
    """Each ensemble member's ``PerView`` (in eval mode) with its forward on ``runtime`` (``torch``, ``onnx`` or
    ``auto``; ``graft.models.onnx_engine.run_forward``: the run's verified ONNX export, made on first use);
    ``threads``: ONNX Runtime's intra-op threads (``prediction_plan``; default torch's)."""
    return [PerView(model, True, run_forward(model, run, runtime, target, model.preprocessing.input_size, log,
                                             threads)).eval()
            for run, model in zip(runs, models)]


def prediction_plan(runtime: str, target: torch.device, workers: int) -> DecodePlan | None:
    """How decoding threads share the CPU with an ONNX Runtime forward (``graft.data.prefetch.engine_plan``) for
    ``workers`` -1 on the CPU; None (a DataLoader with ``workers``, decoding in the calling thread for -1) otherwise.

    Eager PyTorch on the CPU decodes in the calling thread: measured on 2 cores (bench/RESULTS.md, issue 24), eager
    predict ran 44.9 img/s so and 39.8 with decoding threads taking turns with the forward, whose own intra-op
    threads torch spreads over every core already; ONNX Runtime gained from the threads (124.0 against 109.7)."""
    if target.type != "cpu" or workers != -1 or resolve_engine(runtime, target) != "onnx":
        return None
    return engine_plan(True)


def predict(run_dirs, inputs, top_k: int = 3, batch_size: int = 32, device: str = "auto",
            workers: int = -1, tta: str | None = None, runtime: str = "torch") -> list[Prediction]:
    """Classifies files, folders and glob patterns; unreadable files give a row with an error, never a crash.

    Several run folders form an ensemble (probabilities averaged; they must share classes). ``tta`` (flip, crops or
    flip,crops) averages each model's probabilities over those views first. ``iter_predictions`` gives the same rows
    one batch at a time. ``inputs`` is one path (``str`` or ``os.PathLike``) or a list of them. ``runtime``: torch,
    onnx (ONNX Runtime on each run's verified export) or auto (onnx on the CPU when installed). ``workers``: -1
    decodes in threads for ONNX Runtime on the CPU (``prediction_plan``), else in the calling thread; a count is
    DataLoader's ``num_workers``. The rows are the same either way.
    """
    return list(iter_predictions(run_dirs, inputs, top_k, batch_size, device, workers, tta, runtime))


def iter_predictions(run_dirs, inputs, top_k: int = 3, batch_size: int = 32, device: str = "auto",
                     workers: int = -1, tta: str | None = None, runtime: str = "torch", log=None
                     ) -> Iterator[Prediction]:
    """``predict``'s rows, yielded as each batch is computed: the first arrive after one batch, and memory stays flat
    however many images there are. The models and inputs are checked before the first row. ``log``: where the
    ONNX Runtime warning goes, if a run's export cannot be used (default logging's)."""
    runs, target, models = load_ensemble(run_dirs, device, label_sets=True)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs  # one path, not a list of its characters
    paths = expand_inputs([os.fspath(item) for item in items])
    plan = prediction_plan(runtime, target, workers)
    members = runtime_members(runs, models, target, runtime, log, plan.compute_threads if plan else None)
    return _prediction_rows(models, members, paths, target, top_k, batch_size, workers, tta, plan)


def _prediction_rows(models: list[GraftModel], members: list[PerView], paths: list[str], target: torch.device,
                     top_k: int, batch_size: int, workers: int, tta: str | None, plan: DecodePlan | None = None
                     ) -> Iterator[Prediction]:
    # one loader per member over the same paths in the same order: zipped, they give each batch for every member
    loaders = []
    for model in models:
        views = TTAViews(model.preprocessing, tta)
        dataset = FileDataset(paths, views, (len(views), 3, *model.preprocessing.input_size))
        loaders.append(plan_batches(dataset, batch_size, plan) if plan else
                       eval_loader(dataset, batch_size, max(workers, 0), target))
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
            if models[0].multi_label:
                yield label_set_prediction(path, probabilities[offset], classes, models[0].thresholds)
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
            images = images.to(target, non_blocking=True)
            log_probabilities = per_view(images).reshape(len(images), images.shape[1], -1)
        probabilities = log_probabilities.float().exp().mean(1).cpu()
        total = probabilities if total is None else total + probabilities
    return total / len(members)
