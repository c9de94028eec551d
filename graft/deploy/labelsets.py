"""``graft serve`` on a multi-label run (label sets): what ``/predict`` and ``/metadata`` add, and what is refused.

A multi-label run gives every class its own sigmoid and its own threshold, chosen on validation when the run was
fitted and kept in its graft.json (``GraftModel.thresholds``, read by ``graft.models.run_folder.load`` as for
``graft predict``). Each answer row is then:

- ``labels`` / ``probabilities``: the label set, every class whose probability reaches its threshold, most
  probable first (possibly empty); the same rows ``graft predict`` gives (``label_set_prediction``);
- ``classes``: every class with its ``probability``, ``threshold`` and ``passed``, most probable first; the page
  draws these as bars with the threshold marked.

``--top-k`` does not cut a set (a set has no k). Grad-CAM (``/explain``), the ``--audit`` review page and the
``--label`` labelling page work on one class per image and are refused in one line (docs/decisions.md).
"""

from __future__ import annotations

import os

import torch

from graft.deploy.uploads import ApiError
from graft.models.prediction import label_set_prediction
from graft.models.run_folder import read_card, refuse_label_sets
from graft.utils.text import display_name

__all__ = [
    "EXPLAIN_REFUSAL", "add_explain_refusal", "label_set_metadata", "label_set_row", "refuse_one_label_mode"
]

EXPLAIN_REFUSAL = ("a multi-label model (label sets): /explain draws Grad-CAM for single-label models only, as graft "
                   "explain does; /predict gives every class's probability and threshold")


def label_set_row(name: str, probabilities: torch.Tensor, labels: list[str], thresholds: list[float]) -> dict:
    """One image's answer: its set (``labels``, ``probabilities``) and every class against its threshold.

    Args:
        probabilities: the image's sigmoid probabilities, one per class (averaged over TTA views).
        labels: the class names as shown (``display_name``), in the model's class order.
    """
    chosen = label_set_prediction(display_name(name), probabilities, labels, thresholds)
    values = probabilities.tolist()
    order = sorted(range(len(labels)), key=lambda index: -values[index])
    return {"file": chosen.path, "labels": chosen.labels, "probabilities": chosen.probabilities,
            "classes": [{"label": labels[index], "probability": round(values[index], 6),
                         "threshold": thresholds[index], "passed": values[index] >= thresholds[index]}
                        for index in order]}


def label_set_metadata(thresholds: list[float] | None) -> dict:
    """``/metadata``'s ``multi_label`` flag, and the thresholds in class order when it is set."""
    return {"multi_label": True, "thresholds": list(thresholds)} if thresholds is not None else {"multi_label": False}


def refuse_one_label_mode(run_dirs, mode: str) -> None:
    """Refuses a multi-label run in ``graft serve``'s ``mode`` (``--audit``, ``--label``): both pages decide one
    label per image.

    Raises:
        GraftError: one of ``run_dirs`` (a run folder or several) is a multi-label run.
    """
    for run in [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs:
        refuse_label_sets(read_card(run), run, f"graft serve {mode} (one label per image)")


def add_explain_refusal(app) -> None:
    """``POST /explain`` answers 422 with ``EXPLAIN_REFUSAL``; it stays out of ``/metadata``'s endpoints, so the
    page offers no explain switch."""
    @app.post("/explain", include_in_schema=False)
    async def explain():
        raise ApiError(422, EXPLAIN_REFUSAL)
