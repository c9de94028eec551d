"""The grafted model (cut trunk + new head) and the run folder it lives in.

A run folder holds ``model.safetensors`` (every weight, trunk included) and ``graft.json`` (config, backbone, cut
node, head, classes, preprocessing, versions), so ``load(folder)`` rebuilds the model with no network access.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from graft.backbones import Preprocessing, create_backbone
from graft import lab
from graft.config import FitConfig, ModelConfig, validate
from graft.errors import GraftError
from graft.safefiles import read_safetensors
from graft.heads import build_head
from graft.outputs import record, temp_prefix
from graft.surgery import DEFAULT_NODE, Trunk, cut, keep_frozen_norms_eval

FORMAT_VERSION = 1  # bump when graft.json changes incompatibly; load() refuses newer folders


class GraftModel(nn.Module):
    """``head(trunk(x))`` with the class names and preprocessing it was trained with.

    ``train()`` keeps frozen parts honest: a fully frozen trunk runs entirely in eval mode (no dropout, no BN
    statistics updates) and without autograd; a partly frozen one keeps its frozen batch-norm layers in eval mode.
    """

    def __init__(self, trunk: Trunk, head: nn.Module, classes: list[str], preprocessing: Preprocessing):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.freeze_bn_stats = False  # True: every trunk BN normalises with its running statistics, even if trained

    def trunk_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.trunk.parameters())

    def train(self, mode: bool = True) -> GraftModel:
        super().train(mode)
        if mode and self.trunk_frozen():
            self.trunk.eval()
        elif mode:
            keep_frozen_norms_eval(self.trunk, every_norm=self.freeze_bn_stats)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.trunk_frozen():
            with torch.no_grad():  # nothing below the head learns: skip the trunk's autograd graph entirely
                features = self.trunk(x)
            return self.head(features)
        return self.head(self.trunk(x))


@dataclass
class ModelSpec:
    """What is needed to rebuild a GraftModel's architecture (weights come separately)."""

    backbone: str
    cut_at: str
    pool: str
    head: str
    dropout: float
    classes: list[str]
    preprocessing: Preprocessing


def backbone_name(model: ModelConfig) -> str:
    """The backbone name to build and record: a lab network's name carries its options (see ``graft.lab``)."""
    options = lab.ArchOptions(model.activation, model.norm, model.init, model.vgg_stages)
    if model.backbone in lab.ARCHITECTURES:
        return lab.lab_backbone_name(model.backbone, options)
    if options != lab.ArchOptions():
        raise GraftError(f"--activation, --norm, --init and --vgg-stages shape the lab networks "
                         f"({', '.join(lab.ARCHITECTURES)}); '{model.backbone}' keeps its own")
    return model.backbone


def build_model(config: FitConfig, classes: list[str], mean_std: tuple | None = None) -> tuple[GraftModel, dict]:
    """Creates the backbone (pretrained unless the strategy is ``scratch``), cuts it and grafts a new head.

    Args:
        mean_std: per-channel (mean, std) of the training data, replacing the backbone's (scratch training).

    Returns:
        The model and a dict describing the backbone (name, weights source, feature width, cut node).
    """
    pretrained = config.model.pretrained and config.train.strategy != "scratch"
    name = backbone_name(config.model)
    backbone = create_backbone(name, pretrained=pretrained, weights_file=config.model.weights if pretrained else None)
    preprocessing = backbone.preprocessing.with_size(config.data.image_size)
    if mean_std is not None:
        preprocessing = dataclasses.replace(preprocessing, mean=tuple(mean_std[0]), std=tuple(mean_std[1]))
    trunk, width = cut(backbone.net, config.model.cut_at, config.model.pool, preprocessing.input_size)
    head = build_head(width, len(classes), config.model.head, config.model.dropout)
    info = {"backbone": name, "weights": backbone.weights, "feature_dim": width, "cut_at": trunk.node,
            "stage_nodes": backbone.stage_nodes}
    return GraftModel(trunk, head, classes, preprocessing), info


def rebuild(spec: ModelSpec) -> GraftModel:
    """The architecture from a spec, randomly initialised, with no network access (weights are loaded after)."""
    backbone = create_backbone(spec.backbone, pretrained=False)
    node = None if spec.cut_at == DEFAULT_NODE else spec.cut_at
    trunk, width = cut(backbone.net, node, spec.pool, spec.preprocessing.input_size)
    head = build_head(width, len(spec.classes), spec.head, spec.dropout)
    return GraftModel(trunk, head, spec.classes, spec.preprocessing)


# ---------------------------------------------------------------------------------------------------------- files


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | os.PathLike, write) -> None:
    """Writes through ``write(temp_path)`` to a temp file beside ``path``, fsyncs and renames: never half a file.

    The temp file is ``.graft-tmp-NAME.*`` (see ``graft.outputs``): the only names a clean-up may remove.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)  # a name no user picks
    os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run folder is shared like any other file
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
        _fsync_folder(path.parent)
        record(path)  # into the folder's manifest if graft made the folder: what --overwrite may remove
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":  # safetensors wraps io errors
            raise GraftError(_write_error(path, error)) from None
        raise


def _write_error(path: Path, error: BaseException) -> str:
    text = str(error)
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
    hint = "the disk is full: free space, then continue with --resume" if full else "check the folder is writable"
    reason = getattr(error, "strerror", None) or text.splitlines()[0][:200]
    return f"{path}: could not be written ({reason}); the previous version is intact; {hint}"


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable (POSIX); a power cut after it then cannot bring back the old file."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its rename is durable enough
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_json(path: str | os.PathLike, data) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=2) + "\n"))


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


def save_weights(path: str | os.PathLike, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda temp: save_file(state, temp, metadata=metadata or {}))


def versions() -> dict[str, str]:
    import timm
    import torchvision

    from graft import __version__

    return {
        "graft": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "python": platform.python_version(),
    }


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
    return model.to(device).eval()
