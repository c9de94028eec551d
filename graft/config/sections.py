"""The configuration dataclasses (data, model, train, and the run around them), each field declared once with its
default, help, choices and range. Every run folder stores the resolved config in ``graft.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graft.config.choices import (
    ACTIVATIONS,
    AUGMENTATIONS,
    BALANCES,
    BN_STATS,
    COMPILE_MODES,
    ENGINES,
    HEAD_FITS,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_LR,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    NORMS,
    OPTIMIZERS,
    POOLS,
    PRECISIONS,
    STRATEGIES,
)
from graft.config.overrides import apply_overrides, flatten
from graft.utils.limits import DEFAULT_MAX_PIXELS
from graft.utils.ranges import Range

__all__ = ["SECTIONS", "DataConfig", "FitConfig", "ModelConfig", "TrainConfig"]


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



SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
