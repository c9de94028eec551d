"""Configuration dataclasses: defaults, then a YAML file, then explicit overrides (the CLI's flags), in that order.

Every run folder stores the full resolved config in ``graft.json`` so a saved model can be rebuilt and re-run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graft.errors import GraftError

__all__ = [
    "ACTIVATIONS", "AUGMENTATIONS", "ArchOptions", "BALANCES", "BN_AUTO_FROZEN_BELOW", "BN_STATS", "DataConfig",
    "FitConfig", "HEAD_FITS", "MAX_BATCH_SIZE", "MAX_CONVS", "MAX_EPOCHS", "MAX_HEAD_LAYERS", "MAX_HEAD_WIDTH",
    "MAX_IMAGE_SIZE", "MAX_INIT_STD", "MAX_LR", "MAX_SEED", "MAX_STAGES", "MAX_WIDTH", "MIN_IMAGE_SIZE",
    "ModelConfig", "NORMS", "OPTIMIZERS", "POOLS", "PRECISIONS", "Range", "STRATEGIES", "TrainConfig",
    "apply_overrides", "check_number", "check_option", "check_ranges", "load_config", "parse_head", "parse_init",
    "parse_unfreeze", "parse_vgg_stages", "validate"
]

STRATEGIES = ("probe", "finetune", "scratch", "auto")
OPTIMIZERS = ("adamw", "sgd")
AUGMENTATIONS = ("standard", "light", "none")
POOLS = ("avg", "avgmax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BN_STATS = ("auto", "update", "frozen")
BALANCES = ("none", "sampler", "loss")
HEAD_FITS = ("lbfgs", "epochs")
BN_AUTO_FROZEN_BELOW = 2000  # training images
# Limits that keep a typo from allocating tens of GB before anything can fail cleanly (refused where the config is
# built, before a network or a batch exists). 2048 px is 80x the pixels of a 224 px ImageNet input.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 2048
MAX_BATCH_SIZE = 4096
MAX_LR = 100.0  # lr-find's sweep ends at 10 for the stage; / finetune_lr_ratio it can pass 10 for train.lr
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_HEAD_WIDTH, MAX_HEAD_LAYERS = 16384, 8  # mlp:WIDTH[,WIDTH...]


@dataclass(frozen=True)
class Range:
    """The numbers a numeric option accepts: finite, between ``low`` and ``high`` (each end open or closed)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what a special value means, e.g. "0: no limit"

    def describe(self, integer: bool) -> str:
        ends = "(" if self.low_open else "[", ")" if self.high_open else "]"
        kind = "an integer" if integer else "a finite number"
        text = f"{kind} in {ends[0]}{_show(self.low)}, {_show(self.high)}{ends[1]}"
        return text + (f" ({self.note})" if self.note else "")

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below


def _show(bound: float) -> str:
    """4294967295, not 4.29497e+09; 0.5 and 1e-07 as they are."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _ranged(default: Any, low: float, high: float, low_open: bool = False, high_open: bool = False, note: str = "",
            cli: bool = True) -> Any:
    """A dataclass field with its accepted range beside it (``cli``: the option is also a flag of `graft fit`)."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open, note), "cli": cli})


def check_number(name: str, value: Any, allowed: Range, integer: bool = False) -> None:
    """Raises GraftError naming ``name`` and the range unless ``value`` is a finite number inside ``allowed``.

    The one range check behind the config's fields and the CLI's own options (``graft serve --port`` ...).
    """
    kind = numbers.Integral if integer else numbers.Real  # numpy's numbers too
    is_number = isinstance(value, kind) and not isinstance(value, bool)
    try:
        inside = is_number and allowed.contains(float(value))
    except OverflowError:  # a 400-digit integer has no float
        inside = False
    if not inside:
        shown = f"{value:.4g}" if isinstance(value, float) else f"{value!s:.40}"
        raise GraftError(f"{name} must be {allowed.describe(integer)}, got {shown}")


def check_option(flag: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False,
                 note: str = "") -> None:
    """A CLI option's range check (None: the option was not given); integers are checked as integers."""
    if value is not None:
        check_number(flag, value, Range(low, high, low_open, high_open, note), isinstance(value, int))


