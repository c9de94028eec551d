"""One epoch of training and one of validation: the loss, the step, out-of-memory and blow-up handling."""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from graft.data.datasets import unreadable_split
from graft.errors import GraftError
from graft.evaluation.inference import predict_logits
from graft.models.grafted import GraftModel
from graft.training.state import Hooks
from graft.utils import distributed
from graft.utils.runtime import Runtime, autocast, to_device

__all__ = ["ASL_CLIP", "ASL_GAMMA_NEGATIVE", "NonFiniteLoss", "compute_loss", "create_mixup", "multi_label_loss",
           "train_epoch", "validate", "epoch_line"]

ASL_GAMMA_NEGATIVE, ASL_CLIP = 4.0, 0.05  # asymmetric loss (Ridnik et al. 2021)'s defaults; γ+ = 0


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; carries what a person needs to find the cause."""

    def __init__(self, value: float, step: int, lr: float, files: list[str], what: str = "loss"):
        super().__init__(f"{what} {value} at step {step}")
        self.value, self.step, self.lr, self.files, self.what = value, step, lr, files, what


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, multi_label: str = "") -> torch.Tensor:
    """Cross-entropy against class indices, or against (B, C) soft targets (mixup/cutmix, which carry their own
    label smoothing: ``label_smoothing`` is then ignored); with ``multi_label`` ("bce" or "asl") against (B, C)
    multi-hot targets (``multi_label_loss``).

    With soft targets, class weights weight each image by its target's mixture of class weights (``targets @ w``),
    normalised by their sum as ``F.cross_entropy``'s weighted mean is, so an unmixed one-hot target reduces to it.
    """
    if multi_label:
        return multi_label_loss(logits, labels, label_smoothing, multi_label)
    if labels.ndim == 2:
        targets = labels.float()
        if class_weights is None:
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()(logits.float(), targets)
        per_image = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
        weights = targets @ class_weights.float()
        return (weights * per_image).sum() / weights.sum()
    return F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)


def multi_label_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                     kind: str = "bce") -> torch.Tensor:
    """Per-class sigmoid losses against (B, C) multi-hot targets, summed over the classes, mean over the images.

    ``bce``: binary cross-entropy; label smoothing moves each target ε/2 towards the other side (the two-class form
    of softmax smoothing). ``asl``: the asymmetric loss, which down-weights easy negatives (γ- = 4) and ignores
    negatives below ``ASL_CLIP`` probability, for sets where each class is absent from most images.
    """
    logits, targets = logits.float(), targets.float()
    if kind == "asl":
        probabilities = torch.sigmoid(logits)
        shifted = (probabilities - ASL_CLIP).clamp_min(0)  # probability shifting: very easy negatives cost nothing
        positive = targets * F.logsigmoid(logits)
        negative = (1 - targets) * shifted.pow(ASL_GAMMA_NEGATIVE) * torch.log((1 - shifted).clamp_min(1e-8))
        return -(positive + negative).sum(1).mean()
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()


def create_mixup(mixup: float, cutmix: float, num_classes: int, label_smoothing: float = 0.0):
    """timm's ``Mixup`` for ``--mixup A --cutmix B`` (alphas; both 0: None). It smooths the mixed targets itself."""
    if not mixup and not cutmix:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def _mix(mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images and (B, C) soft targets. timm mixes a batch with its flipped self and refuses an odd size: such a
    batch (a last one, or a data set smaller than a batch) keeps its images, with the same smoothed soft targets."""
    if images.shape[0] % 2 == 0:
        return mixup(images, labels)
    from timm.data.mixup import mixup_target

    return images, mixup_target(labels, mixup.num_classes, 1.0, mixup.label_smoothing)


def _train_step(model, images, labels, optimizer, scaler, runtime: Runtime, loss_options: dict,
                micro_batches: int) -> tuple[float, int, torch.Tensor]:
    """One optimiser step over ``micro_batches`` slices of the batch (gradient accumulation keeps the effective
    batch); returns (summed loss, correct predictions, the loss of the last slice)."""
    optimizer.zero_grad(set_to_none=True)
    total_loss, correct = 0.0, 0
    hard = labels.argmax(1) if labels.ndim == 2 else labels  # mixed targets: accuracy against their dominant class
    parts = list(zip(images.chunk(micro_batches), labels.chunk(micro_batches), hard.chunk(micro_batches)))
    for part, (part_images, part_labels, part_hard) in enumerate(parts):
        # under DDP only the last slice's backward all-reduces: the gradients are summed locally until then
        syncing = part == len(parts) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if syncing else model.no_sync():
            with autocast(runtime.device, runtime.dtype):
                logits = model(part_images)
                loss = compute_loss(logits, part_labels, **loss_options)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(loss.item(), 0, optimizer.param_groups[0]["lr"], [])
            scaler.scale(loss * (part_hard.numel() / hard.numel())).backward()
        total_loss += loss.item() * part_hard.numel()
        correct += (logits.argmax(1) == part_hard).sum().item()
    scaler.step(optimizer)
    scaler.update()
    return total_loss, correct, loss


def _after_out_of_memory(micro_batches: int, batch: int, optimizer, runtime: Runtime) -> int:
    """Halves the micro-batch after an out-of-memory error, or gives up with what to do at one image per slice."""
    optimizer.zero_grad(set_to_none=True)
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    if micro_batches >= batch:
        raise GraftError("out of memory even at one image per step; use a smaller --image-size or backbone, or free "
                         "the device's memory") from None
    micro_batches *= 2
    runtime.log(f"warning: out of memory at batch size {batch}; continuing with {micro_batches} micro-batches of "
                f"~{math.ceil(batch / micro_batches)} (gradient accumulation keeps the effective batch)")
    return micro_batches


def train_epoch(model: GraftModel, loader, optimizer, scheduler, runtime: Runtime, label_smoothing: float = 0.0,
                limit_batches: int = 0, hooks: Hooks | None = None, progress=None,
                class_weights: torch.Tensor | None = None, micro_batches: int = 1, mixup=None,
                resume_at: dict | None = None, on_step=None, multi_label: str = "") -> dict:
    """One pass over ``loader``; returns mean loss, accuracy, images/s and the micro-batch count in use (under
    torchrun the sums of every process).

    Args:
        mixup: ``create_mixup``'s: each batch is mixed and trained against soft targets; the training accuracy is
            then measured against each mixed target's dominant class.
        resume_at: a mid-epoch checkpoint's ``{"step", "loss", "correct", "seen"}``: the loader already skips the
            consumed batches (its sampler does), this continues the step count and the epoch's sums.
        on_step: called after each optimiser step with the same dict (mid-epoch checkpoints decide there).
        multi_label: "bce" or "asl": (B, C) multi-hot targets and ``multi_label_loss`` (``train_acc`` then compares
            the top class with each set's first class: a rough sign only; mAP is measured after training).

    Raises:
        NonFiniteLoss: naming the batch's files (when the dataset yields indices) and the learning rate.
    """
    model.train()
    scaler = torch.amp.GradScaler(enabled=runtime.dtype == torch.float16)
    loss_options = {"label_smoothing": label_smoothing, "class_weights": class_weights}
    if multi_label:
        loss_options["multi_label"] = multi_label
    done = resume_at or {}
    total_loss, correct, seen = done.get("loss", 0.0), done.get("correct", 0), done.get("seen", 0)
    steps, start = done.get("step", 0), time.perf_counter()
    for step, (images, labels, *indices) in enumerate(loader, start=done.get("step", 0)):
        if limit_batches and step >= limit_batches:
            break
        images = to_device(images, runtime.device, runtime.channels_last)
        labels = labels.to(runtime.device, non_blocking=True)
        if mixup is not None:
            images, labels = _mix(mixup, images, labels)
        while True:
            try:
                batch_loss, batch_correct, loss = _train_step(model, images, labels, optimizer, scaler, runtime,
                                                              loss_options, micro_batches)
                break
            except torch.cuda.OutOfMemoryError:
                micro_batches = _after_out_of_memory(micro_batches, labels.shape[0], optimizer, runtime)
            except NonFiniteLoss as blowup:
                files = [loader.dataset.samples[i][0] for i in indices[0].tolist()] if indices else []
                raise NonFiniteLoss(blowup.value, step, blowup.lr, files) from None
        scheduler.step()
        total_loss += batch_loss
        correct += batch_correct
        seen += labels.shape[0]
        if hooks and hooks.on_batch_end:
            hooks.on_batch_end(step, loss.item())
        if progress is not None:
            progress.update(seen, f"loss {total_loss / seen:.4f} acc {correct / seen:.3f}")
        if on_step is not None:
            on_step({"step": step + 1, "loss": total_loss, "correct": correct, "seen": seen})
        steps = step + 1
    seconds = time.perf_counter() - start
    if runtime.distributed:  # the epoch's numbers over every process's share
        sums = distributed.all_reduce_sum(torch.tensor([total_loss, correct, seen, steps], dtype=torch.float64,
                                                       device=_collective_device(runtime)))
        total_loss, correct, seen, steps = sums[0].item(), int(sums[1].item()), int(sums[2].item()), int(sums[3])
    if not steps:  # every sample was substituted (none decoded): an epoch of nothing must not pass as trained
        raise unreadable_split(loader.dataset, "training")
    return {"train_loss": total_loss / max(1, seen), "train_acc": correct / max(1, seen),
            "images_per_s": seen / max(seconds, 1e-9), "micro_batches": micro_batches}


def _collective_device(runtime: Runtime) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    return runtime.device if runtime.device.type == "cuda" else torch.device("cpu")


def validate(model: GraftModel, loader, runtime: Runtime, limit_batches: int = 0) -> dict:
    """Mean loss and accuracy over ``loader``; under torchrun each process holds an unpadded share and the sums are
    added over processes, so no image counts twice."""
    logits, labels = predict_logits(model, loader, runtime.device, runtime.dtype, runtime.channels_last, limit_batches)
    listed = len(loader.dataset)
    if runtime.distributed:
        sums = torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0,
                             (logits.argmax(1) == labels).sum().item(), len(labels), listed], dtype=torch.float64)
        loss, correct, count, listed = distributed.all_reduce_sum(sums.to(_collective_device(runtime))).tolist()
    else:
        loss, correct, count = None, None, len(labels)
    if listed and not count:  # images listed, none read (a tar shard that is no tar): not a NaN epoch to retry
        raise unreadable_split(loader.dataset, "validation")
    if not count:
        return {"val_loss": math.nan, "val_acc": math.nan}
    if runtime.distributed:
        return {"val_loss": loss / count, "val_acc": correct / count}
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_acc": (logits.argmax(1) == labels).float().mean().item()}


def epoch_line(row: dict) -> str:
    """The one log line printed after an epoch, from its history row."""
    return (f"epoch {row['epoch']:>3} [{row['stage']}] train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
            f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | {row['images_per_s']:.1f} img/s"
            f" | {row['seconds']:.1f}s")


