"""Multi-label metrics from per-class probabilities: average precision per class and its mean (mAP), precision,
recall and F1 at the decision thresholds (per class, micro and macro), the exact-match ratio and the binary
cross-entropy.

Average precision is scikit-learn's definition (``average_precision_score``): Σₙ (Rₙ − Rₙ₋₁)·Pₙ over the distinct
scores from the highest down, no interpolation. mAP averages it over the classes with at least one positive image
(a class without one has no defined AP; it is listed with ``ap`` None).
"""

from __future__ import annotations

import numpy as np

from graft.errors import GraftError

__all__ = ["average_precision", "label_sets", "multilabel_metrics", "plot_precision_recall",
           "precision_recall_steps"]


def precision_recall_steps(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(precision, recall) at each distinct score from the highest down (tied scores form one step); None without a
    positive image."""
    truth = np.asarray(truth) > 0.5
    positives = int(truth.sum())
    if not positives:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked, hits = np.asarray(scores, dtype=np.float64)[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]  # the last image of each distinct score
    true_positives = np.cumsum(hits)[last]
    return true_positives / (last + 1), true_positives / positives


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """One class's average precision (None without a positive image)."""
    steps = precision_recall_steps(scores, truth)
    if steps is None:
        return None
    precision, recall = steps
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def plot_precision_recall(probabilities: np.ndarray, targets: np.ndarray, classes: list[str], title: str, path
                          ) -> None:
    """One precision–recall curve per class (the steps AP sums over), AP in the legend, written as a PNG at
    ``path``. Needs matplotlib (``graft.utils.plotting``)."""
    from graft.utils.plotting import pyplot, save_figure

    figure, axis = pyplot().subplots(figsize=(6, 4.5))
    for index, name in enumerate(classes):
        steps = precision_recall_steps(np.asarray(probabilities)[:, index], np.asarray(targets)[:, index])
        if steps is not None:
            precision, recall = steps
            ap = average_precision(np.asarray(probabilities)[:, index], np.asarray(targets)[:, index])
            axis.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", label=f"{name} (AP {ap:.3f})")
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01), title=title)
    axis.legend(fontsize=7, loc="lower left", ncol=1 + len(classes) // 12)
    save_figure(figure, path)


def _f1(true_positives: int, predicted: int, actual: int) -> tuple[float, float, float]:
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual if actual else 0.0
    return precision, recall, (2 * true_positives / (predicted + actual) if predicted + actual else 0.0)


def label_sets(probabilities: np.ndarray, thresholds) -> np.ndarray:
    """The predicted multi-hot sets: a class is in an image's set when its probability reaches the class's
    threshold."""
    return np.asarray(probabilities) >= np.asarray(thresholds, dtype=np.float64)[None, :]


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, classes: list[str], thresholds) -> dict:
    """mAP, per-class AP/precision/recall/F1/support/threshold, micro and macro F1, exact match and the mean binary
    cross-entropy (summed over the classes) of (N, classes) probabilities against multi-hot ``targets``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(targets) > 0.5
    if not len(truth):
        raise GraftError("no images to evaluate")
    predicted = label_sets(probabilities, thresholds)
    per_class = []
    for index, name in enumerate(classes):
        hits = int((predicted[:, index] & truth[:, index]).sum())
        precision, recall, f1 = _f1(hits, int(predicted[:, index].sum()), int(truth[:, index].sum()))
        per_class.append({"class": name, "ap": average_precision(probabilities[:, index], truth[:, index]),
                          "precision": precision, "recall": recall, "f1": f1, "support": int(truth[:, index].sum()),
                          "threshold": float(thresholds[index])})
    aps = [row["ap"] for row in per_class if row["ap"] is not None]
    _, _, micro = _f1(int((predicted & truth).sum()), int(predicted.sum()), int(truth.sum()))
    clipped = np.clip(probabilities, 1e-12, 1 - 1e-12)
    loss = -(truth * np.log(clipped) + ~truth * np.log(1 - clipped)).sum(1).mean()
    return {
        "images": len(truth),
        "multi_label": True,
        "mAP": float(np.mean(aps)) if aps else None,
        "micro_f1": micro,
        "macro_f1": sum(row["f1"] for row in per_class) / len(classes),
        "exact_match": float((predicted == truth).all(1).mean()),
        "loss": float(loss),
        "per_class": per_class,
        "classes": list(classes),
    }
