"""Configuration: the dataclasses and their defaults, then a YAML file, then explicit overrides (the CLI's flags), in
that order. Every run folder stores the full resolved config in ``graft.json`` so a saved model can be rebuilt and
re-run.

The package holds no torch: its modules are the values and limits (``choices``), the dataclasses (``sections``),
dotted overrides (``overrides``), the option grammars (``specs``), the checks (``checks``) and the YAML loader
(``loading``). Every public name is re-exported here: ``from graft.config import X`` is the way in.
"""

from graft.config.checks import check_ranges, flag_of, option_fields, validate
from graft.config.choices import (
    ACTIVATIONS,
    AUGMENTATIONS,
    BALANCES,
    BN_AUTO_FROZEN_BELOW,
    BN_STATS,
    COMPILE_MODES,
    ENGINES,
    HEAD_FITS,
    LOGGERS,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_HEAD_LAYERS,
    MAX_HEAD_WIDTH,
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
from graft.config.loading import load_config
from graft.config.overrides import apply_overrides, flatten
from graft.config.sections import DataConfig, FitConfig, ModelConfig, TrainConfig
from graft.config.specs import (
    MAX_CONVS,
    MAX_INIT_STD,
    MAX_STAGES,
    MAX_WIDTH,
    ArchOptions,
    parse_head,
    parse_init,
    parse_log,
    parse_unfreeze,
    parse_vgg_stages,
)
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
