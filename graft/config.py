"""Configuration dataclasses: defaults, then a YAML file, then explicit overrides (the CLI's flags), in that order.

Every run folder stores the full resolved config in ``graft.json`` so a saved model can be rebuilt and re-run.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.errors import GraftError
from graft.utils.limits import DEFAULT_MAX_PIXELS
from graft.utils.ranges import Range, check_number, check_option

__all__ = [
    "ACTIVATIONS", "AUGMENTATIONS", "ArchOptions", "BALANCES", "BN_AUTO_FROZEN_BELOW", "BN_STATS", "COMPILE_MODES",
    "DataConfig", "ENGINES",
    "FitConfig", "HEAD_FITS", "MAX_BATCH_SIZE", "MAX_CONVS", "MAX_EPOCHS", "MAX_HEAD_LAYERS", "MAX_HEAD_WIDTH",
    "MAX_IMAGE_SIZE", "MAX_INIT_STD", "MAX_LR", "MAX_SEED", "MAX_STAGES", "MAX_WIDTH", "MIN_IMAGE_SIZE",
    "ModelConfig", "NORMS", "OPTIMIZERS", "POOLS", "PRECISIONS", "Range", "STRATEGIES", "TrainConfig",
    "apply_overrides", "check_number", "check_option", "check_ranges", "flag_of", "load_config", "option_fields",
    "parse_head", "parse_init", "parse_unfreeze", "parse_vgg_stages", "validate",
    "LOGGERS", "parse_log", "flatten",
]

STRATEGIES = ("probe", "finetune", "scratch", "auto")
OPTIMIZERS = ("adamw", "sgd")
AUGMENTATIONS = ("standard", "light", "rand", "trivial", "auto", "none")
POOLS = ("avg", "avgmax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BN_STATS = ("auto", "update", "frozen")
BALANCES = ("none", "sampler", "loss")
HEAD_FITS = ("lbfgs", "epochs")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # "off", then torch.compile's modes
ENGINES = ("auto", "onnx", "eager")  # frozen-trunk inference (graft.models.onnx_engine); auto: ONNX Runtime on the CPU
LOGGERS = ("tensorboard", "mlflow", "wandb", "csv")  # fit --log: experiment trackers fed from the training hooks
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "swish", "maxout", "tanh", "sigmoid")
NORMS = ("batch", "layer", "instance", "group", "none")
BN_AUTO_FROZEN_BELOW = 2000  # training images
# Limits that keep a typo from allocating tens of GB before anything can fail cleanly (refused where the config is
# built, before a network or a batch exists). 2048 px is 80x the pixels of a 224 px ImageNet input.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 2048
MAX_BATCH_SIZE = 4096
MAX_LR = 100.0  # lr-find's sweep ends at 10 for the stage; / finetune_lr_ratio it can pass 10 for train.lr
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_HEAD_WIDTH, MAX_HEAD_LAYERS = 16384, 8  # mlp:WIDTH[,WIDTH...]


def _option(default: Any, help: str, *, choices: tuple[str, ...] = (), low: float | None = None, high: float = 0,
            low_open: bool = False, high_open: bool = False, note: str = "", flags: tuple[str, ...] = (),
            panel: str = "", comma_list: bool = False, metavar: str = "") -> Any:
    """A field declared once: its default, help text, choices and range, which the validator, `graft fit`'s generated
    flag (``flags``; default ``--field-name``) and its ``--help`` (under ``panel``; default the section's) all read.
    ``comma_list``: a comma-separated string that Python and YAML may also give as a list of strings. ``metavar``:
    the flag's placeholder in ``--help`` where the choices are too long to list there (the help text names them)."""
    metadata = {"help": help, "choices": tuple(choices), "flags": tuple(flags), "panel": panel,
                "comma_list": comma_list, "metavar": metavar}
    if low is not None:
        metadata["range"] = Range(low, high, low_open, high_open, note)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where the images are and how they are fed to the network."""

    path: str = _option("", "class folders (optionally train/val/test) or a CSV (path,label[,split])")
    val_fraction: float = _option(0.2, "held out for validation when the data has no val/ split of its own",
                                  low=0, high=1, low_open=True, high_open=True)
    image_size: int | None = _option(None, "input size (default: the backbone's); smaller is faster on CPU",
                                     low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE)
    augment: str = _option("standard", "standard: random-resized-crop + flip; light: milder crops; rand / trivial / "
                           "auto: RandAugment / TrivialAugment / AutoAugment after them (timm); none: eval transform",
                           choices=AUGMENTATIONS)
    hflip: bool = _option(True, "mirror images (off for data where mirroring changes the class: digits, text)")
    batch_size: int = _option(32, "images per training step", low=1, high=MAX_BATCH_SIZE)
    workers: int = _option(-1, "DataLoader workers; -1: auto (none on the CPU, whose cores they steal; up to 8 on a "
                           "GPU)", low=-1, high=64, note="-1: auto", panel="Runtime")
    scan_all_up_to: int = _option(200_000, "the pre-training scan decodes every file up to this many; above it a "
                                  "seeded sample (unreadable files are still skipped as they load)",
                                  low=0, high=1_000_000_000, panel="Runtime")
    max_image_pixels: int = _option(DEFAULT_MAX_PIXELS, "larger images are skipped and listed (Pillow's bomb limit)",
                                    low=1, high=1_000_000_000)
    augment_views: int = _option(0, "cached probe: augmented views cached per training image", low=0, high=64)
    cache_dir: str | None = _option(None, "feature cache folder (default: $GRAFT_CACHE or ~/.cache/graft)",
                                    flags=("--cache",))
    # training augmentation recipes (issue 14):
    random_erasing: float = _option(0.0, "training: probability of erasing a random rectangle (timm's re_prob)", low=0,
                                    high=1)
    multi_label: bool = _option(False, "a CSV's labels are sets separated by spaces (fastai's convention) or ';' "
                                "(';' alone is detected): sigmoid outputs, per-class thresholds, mAP")
    # issue 14, honest numbers:
    test_fraction: float = _option(0.0, "carve a stratified test split of this fraction from data without one "
                                   "(seeded, disjoint from val); evaluated at the end of fit, the headline number",
                                   low=0, high=1, high_open=True, note="0: none")
    # issue 25, know your data:
    exclude: str = _option("", "CSV(s) of files to leave out or relabel, comma-separated: graft audit's "
                           "label_issues.csv (every listed file left out) or a decisions CSV path,decision,label "
                           "(exclude / relabel / keep, as graft serve --audit writes); applied in every split and "
                           "recorded in RUN/excluded.csv", comma_list=True, metavar="CSV[,CSV...]")
    # issue 28, Hugging Face datasets as input (graft.data.hfdatasets):
    image_column: str | None = _option(None, "a Hugging Face dataset's image column (default: its one Image feature)")
    label_column: str | None = _option(None, "a Hugging Face dataset's label column (default: its one ClassLabel "
                                       "feature)")
    # issue 26, few labels:
    unlabeled: str | None = _option(None, "unlabelled images (a folder, glob, or CSV with a path column): the probe is "
                                    "self-trained on them (probe/auto), kept only if it beats the labelled-only probe "
                                    "on val", metavar="POOL")


@dataclass
class ModelConfig:
    """The backbone, where it is cut, and the new head grafted on."""

    backbone: str = _option("tf_efficientnet_lite0", "timm name[.tag] or tv:NAME[.WEIGHTS] for torchvision",
                            flags=("--backbone", "-b"))
    weights: str | None = _option(None, "local .safetensors/.pth weights instead of downloading")
    pretrained: bool = _option(True, "pretrained weights; --no-pretrained: random weights, a baseline (scratch forces "
                               "it)")
    cut_at: str | None = _option(None, "node name from `graft layers` (default: the backbone's pooled features)")
    pool: str = _option("avg", "global pooling after the cut (avgmax: average and max concatenated)", choices=POOLS)
    head: str = _option("linear", "linear, sigmoid (2 classes) or mlp:512[,256] (BN + ReLU + dropout between)")
    dropout: float = _option(0.0, "dropout before the final linear layer", low=0, high=1, high_open=True)
    # lab networks (small-cnn-cifar, small-cnn-catsdogs, vgg-like) only:
    activation: str = _option("relu", "lab networks: the activation", choices=ACTIVATIONS)
    norm: str = _option("none", "lab networks: the normalisation layer", choices=NORMS)
    init: str = _option("kaiming", "lab networks: kaiming, xavier or normal:STD")
    vgg_stages: str = _option("2x32,2x64,2x128", "vgg-like: CONVSxWIDTH per stage, e.g. 2x32,2x64")


@dataclass
class TrainConfig:
    """How the head and trunk are trained."""

    strategy: str = _option("finetune", "auto: graft advise decides", choices=STRATEGIES)
    epochs: int = _option(10, "epochs of the main stage (the whole network for finetune/scratch, the head for probe)",
                          low=1, high=MAX_EPOCHS)
    head_epochs: int = _option(2, "finetune with --head-fit epochs: head-only epochs on the frozen trunk first",
                               low=0, high=MAX_EPOCHS)
    head_fit: str = _option("lbfgs", "linear heads on a frozen trunk: lbfgs (cached features, L2 path, to convergence) "
                            "or epochs (a forward pass per epoch); finetune then starts from that probe (LP-FT)",
                            choices=HEAD_FITS)
    balance: str = _option("none", "imbalanced classes: sampler (draw classes equally often) or loss (inverse-"
                           "frequency class weights, the solved probe's too)", choices=BALANCES)
    # 3e-3 (trunk 3e-4), not the rule-of-thumb 1e-3: +1.6 points on flowers5 and +0.35 on MNIST fine-tuning from
    # the solved probe, in the same time (bench/RESULTS.md, "Recipes on flowers5"); the digits demo already ran at it.
    lr: float | str = _option(3e-3, "head learning rate (the trunk gets lr x finetune-lr-ratio), or auto (lr-find "
                              "first)", low=0, high=MAX_LR, low_open=True, note="or 'auto'")
    time_budget: float = _option(0.0, "seconds of training, 0: no limit; the last stage's schedule is re-planned to "
                                 "end annealed within it", low=0, high=1e9, note="0: no limit")
    finetune_lr_ratio: float = _option(0.1, "trunk lr = lr x this when unfrozen (the seeds' 1/10)", low=0, high=1,
                                       low_open=True)
    stem_lr_ratio: float = _option(0.1, "discriminative lr: the stem's rate relative to the top stage's, geometric "
                                   "between", low=0, high=1, low_open=True)
    unfreeze: str = _option("all", "all, or last:K to fine-tune only the last K stages")
    bn_stats: str = _option("auto", "unfrozen batch norm: update or keep frozen its running statistics; auto: frozen "
                            "below 2,000 training images (batch statistics are noise) and after a solved probe",
                            choices=BN_STATS)
    precise_bn: bool = _option(False, "recompute BN statistics over the training set at the end (in the training "
                                      "augmentation)")
    calibrate: bool = _option(True, "temperature-scale the probabilities: a solved probe on its CV folds' held-out "
                                    "logits, an epoch-trained model on validation (which then also chose it: the val "
                                    "ECE is optimistic; accuracy never changes)")
    optimizer: str = _option("adamw", "sgd: with Nesterov momentum", choices=OPTIMIZERS)
    momentum: float = _option(0.9, "sgd's momentum", low=0, high=1, high_open=True)
    weight_decay: float = _option(0.01, "decoupled weight decay", low=0, high=1)
    warmup_fraction: float = _option(0.05, "fraction of each stage's steps warming the lr up linearly", low=0, high=1,
                                     high_open=True)
    label_smoothing: float = _option(0.1, "label smoothing of the loss", low=0, high=1, high_open=True)
    loss: str = _option("bce", "multi-label fine-tuning: bce (binary cross-entropy) or asl (asymmetric loss: easy "
                        "negatives down-weighted, for classes absent from most images)", choices=("bce", "asl"))
    patience: int = _option(5, "early stopping: epochs without a better val loss, 0 = off", low=0, high=MAX_EPOCHS,
                            note="0: off")
    seed: int = _option(0, "seed of the split, the initialisation and the data order", low=0, high=MAX_SEED,
                        panel="Runtime")
    device: str = _option("auto", "auto, cpu, cuda, cuda:N or mps", panel="Runtime")
    precision: str = _option("auto", "auto: bf16 autocast on CUDA where supported, fp16 otherwise, fp32 on CPU",
                             choices=PRECISIONS, panel="Runtime")
    channels_last: bool = _option(True, "channels-last memory format: 1.4-1.8x faster on a 2-core CPU "
                                  "(bench/RESULTS.md), what tensor cores want", panel="Runtime")
    limit_batches: int = _option(0, "smoke runs: batches per epoch, 0: no limit", low=0, high=10**9, note="0: no limit",
                                 panel="Runtime")
    # training recipes for far and small data (issue 14):
    mixup: float = _option(0.0, "mixup alpha (timm's Mixup, soft-target loss), 0: off", low=0, high=100,
                           note="0: off")
    cutmix: float = _option(0.0, "cutmix alpha (with --mixup too: one of them per batch, chosen at random), 0: off",
                            low=0, high=100, note="0: off")
    lr_decay: float = _option(1.0, "layer-wise lr decay: each stage below the top trains at this times the rate of "
                              "the one above (replaces --stem-lr-ratio's spread), 1: off", low=0, high=1,
                              low_open=True, note="1: off")
    # issue 14, never worse than the probe:
    probe_patience: int = _option(0, "finetune after a solved probe: stop after this many epochs in a row that do not "
                                  "beat the probe on val (auto: 2); 0: off", low=0, high=MAX_EPOCHS, note="0: off")
    accumulate: int = _option(1, "gradient accumulation: each optimiser step sums K batches of --batch-size (global "
                              "batch: batch x K x processes)", low=1, high=1024, panel="Runtime")
    sync_bn: bool = _option(False, "under torchrun: SyncBatchNorm, batch statistics over all processes' batches (when "
                            "the trunk's BN statistics update)", panel="Runtime")
    checkpoint_every: int = _option(0, "also checkpoint every N steps inside an epoch (resume continues from that "
                                    "step), 0: at epoch ends only", low=0, high=10**9, note="0: off", panel="Runtime")
    checkpoint_minutes: float = _option(0.0, "also checkpoint inside an epoch every M minutes, 0: off", low=0,
                                        high=1e6, note="0: off", panel="Runtime")
    compile: str = _option("off", "torch.compile the trained model and the extraction forward: off, default, "
                           "reduce-overhead or max-autotune (torch.compile's modes); a compile failure warns and "
                           "continues eager", choices=COMPILE_MODES, panel="Runtime", metavar="MODE")
    timings: bool = _option(False, "print each phase's wall seconds at the end (start-up, scan, model, extraction, "
                            "solve, training, evaluation, outputs, total) and record them in metrics.json",
                            panel="Runtime")
    extract_engine: str = _option("auto", "frozen-trunk feature extraction: onnx (ONNX Runtime on a verified, cached "
                                  "export of the trunk), eager (PyTorch) or auto (onnx on the CPU when onnxruntime is "
                                  "installed); the same features either way", choices=ENGINES, panel="Runtime")


@dataclass
class FitConfig:
    """Everything `graft fit` needs; stored in every run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = _option("runs/graft", "run folder to write; `graft fit` without one makes DEFAULT-N, the first "
                          "free N", flags=("--output", "-o"), panel="Run")
    log: str = _option("", "trackers, comma-separated: tensorboard (RUN/tensorboard), mlflow (RUN/mlruns or "
                       "$MLFLOW_TRACKING_URI), wandb (RUN/wandb; offline without a login or with "
                       "WANDB_MODE=offline), csv (RUN/history.csv, always written)", flags=("--log",), panel="Run",
                       comma_list=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> FitConfig:
        """Builds a config from nested dicts, rejecting unknown keys with the key's name and where it came from."""
        config = cls()
        apply_overrides(config, flatten(raw), source)
        return config


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys. Only the top level is a section: a dict below it stays one value (refused by
    its key's check), so a config nested thousands deep is never walked."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            flat.update(flatten(value, dotted + "."))
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
        for depth, part in enumerate(parents):  # a section is a field holding a dataclass, never a dunder (__init__)
            fields = {f.name for f in dataclasses.fields(target)}
            sections = sorted(name for name in fields if dataclasses.is_dataclass(getattr(target, name)))
            if part not in sections and depth:
                where = ".".join(parents[:depth])
                raise GraftError(f"{source}: unknown key '{dotted}'; {where} has no sections; valid keys in {where}: "
                                 f"{', '.join(sorted(fields))}")
            if part not in sections:
                raise GraftError(f"{source}: unknown section '{part}' in '{dotted}' (sections: {', '.join(sections)})")
            target = getattr(target, part)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields:
            raise GraftError(f"{source}: unknown key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
        if dataclasses.is_dataclass(getattr(target, leaf)):  # `train: 5` would replace the whole section
            raise GraftError(f"{source}: '{dotted}' is a section, not a value; set its keys ({dotted}.KEY), got "
                             f"{reprlib.repr(value)}")
        if fields[leaf].metadata.get("comma_list") and isinstance(value, (list, tuple)):
            if not all(isinstance(item, str) for item in value):
                raise GraftError(f"{source}: '{dotted}' must be a list of names, got {value!r:.60}")
            value = ",".join(value)  # graft.fit(log=["tensorboard"]) and a YAML list read as the flag's form
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
    raise GraftError(f"{source}: '{dotted}' must be {' or '.join(names)}, got {reprlib.repr(value)}")  # bounded: a
    # YAML file's aliases can make a list of a billion items out of a few lines


def _read_yaml(path: Path, yaml) -> Any:
    """The YAML file's data; one line naming the file for bytes that are not UTF-8 text, bad YAML or nesting deeper
    than the parser's recursion allows."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise GraftError(f"{path}: not a UTF-8 text file (byte offset {error.start}); save the config as UTF-8 "
                         "YAML") from None
    except OSError as error:
        raise GraftError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise GraftError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise GraftError(f"{path}: nested too deeply to be a graft config (sections data/model/train hold plain "
                         "values)") from None


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FitConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (dotted keys), validated."""
    config = FitConfig()
    if yaml_path is not None:
        import yaml  # here: `graft --help` reads the fields' help and never loads a file
        path = Path(yaml_path)
        if not path.is_file():
            raise GraftError(f"{path}: config file not found")
        raw = _read_yaml(path, yaml)
        if not isinstance(raw, dict):
            raise GraftError(f"{path}: expected a mapping with sections data/model/train at the top level")
        apply_overrides(config, flatten(raw), str(path))
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


def parse_log(spec: str) -> tuple[str, ...]:
    """``tensorboard,mlflow`` → ("tensorboard", "mlflow"): the trackers, each once, in the given order; "" → ()."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in spec.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise GraftError(f"--log '{unknown[0]:.40}' not understood: choose from {', '.join(LOGGERS)} "
                         "(comma-separated, e.g. --log tensorboard,mlflow)")
    return names


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


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every field a user may set, as (dotted key, field): the sections' fields, then ``output``."""
    found = []
    for spec in dataclasses.fields(FitConfig):
        if spec.name in _SECTIONS:
            found += [(f"{spec.name}.{leaf.name}", leaf) for leaf in dataclasses.fields(_SECTIONS[spec.name])]
        else:
            found.append((spec.name, spec))
    return found


def flag_of(dotted: str, spec: dataclasses.Field) -> str:
    """The long flag of `graft fit` that sets a field: declared with it, else ``--field-name``."""
    declared = [flag for flag in spec.metadata.get("flags", ()) if flag.startswith("--")]
    return declared[0] if declared else "--" + dotted.rsplit(".", 1)[-1].replace("_", "-")


def _value(config: FitConfig, dotted: str) -> Any:
    target: Any = config
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def validate(config: FitConfig) -> None:
    """Checks every field a user can set, with a message that names the field and the fix."""
    for dotted, spec in option_fields():
        if spec.metadata.get("choices"):
            _check_choice(spec.name, _value(config, dotted), spec.metadata["choices"])
    model = config.model
    ArchOptions(model.activation, model.norm, model.init, model.vgg_stages).validate()
    parse_head(config.model.head)
    parse_unfreeze(config.train.unfreeze)
    parse_log(config.log)
    check_ranges(config)


def check_ranges(config: FitConfig) -> None:
    """Every numeric field against the range declared beside it: finite and inside, with the dotted key, the range
    and the flag of `graft fit` in the message. NaN, infinities and 20-digit seeds all stop here."""
    for dotted, spec in option_fields():
        allowed, value = spec.metadata.get("range"), _value(config, dotted)
        if allowed is None or value is None or (spec.name == "lr" and value == "auto"):
            continue
        integer = str(spec.type).split("|")[0].strip() == "int"
        try:
            check_number(dotted, value, allowed, integer)
        except GraftError as error:
            raise GraftError(f"{error} (option {flag_of(dotted, spec)})") from None


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
