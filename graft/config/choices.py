"""The values a config field may take and the limits on its numbers, named once for the dataclasses, the
validator and the CLI."""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS", "AUGMENTATIONS", "BALANCES", "BN_AUTO_FROZEN_BELOW", "BN_STATS", "COMPILE_MODES", "ENGINES",
    "HEAD_FITS", "LOGGERS", "MAX_BATCH_SIZE", "MAX_EPOCHS", "MAX_HEAD_LAYERS", "MAX_HEAD_WIDTH", "MAX_IMAGE_SIZE",
    "MAX_LR", "MAX_SEED", "MIN_IMAGE_SIZE", "NORMS", "OPTIMIZERS", "POOLS", "PRECISIONS", "STRATEGIES",
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
