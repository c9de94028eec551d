"""Classification metrics from logits: accuracy, top-k, per-class, confusion, calibration error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.errors import GraftError

__all__ = ["CONFIDENCE_GAP", "calibration", "calibration_sentence", "classification_metrics",
           "expected_calibration_error", "reliability_bins"]


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
        **calibration(logits.float().softmax(dim=1), labels),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }


CONFIDENCE_GAP = 0.05  # mean confidence this far from accuracy (and an ECE at least this) earns a verdict


def calibration(probabilities: torch.Tensor, labels: torch.Tensor) -> dict:
    """ECE, mean top-1 confidence and a verdict: ``over-confident`` (confidence above accuracy by more than
    ``CONFIDENCE_GAP``), ``under-confident`` (below it by as much) or ``calibrated``."""
    ece = expected_calibration_error(probabilities, labels)
    confidence = probabilities.max(dim=1).values.mean().item()
    gap = confidence - (probabilities.argmax(dim=1) == labels).float().mean().item()
    verdict = "calibrated"
    if ece >= CONFIDENCE_GAP and abs(gap) > CONFIDENCE_GAP:
        verdict = "over-confident" if gap > 0 else "under-confident"
    return {"ece": ece, "mean_confidence": confidence, "calibration": verdict}


def calibration_sentence(metrics: dict) -> str:
    """The verdict in words, for the report and the page: what the probabilities are worth."""
    numbers = f"mean confidence {metrics['mean_confidence']:.1%} against accuracy {metrics['accuracy']:.1%}"
    meaning = {"over-confident": "its probabilities overstate how often it is right",
               "under-confident": "its probabilities understate how often it is right",
               "calibrated": "its probabilities can be read as chances"}[metrics["calibration"]]
    return f"{metrics['calibration']}: {numbers}, ECE {metrics['ece']:.3f}; {meaning}"


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[dict]:
    """Per equal-width confidence bin ``(low, high]``: count, mean confidence, accuracy (None when empty).

    The one binning of calibration: the reliability diagram draws these rows and the ECE is computed from them.
    """
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (confidence > low) & (confidence <= high)
        count = int(inside.sum())
        rows.append({"low": low, "high": high, "count": count,
                     "confidence": confidence[inside].mean().item() if count else None,
                     "accuracy": correct[inside].mean().item() if count else None})
    return rows


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over ``reliability_bins``' bins."""
    rows = reliability_bins(probabilities, labels, bins)
    total = len(labels)
    return sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"])
