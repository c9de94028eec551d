"""Dotted keys (``train.lr``) set on a config's dataclasses, each value checked against its field's annotation."""

from __future__ import annotations

import dataclasses
import reprlib
from typing import Any, TypeVar

from graft.errors import GraftError

__all__ = ["apply_overrides", "flatten"]

Config = TypeVar("Config")  # a dataclass whose fields may hold dataclasses (sections)


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


def apply_overrides(config: Config, overrides: dict[str, Any], source: str = "overrides") -> Config:
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