@dataclass
class DataConfig:
    """Where the images are and how they are fed to the network."""

    path: str = ""  # class-per-folder tree (optionally with train/ val/ test/) or a CSV manifest (path,label[,split])
    # used only when the data has no val/ split of its own
    val_fraction: float = _ranged(0.2, 0, 1, low_open=True, high_open=True)
    # None: the backbone's pretrained input size; smaller is faster on CPU
    image_size: int | None = _ranged(None, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    augment: str = "standard"  # standard: random-resized-crop + flip; light: milder crops; none: eval transform
    hflip: bool = True  # turn off for data where mirroring changes the class (digits, text)
    batch_size: int = _ranged(32, 1, MAX_BATCH_SIZE)
    # DataLoader workers; -1: none on the CPU (they steal its cores), up to 8 on a GPU
    workers: int = _ranged(-1, -1, 64, note="-1: auto")
    # Pillow's default bomb limit; larger images are skipped and listed
    max_image_pixels: int = _ranged(89_478_485, 1, 1_000_000_000, cli=False)
    augment_views: int = _ranged(0, 0, 64)  # cached probes: also cache this many augmented views of each training image
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
    dropout: float = _ranged(0.0, 0, 1, high_open=True)  # dropout before the final linear layer
    # lab networks (small-cnn-cifar, small-cnn-catsdogs, vgg-like) only:
    activation: str = "relu"  # relu leaky_relu prelu elu selu gelu swish maxout tanh sigmoid
    norm: str = "none"  # batch | layer | instance | group | none
    init: str = "kaiming"  # kaiming | xavier | normal:STD
    vgg_stages: str = "2x32,2x64,2x128"  # vgg-like: CONVSxWIDTH per stage


@dataclass
class TrainConfig:
    """How the head and trunk are trained."""

    strategy: str = "finetune"  # probe | finetune | scratch | auto (graft advise decides)
    # epochs of the main stage (the whole-network stage for finetune/scratch, the head for probe)
    epochs: int = _ranged(10, 1, MAX_EPOCHS)
    # finetune with head_fit=epochs: head-only epochs on the frozen trunk before unfreezing
    head_epochs: int = _ranged(2, 0, MAX_EPOCHS)
    head_fit: str = "lbfgs"  # linear heads on a frozen trunk: lbfgs (cached features, L2 path, to convergence) or
    # epochs (the classic way: a forward pass per epoch). finetune then starts from that probe (LP-FT)
    balance: str = "none"  # imbalanced classes: sampler (draw classes equally often) or loss (inverse-frequency
    # class weights in the loss); either weights the solved probe's loss too
    # head learning rate (the trunk gets lr * finetune_lr_ratio); "auto": graft lr-find picks
    lr: float | str = _ranged(1e-3, 0, MAX_LR, low_open=True, note="or 'auto'")
    # seconds of training for the run (0: no limit); the last stage's schedule is re-planned after its first epoch so
    # it ends annealed within the budget (graft compare's equal-budget comparison)
    time_budget: float = _ranged(0.0, 0, 1e9, note="0: no limit")
    # the seeds' "1/10 of the original learning rate" for fine-tuning
    finetune_lr_ratio: float = _ranged(0.1, 0, 1, low_open=True)
    # discriminative LR: the stem's rate relative to the top stage's, geometric between
    stem_lr_ratio: float = _ranged(0.1, 0, 1, low_open=True)
    unfreeze: str = "all"  # all, or last:K to fine-tune only the last K stages
    bn_stats: str = "auto"  # unfrozen batch norm: update running statistics, keep them frozen, or auto (pretrained
    # statistics frozen below 2,000 training images, where batch statistics are noise, and whenever fine-tuning
    # starts from the solved probe, which they would undo)
    precise_bn: bool = False  # after training, recompute BN statistics over the whole training set (eval transform)
    optimizer: str = "adamw"  # adamw | sgd (with Nesterov momentum)
    momentum: float = _ranged(0.9, 0, 1, high_open=True, cli=False)
    weight_decay: float = _ranged(0.01, 0, 1)
    # fraction of each stage's steps spent warming the LR up linearly
    warmup_fraction: float = _ranged(0.05, 0, 1, high_open=True, cli=False)
    label_smoothing: float = _ranged(0.1, 0, 1, high_open=True)
    # early stopping: stop after this many epochs without a better val loss; 0 disables
    patience: int = _ranged(5, 0, MAX_EPOCHS, note="0: off")
    seed: int = _ranged(0, 0, MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto: bf16 autocast on CUDA where supported, fp16 otherwise, fp32 on CPU
    channels_last: bool = True  # measured 1.4-1.8x faster on a 2-core CPU (bench/RESULTS.md); what tensor cores want
    # smoke runs: stop each epoch after this many batches (0: no limit)
    limit_batches: int = _ranged(0, 0, 10**9, note="0: no limit")


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
        try:
            return float(value)
        except OverflowError:  # a 400-digit integer in a YAML file
            raise GraftError(f"{source}: '{dotted}' is too large a number, got {value!s:.40}") from None
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
    match = re.fullmatch(r"mlp:(\d{1,9}(?:,\d{1,9})*)", spec)  # int() refuses 4,300+ digits
    if not match:
        raise GraftError(f"head '{spec}' not understood: use 'linear', 'sigmoid' (two classes, one logit) or "
                         "'mlp:WIDTH[,WIDTH...]' (e.g. mlp:512)")
    widths = [int(width) for width in match.group(1).split(",")]
    if len(widths) > MAX_HEAD_LAYERS or not all(1 <= width <= MAX_HEAD_WIDTH for width in widths):
        raise GraftError(f"head '{spec:.40}' (--head): mlp widths must be in [1, {MAX_HEAD_WIDTH}], at most "
                         f"{MAX_HEAD_LAYERS} hidden layers (e.g. mlp:512)")
    return widths


def parse_unfreeze(spec: str) -> int | None:
    """``all`` → None (every stage), ``last:2`` → 2."""
    if spec == "all":
        return None
    match = re.fullmatch(r"last:(\d{1,9})", spec)
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


    model = config.model
    ArchOptions(model.activation, model.norm, model.init, model.vgg_stages).validate()
    parse_head(config.model.head)
    parse_unfreeze(config.train.unfreeze)
    check_ranges(config)


def check_ranges(config: FitConfig) -> None:
    """Every numeric field against the range declared beside it: finite and inside, with the dotted key, the range
    and (for a flag of `graft fit`) the flag in the message. NaN, infinities and 20-digit seeds all stop here."""
    for section in ("data", "model", "train"):
        part = getattr(config, section)
        for spec in dataclasses.fields(part):
            allowed, value = spec.metadata.get("range"), getattr(part, spec.name)
            if allowed is None or value is None or (spec.name == "lr" and value == "auto"):
                continue
            flag = f" (option --{spec.name.replace('_', '-')})" if spec.metadata.get("cli") else ""
            integer = str(spec.type).split("|")[0].strip() == "int"
            try:
                check_number(f"{section}.{spec.name}", value, allowed, integer)
            except GraftError as error:
                raise GraftError(f"{error}{flag}") from None


ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "swish", "maxout", "tanh", "sigmoid")
NORMS = ("batch", "layer", "instance", "group", "none")


# vgg-like: bounds that keep a typo (2x100000) from allocating tens of GB while the network is built
MAX_WIDTH, MAX_CONVS, MAX_STAGES = 4096, 16, 8
MAX_INIT_STD = 10.0


@dataclass(frozen=True)
class ArchOptions:
    """How a lab network is built; stored in every run's config (model.activation, model.norm, ...)."""

    activation: str = "relu"
    norm: str = "none"
    init: str = "kaiming"  # kaiming | xavier | normal:STD (e.g. normal:0.01)
    vgg_stages: str = "2x32,2x64,2x128"  # vgg-like: CONVSxWIDTH per stage

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise GraftError(f"activation '{self.activation}' not understood: choose one of {', '.join(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise GraftError(f"norm '{self.norm}' not understood: choose one of {', '.join(NORMS)}")
        parse_init(self.init)
        parse_vgg_stages(self.vgg_stages)


def parse_init(spec: str) -> tuple[str, float]:
    """``kaiming`` / ``xavier`` → (scheme, 0); ``normal:0.01`` → ("normal", 0.01)."""
    if spec in ("kaiming", "xavier"):
        return spec, 0.0
    match = re.fullmatch(r"normal:(\d*\.?\d+(?:e-?\d+)?)", spec)
    if not match or not 0 < float(match.group(1)) <= MAX_INIT_STD:  # 1e999 reads as inf
        raise GraftError(f"init '{spec:.40}' not understood: use kaiming, xavier or normal:STD with STD in "
                         f"(0, {MAX_INIT_STD:g}] (e.g. normal:0.01)")
    return "normal", float(match.group(1))


def parse_vgg_stages(spec: str) -> list[tuple[int, int]]:
    """``2x32,2x64`` → [(2, 32), (2, 64)]: convolutions and width per stage."""
    stages = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d{1,9})x(\d{1,9})\s*", part)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise GraftError(f"vgg stages '{spec}' not understood: use CONVSxWIDTH per stage, e.g. 2x32,2x64,3x128")
        stages.append((int(match.group(1)), int(match.group(2))))
    if len(stages) > MAX_STAGES or any(convs > MAX_CONVS or width > MAX_WIDTH for convs, width in stages):
        raise GraftError(f"vgg stages '{spec:.40}': at most {MAX_STAGES} stages, each of 1 to {MAX_CONVS} convolutions "
                         f"of width 1 to {MAX_WIDTH} (e.g. 2x32,2x64,3x128)")
    return stages
