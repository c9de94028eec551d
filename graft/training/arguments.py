"""``graft.fit``'s keyword arguments: every config field by its name (``epochs=5``), validated like the CLI's flags."""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any

from graft.config import FitConfig, apply_overrides, flatten, option_fields, validate
from graft.errors import GraftError

__all__ = ["config_from_arguments", "keyword_fields"]


def keyword_fields() -> dict[str, str]:
    """Each field's keyword → its dotted key (``epochs`` → ``train.epochs``); the dotted keys are accepted too.

    A leaf name shared by two sections would be ambiguous, so only its dotted forms are accepted (none today).
    """
    dotted = [key for key, _ in option_fields()]
    leaves = [key.rsplit(".", 1)[-1] for key in dotted]
    by_leaf = {leaf: key for leaf, key in zip(leaves, dotted) if leaves.count(leaf) == 1}
    return {**by_leaf, **{key: key for key in dotted}}


def config_from_arguments(config: FitConfig | dict | str | os.PathLike | None, fields: dict[str, Any]) -> FitConfig:
    """The config ``graft.fit`` runs: ``config`` (a FitConfig, a dict of dotted or nested keys, or the data folder),
    then ``fields`` (keywords or dotted keys), checked by the config's validator.

    Raises:
        GraftError: for an unknown keyword (naming close matches) or a value the CLI would refuse too.
    """
    if isinstance(config, FitConfig):
        if not fields:
            return config  # as before: a config object is used as it is
        base, overrides = copy.deepcopy(config), {}
    elif isinstance(config, dict):
        base, overrides = FitConfig(), _dotted(flatten(config))
    elif config is None:
        base, overrides = FitConfig(), {}
    elif isinstance(config, (str, os.PathLike)):
        base, overrides = FitConfig(), {"data.path": os.fspath(config)}
    else:
        raise GraftError(f"fit: expected a FitConfig, a dict or the data folder, got {type(config).__name__}")
    overrides.update(_dotted(fields))
    apply_overrides(base, overrides, "fit")
    validate(base)
    return base


def _dotted(fields: dict[str, Any]) -> dict[str, Any]:
    known = keyword_fields()
    resolved = {}
    for name, value in fields.items():
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see graft.config.option_fields()"
            raise GraftError(f"fit: unknown argument '{name}'{hint}")
        resolved[known[name]] = value
    return resolved
