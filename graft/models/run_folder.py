"""The grafted model (cut trunk + new head) and the run folder it lives in.

A run folder holds ``model.safetensors`` (every weight, trunk included) and ``graft.json`` (config, backbone, cut
node, head, classes, preprocessing, versions), so ``load(folder)`` rebuilds the model with no network access.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from graft.config import FitConfig, validate
from graft.errors import GraftError
from graft.models.backbones.base import Preprocessing
from graft.models.grafted import GraftModel, ModelSpec, rebuild
from graft.utils.files import save_weights, write_json
from graft.utils.safefiles import read_safetensors
from graft.utils.versions import versions

__all__ = [
    "CARD_FIELDS", "FORMAT_VERSION", "HISTORY", "check_finite", "config_from_card", "load", "model_card",
    "non_finite_tensors",
    "read_card", "refuse_label_sets", "read_history", "save_model", "spec_from_card", "trained_as"
]

FORMAT_VERSION = 1  # bump when graft.json changes incompatibly; load() refuses newer folders
HISTORY = "history.csv"  # one row per epoch, written by the fit (graft.training.checkpoints.write_history)


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run folder's ``history.csv`` as dicts of strings; [] when the run wrote none (e.g. a probe)."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_finite(state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuses weights with NaN or infinite values: such a model predicts blank labels without any error.

    Raises:
        GraftError: naming ``source`` and the first tensors at fault.
    """
    bad = non_finite_tensors(state)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise GraftError(f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
                         f"{more}); the training diverged: train again with a lower --lr")


def model_card(model: GraftModel, config: FitConfig, info: dict) -> dict:
    """The contents of graft.json: everything `predict` needs, plus provenance."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": info.get("backbone", config.model.backbone),
        "weights": info["weights"],
        "cut_at": model.trunk.node,
        "pool": config.model.pool,
        "head": config.model.head,
        "dropout": config.model.dropout,
        "feature_dim": info["feature_dim"],
        "classes": model.classes,
        "preprocessing": model.preprocessing.to_dict(),
        "strategy": config.train.strategy,
        "config": config.to_dict(),
        "versions": versions(),
    }


def save_model(run_dir: str | os.PathLike, model: GraftModel, card: dict) -> None:
    """Writes ``model.safetensors`` and ``graft.json`` (both atomically)."""
    run_dir = Path(run_dir)
    save_weights(run_dir / "model.safetensors", model, {"graft.format_version": str(FORMAT_VERSION)})
    write_json(run_dir / "graft.json", card)


def trained_as(card: dict) -> str:
    """What the saved model is, in words: the strategy, or which candidate was kept when fine-tuning was compared
    with the solved probe (graft.json's ``kept``)."""
    strategy, kept = str(card.get("strategy", "?")), card.get("kept")
    if kept == "probe" and strategy != "probe":
        return f"probe (--strategy {strategy} fine-tuned, did not beat the probe on validation, and was discarded)"
    if kept == "finetune":
        return f"{strategy} (fine-tuned; beat the solved probe on validation)"
    return strategy


CARD_FIELDS = {"format_version": int, "backbone": str, "cut_at": str, "pool": str, "head": str, "classes": list,
               "preprocessing": dict}  # the schema graft.json must satisfy; "config" (a dict) is checked key by key


def read_card(run_dir: str | os.PathLike) -> dict:
    """Reads and validates a run folder's graft.json.

    Raises:
        GraftError: for a missing, corrupt, newer-format or tampered file, naming the field at fault.
    """
    path = Path(run_dir) / "graft.json"
    if not path.is_file():
        raise GraftError(f"{run_dir}: not a graft run folder (no graft.json); pass the folder `graft fit -o` wrote")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GraftError(f"{path}: corrupt JSON ({error}); re-export the model") from None
    if not isinstance(card, dict):
        raise GraftError(f"{path}: expected a JSON object; the file is damaged or was edited by hand")
    version = card.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise GraftError(f"{path}: format_version {version} is newer than this graft understands ({FORMAT_VERSION}); "
                         "upgrade graft")
    for key, kind in CARD_FIELDS.items():
        if not isinstance(card.get(key), kind) or isinstance(card.get(key), bool):
            found = "missing" if key not in card else f"{type(card[key]).__name__} {card[key]!r:.40}"
            raise GraftError(f"{path}: '{key}' must be {kind.__name__}, found {found}; the file is damaged or was "
                             "edited by hand")
    classes = card["classes"]
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise GraftError(f"{path}: 'classes' must be two or more distinct, non-empty names")
    if not isinstance(card.get("config", {}), dict):
        raise GraftError(f"{path}: 'config' must be an object")
    if not isinstance(card.get("dropout", 0.0), (int, float)) or isinstance(card.get("dropout"), bool):
        raise GraftError(f"{path}: 'dropout' must be a number; the file is damaged or was edited by hand")
    _check_thresholds(path, card)
    try:  # types, unknown keys and ranges, on every load (predict, evaluate, export, serve), not only on resume
        config_from_card(card)
    except GraftError as error:
        raise GraftError(f"{path}: {error}") from None
    try:
        Preprocessing.from_dict(card["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise GraftError(f"{path}: 'preprocessing' is invalid ({error}); the file is damaged or was edited by hand"
                         ) from None
    return card


def _check_thresholds(path: Path, card: dict) -> None:
    """A multi-label card's ``thresholds``: one number in [0, 1] per class (``multi_label`` true with them)."""
    if "thresholds" not in card and not card.get("multi_label"):
        return
    thresholds = card.get("thresholds")
    if card.get("multi_label") is not True or not isinstance(thresholds, list) or \
            len(thresholds) != len(card["classes"]) or \
            not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds):
        raise GraftError(f"{path}: 'multi_label' must be true with 'thresholds' a number in [0, 1] per class; the "
                         "file is damaged or was edited by hand")


def refuse_label_sets(card: dict, run_dir: str | os.PathLike, command: str) -> None:
    """The one-line refusal of a command that handles single-label models only, given a multi-label run's card.

    Raises:
        GraftError: naming the run, the command and what handles label sets.
    """
    if card.get("multi_label"):
        raise GraftError(f"{run_dir}: a multi-label model (label sets); {command} handles single-label models only: "
                         "graft predict gives its label sets with probabilities")


def spec_from_card(card: dict) -> ModelSpec:
    return ModelSpec(card["backbone"], card["cut_at"], card["pool"], card["head"], float(card.get("dropout", 0.0)),
                     list(card["classes"]), Preprocessing.from_dict(card["preprocessing"]))


def config_from_card(card: dict) -> FitConfig:
    config = FitConfig.from_dict(card.get("config", {}), source="graft.json's config")
    validate(config)
    return config


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> GraftModel:
    """Rebuilds a trained model from its run folder, offline (the trunk's weights are in model.safetensors)."""
    card = read_card(run_dir)
    model = rebuild(spec_from_card(card))
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise GraftError(f"{run_dir}: model.safetensors missing; the run did not finish (resume it with --resume)")
    state, _ = read_safetensors(weights, "train the run again (graft fit --overwrite) or restore the file")
    check_finite(state, weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise GraftError(f"{weights}: does not match graft.json ({str(error).splitlines()[0]})") from None
    if card.get("multi_label"):
        model.thresholds = [float(t) for t in card["thresholds"]]
    return model.to(device).eval()
