"""Configuration dataclasses: defaults, then a YAML file, then explicit overrides (the CLI's flags), in that order.

Every run folder stores the full resolved config in ``graft.json`` so a saved model can be rebuilt and re-run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graft.errors import GraftError

STRATEGIES = ("probe", "finetune", "scratch", "auto")
OPTIMIZERS = ("adamw", "sgd")
AUGMENTATIONS = ("standard", "light", "none")
POOLS = ("avg", "avgmax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BN_STATS = ("auto", "update", "frozen")
BALANCES = ("none", "sampler", "loss")
HEAD_FITS = ("lbfgs", "epochs")
BN_AUTO_FROZEN_BELOW = 2000  # training images


@dataclass
class DataConfig:
    """Where the images are and how they are fed to the network."""

    path: str = ""  # class-per-folder tree (optionally with train/ val/ test/) or a CSV manifest (path,label[,split])
    val_fraction: float = 0.2  # used only when the data has no val/ split of its own
    image_size: int | None = None  # None: the backbone's pretrained input size; smaller is faster on CPU
    augment: str = "standard"  # standard: random-resized-crop + flip; light: milder crops; none: eval transform
    hflip: bool = True  # turn off for data where mirroring changes the class (digits, text)
    batch_size: int = 32
    workers: int = -1  # DataLoader workers; -1: none on the CPU (they steal its cores), up to 8 on a GPU
    max_image_pixels: int = 89_478_485  # Pillow's default bomb limit; larger images are skipped and listed
    augment_views: int = 0  # cached probes: also cache this many augmented views of each training image
    cache_dir: str | None = None  # feature cache; None: $GRAFT_CACHE or ~/.cache/graft/features


@dataclass
class ModelConfig:
    """The backbone, where it is cut, and the new head grafted on."""

    backbone: str = "tf_efficientnet_lite0"  # timm name[.tag], or tv:NAME[.WEIGHTS] for torchvision
    weights: str | None = None  # local .safetensors/.pth file to use instead of downloading
    pretrained: bool = True  # False: random init (the `scratch` strategy forces this)
    cut_at: str | None = None  # None: the backbone's own pooled features; else a node name from `graft layers`
    pool: str = "avg"  # global pooling after the cut: avg, or avgmax (concatenated average and max)
    head: str = "linear"  # linear, or mlp:512 / mlp:512,256 (BN + ReLU + dropout between layers)
    dropout: float = 0.0  # dropout before the final linear layer
    # lab networks (small-cnn-cifar, small-cnn-catsdogs, vgg-like) only:
    activation: str = "relu"  # relu leaky_relu prelu elu selu gelu swish maxout tanh sigmoid
    norm: str = "none"  # batch | layer | instance | group | none
    init: str = "kaiming"  # kaiming | xavier | normal:STD
    vgg_stages: str = "2x32,2x64,2x128"  # vgg-like: CONVSxWIDTH per stage


@dataclass
class TrainConfig:
    """How the head and trunk are trained."""

    strategy: str = "finetune"  # probe | finetune | scratch | auto (graft advise decides)
    epochs: int = 10  # epochs of the main stage (the whole-network stage for finetune/scratch, the head for probe)
    head_epochs: int = 2  # finetune with head_fit=epochs: head-only epochs on the frozen trunk before unfreezing
    head_fit: str = "lbfgs"  # linear heads on a frozen trunk: lbfgs (cached features, L2 path, to convergence) or
    # epochs (the classic way: a forward pass per epoch). finetune then starts from that probe (LP-FT)
    balance: str = "none"  # imbalanced classes: sampler (draw classes equally often) or loss (inverse-frequency
    # class weights in the loss); either weights the solved probe's loss too
    lr: float | str = 1e-3  # head learning rate (the trunk gets lr * finetune_lr_ratio); "auto": graft lr-find picks
    time_budget: float = 0.0  # seconds of training for the run (0: no limit); the last stage's schedule is re-planned
    # after its first epoch so it ends annealed within the budget (graft compare's equal-budget comparison)
    finetune_lr_ratio: float = 0.1  # the seeds' "1/10 of the original learning rate" for fine-tuning
    stem_lr_ratio: float = 0.1  # discriminative LR: the stem's rate relative to the top stage's, geometric between
    unfreeze: str = "all"  # all, or last:K to fine-tune only the last K stages
    bn_stats: str = "auto"  # unfrozen batch norm: update running statistics, keep them frozen, or auto (pretrained
    # statistics frozen below 2,000 training images, where batch statistics are noise, and whenever fine-tuning
    # starts from the solved probe, which they would undo)
    precise_bn: bool = False  # after training, recompute BN statistics over the whole training set (eval transform)
    optimizer: str = "adamw"  # adamw | sgd (with Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # fraction of each stage's steps spent warming the LR up linearly
    label_smoothing: float = 0.1
    patience: int = 5  # early stopping: stop after this many epochs without a better val loss; 0 disables
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto: bf16 autocast on CUDA where supported, fp16 otherwise, fp32 on CPU
    channels_last: bool = True  # measured 1.4-1.8x faster on a 2-core CPU (bench/RESULTS.md); what tensor cores want
    limit_batches: int = 0  # smoke runs: stop each epoch after this many batches (0: no limit)


@dataclass
class FitConfig:
    """Everything `graft fit` needs; stored in every run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = "runs/graft"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> FitConfig:
        """Builds a config from nested dicts, rejecting unknown keys with the key's name and where it came from."""
        config = cls()
        apply_overrides(config, _flatten(raw), source)
        return config


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def apply_overrides(config: FitConfig, overrides: dict[str, Any], source: str = "overrides") -> FitConfig:
    """Sets dotted keys (``train.lr``, ``model.backbone``, ``output``) on ``config`` in place; None values are skipped.

    Raises:
        GraftError: for an unknown key, naming the valid ones.
    """
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target: Any = config
        for part in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise GraftError(f"{source}: unknown section '{part}' in '{dotted}' (sections: data, model, train)")
            target = getattr(target, part)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields:
            raise GraftError(f"{source}: unknown key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
        setattr(target, leaf, _coerce(fields[leaf].type, value, dotted, source))
    return config


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _coerce(annotation: str, value: Any, dotted: str, source: str) -> Any:
    """Checks a value against its field's annotation (``int``, ``float | None``, ...): a hand-edited or tampered file
    fails here with the key's name instead of deep inside training. YAML's ``1e-3`` (a string to PyYAML) is a float."""
    names = [part.strip() for part in str(annotation).split("|")]
    if value is None and "None" in names:
        return None
    kind = _TYPES.get(names[0])
    if kind is None:
        return value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            if "str" in names:
                return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise GraftError(f"{source}: '{dotted}' must be {' or '.join(names)}, got {value!r}")


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FitConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (dotted keys), validated."""
    config = FitConfig()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise GraftError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise GraftError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise GraftError(f"{path}: expected a mapping with sections data/model/train at the top level")
        apply_overrides(config, _flatten(raw), str(path))
    apply_overrides(config, overrides or {})
    validate(config)
    return config


def parse_head(spec: str) -> list[int]:
    """``linear`` or ``sigmoid`` → [], ``mlp:512,256`` → [512, 256] (hidden widths)."""
    if spec in ("linear", "sigmoid"):
        return []
    match = re.fullmatch(r"mlp:(\d+(?:,\d+)*)", spec)
    if not match:
        raise GraftError(f"head '{spec}' not understood: use 'linear', 'sigmoid' (two classes, one logit) or "
                         "'mlp:WIDTH[,WIDTH...]' (e.g. mlp:512)")
    return [int(width) for width in match.group(1).split(",")]


def parse_unfreeze(spec: str) -> int | None:
    """``all`` → None (every stage), ``last:2`` → 2."""
    if spec == "all":
        return None
    match = re.fullmatch(r"last:(\d+)", spec)
    if not match or int(match.group(1)) < 1:
        raise GraftError(f"unfreeze '{spec}' not understood: use 'all' or 'last:K' with K >= 1 (e.g. last:2)")
    return int(match.group(1))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise GraftError(f"{name} '{value}' not understood: choose one of {', '.join(choices)}")


def validate(config: FitConfig) -> None:
    """Checks every field a user can set, with a message that names the field and the fix."""
    _check_choice("strategy", config.train.strategy, STRATEGIES)
    _check_choice("optimizer", config.train.optimizer, OPTIMIZERS)
    _check_choice("augment", config.data.augment, AUGMENTATIONS)
    _check_choice("pool", config.model.pool, POOLS)
    _check_choice("precision", config.train.precision, PRECISIONS)
    _check_choice("bn_stats", config.train.bn_stats, BN_STATS)
    _check_choice("head_fit", config.train.head_fit, HEAD_FITS)
    _check_choice("balance", config.train.balance, BALANCES)
    from graft.lab import ArchOptions

    model = config.model
    ArchOptions(model.activation, model.norm, model.init, model.vgg_stages).validate()
    parse_head(config.model.head)
    parse_unfreeze(config.train.unfreeze)
    if not 0.0 < config.data.val_fraction < 1.0:
        raise GraftError(f"val_fraction must be between 0 and 1 (exclusive), got {config.data.val_fraction}")
    if config.data.image_size is not None and config.data.image_size < 8:
        raise GraftError(f"image_size must be at least 8 pixels, got {config.data.image_size}")
    for name in ("epochs", "batch_size"):
        section = config.train if hasattr(config.train, name) else config.data
        if getattr(section, name) < 1:
            raise GraftError(f"{name} must be at least 1, got {getattr(section, name)}")
    if config.train.head_epochs < 0 or config.train.patience < 0:
        raise GraftError("head_epochs and patience must be >= 0")
    if config.train.lr != "auto" and (isinstance(config.train.lr, str) or config.train.lr <= 0):
        raise GraftError(f"lr must be positive or 'auto' (a learning-rate finder run first), got {config.train.lr}")
    if not 0.0 <= config.model.dropout < 1.0:
        raise GraftError(f"dropout must be in [0, 1), got {config.model.dropout}")
