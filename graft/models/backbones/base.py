"""What every backbone source returns: the network, its preprocessing, and weights read safely from files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from graft.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Range, check_number
from graft.errors import GraftError

__all__ = [
    "GRAFT_TRUNK_PREFIX",
    "Backbone",
    "Preprocessing",
    "did_you_mean",
    "file_preprocessing",
    "load_trunk_weights",
    "read_weights_file",
    "run_weights_path",
    "timm_cfg_preprocessing",
    "trunk_of_graft_run",
]


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect of an image: size, normalisation, resampling and crop. Saved with every model."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    @classmethod
    def from_timm_cfg(cls, cfg: dict) -> Preprocessing:
        return cls(
            input_size=tuple(cfg.get("input_size", (3, 224, 224))[-2:]),
            mean=tuple(float(v) for v in cfg.get("mean", cls.mean)),
            std=tuple(float(v) for v in cfg.get("std", cls.std)),
            interpolation=cfg.get("interpolation") or "bilinear",
            crop_pct=float(cfg.get("crop_pct") or 0.875),
        )

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocessing:
        """Raises ValueError (or KeyError) for anything a network could not be fed with."""
        def numbers(key: str, count: int) -> tuple:
            values = raw[key]
            if not isinstance(values, (list, tuple)) or len(values) != count or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"{key} must be {count} numbers, got {values!r:.60}")
            return tuple(values)

        size, mean, std = numbers("input_size", 2), numbers("mean", 3), numbers("std", 3)
        if min(size) < 1 or min(std) <= 0 or not 0 < float(raw["crop_pct"]) <= 2:
            raise ValueError("input_size and std must be positive and crop_pct in (0, 2]")
        if max(size) > MAX_IMAGE_SIZE:  # refused before a network or a batch of that size is allocated
            raise ValueError(f"input_size {list(size)} is beyond the limit of {MAX_IMAGE_SIZE} pixels a side")
        return cls(input_size=tuple(int(v) for v in size), mean=mean, std=std, interpolation=str(raw["interpolation"]),
                   crop_pct=float(raw["crop_pct"]))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def with_size(self, size: int | None) -> Preprocessing:
        """The same normalisation at another (square) input size; None keeps the size."""
        if size is None:
            return self
        check_number("image size", size, Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), integer=True)
        return Preprocessing((size, size), self.mean, self.std, self.interpolation, self.crop_pct)


# ----------------------------------------------------------------------------------------------------------- the result


@dataclass
class Backbone:
    """A network whose classifier has been removed, with where its weights and preprocessing came from.

    ``net`` honours timm's contract: ``forward_features``, ``forward_head(x, pre_logits=True)``,
    ``reset_classifier``, ``num_features``, ``group_matcher`` and ``feature_info`` (stage nodes).
    """

    name: str  # as given, e.g. resnet50.a1_in1k or tv:resnet18
    net: nn.Module
    preprocessing: Preprocessing
    weights: str  # where the weights came from: "random", "hub:timm/...", "package:...", "file:PATH sha256=..."
    stage_nodes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------------- weights files


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a state dict from .safetensors (with its metadata) or a torch file with ``weights_only=True``.

    Torch files that need full unpickling (arbitrary code) are refused, never executed.
    """
    path = run_weights_path(Path(path))
    if not path.is_file():
        raise GraftError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from graft.utils.safefiles import read_safetensors

        state, metadata = read_safetensors(path, "download or export it again, or pass another --weights file")
        return trunk_of_graft_run(state), metadata
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0][:200]
        raise GraftError(
            f"{path}: refused to load ({reason}); graft reads only plain tensors from torch files. "
            "Convert it to .safetensors on a machine where you trust it"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GraftError(f"{path}: expected a state dict of tensors (name → tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}, {}


GRAFT_TRUNK_PREFIX = "trunk.net."  # a graft run's model.safetensors: the backbone under trunk.net., the head under head.


def run_weights_path(path: Path) -> Path:
    """``--weights RUN_DIR`` means the run's ``model.safetensors``; any other path is itself."""
    if path.is_dir() and (path / "graft.json").is_file():
        return path / "model.safetensors"
    return path


def trunk_of_graft_run(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors under their own names when ``state`` is a graft run's (the head is dropped: it is
    trained anew for the new classes); any other state dict unchanged."""
    if not any(key.startswith(GRAFT_TRUNK_PREFIX) for key in state):
        return state
    return {key.removeprefix(GRAFT_TRUNK_PREFIX): value for key, value in state.items()
            if key.startswith(GRAFT_TRUNK_PREFIX)}


def load_trunk_weights(net: nn.Module, state: dict[str, torch.Tensor], origin: str, by_order: bool = False) -> None:
    """Loads weights into a net whose classifier was removed: classifier tensors in ``state`` are dropped, every
    trunk tensor must be present with the right shape (never half-loaded).

    Args:
        by_order: match tensors by position instead of name (for files whose names differ but order matches).
    """
    target = net.state_dict()
    if by_order:
        source = list(state.values())
        if len(source) < len(target):
            raise GraftError(f"{origin}: has {len(source)} tensors, the network needs {len(target)}")
        state = dict(zip(target.keys(), source[: len(target)]))
    missing = [key for key in target if key not in state]
    if missing:
        raise GraftError(
            f"{origin}: {len(missing)} trunk tensors missing (e.g. {missing[0]}); is it for this architecture?"
        )
    wrong = [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        key = wrong[0]
        raise GraftError(
            f"{origin}: tensor {key} has shape {tuple(state[key].shape)}, the network needs {tuple(target[key].shape)}"
        )
    net.load_state_dict({key: state[key] for key in target}, strict=True)


def did_you_mean(name: str, candidates: list[str]) -> str:
    """The hint " Did you mean a, b?" naming up to three close candidates, or an empty string when none is close."""
    import difflib

    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def file_preprocessing(path: Path, metadata: dict[str, str], tag_cfg: dict | None, name: str) -> Preprocessing:
    """Preprocessing that travels with a local weights file: its safetensors metadata, a config.json beside it
    (timm/Hugging Face style), or the pretrained config of an explicitly named tag. Never a silent default."""
    if "graft.preprocessing" in metadata:
        try:
            return Preprocessing.from_dict(json.loads(metadata["graft.preprocessing"]))  # checks ranges and the size limit
        except (KeyError, TypeError, ValueError) as error:
            raise GraftError(f"{path}: its graft.preprocessing metadata is invalid ({error!s:.120}); export the "
                             "weights again") from None
    graft_card = path.parent / "graft.json"  # a graft run's weights: the preprocessing it was trained with
    if path.name == "model.safetensors" and "graft.format_version" in metadata and graft_card.is_file():
        try:
            return Preprocessing.from_dict(json.loads(graft_card.read_text(encoding="utf-8"))["preprocessing"])
        except (KeyError, TypeError, ValueError) as error:
            raise GraftError(f"{graft_card}: its preprocessing is unreadable ({error!s:.120}); pass the run's "
                             "model.safetensors with a valid graft.json beside it") from None
    for sidecar in (path.with_suffix(".json"), path.parent / "config.json"):
        if sidecar.is_file():
            preprocessing = _sidecar_preprocessing(sidecar)
            if preprocessing is not None:
                return preprocessing
    if tag_cfg is not None:
        return Preprocessing.from_timm_cfg(tag_cfg)
    raise GraftError(
        f"{path}: cannot tell which preprocessing these weights expect; name the pretrained tag "
        f"(e.g. --backbone {name}.TAG, see `timm.list_pretrained('{name}*')`) "
        "or put a config.json with mean/std beside it"
    )


def _sidecar_preprocessing(sidecar: Path) -> Preprocessing | None:
    """The preprocessing in a timm/Hugging Face config.json beside a weights file; None if it names no mean/std.

    Raises:
        GraftError: for a file that is not a JSON object or whose values could not feed a network.
    """
    fix = "fix or delete it (or name the pretrained tag with --backbone NAME.TAG)"
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GraftError(f"{sidecar}: not readable JSON ({error!s:.100}); {fix}") from None
    cfg = raw.get("pretrained_cfg", raw) if isinstance(raw, dict) else raw
    if not isinstance(cfg, dict):
        raise GraftError(f"{sidecar}: expected a JSON object with mean/std, found {type(cfg).__name__}; {fix}")
    if "mean" not in cfg or "std" not in cfg:
        return None
    try:
        return timm_cfg_preprocessing(cfg)
    except (TypeError, ValueError) as error:
        raise GraftError(f"{sidecar}: invalid preprocessing ({error!s:.120}); {fix}") from None


def timm_cfg_preprocessing(cfg: dict) -> Preprocessing:
    """The preprocessing of a timm pretrained config read from a file, checked as ``Preprocessing.from_dict`` checks
    graft's own (types, three finite means and positive stds, ranges, the size limit); timm's defaults fill gaps.

    Raises:
        ValueError: naming the field, for a value that could not feed a network (``mean: "abc"``, a NaN, two stds).
    """
    size = cfg.get("input_size", (3, 224, 224))
    if not isinstance(size, (list, tuple)) or len(size) < 2:
        raise ValueError(f"input_size must be [C, H, W], got {size!r:.40}")
    interpolation = cfg.get("interpolation") or "bilinear"
    if not isinstance(interpolation, str):
        raise ValueError(f"interpolation must be a name such as bicubic, got {interpolation!r:.40}")
    crop_pct = cfg.get("crop_pct") or 0.875
    if not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool) or not math.isfinite(crop_pct):
        raise ValueError(f"crop_pct must be a number in (0, 2], got {crop_pct!r:.40}")
    values = {"input_size": list(size[-2:]), "mean": cfg.get("mean", Preprocessing.mean),
              "std": cfg.get("std", Preprocessing.std), "interpolation": interpolation, "crop_pct": crop_pct}
    return Preprocessing.from_dict(values)  # from_dict checks types, counts, ranges and the size limit
