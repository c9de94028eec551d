"""`graft fit`'s options, generated from the config fields (graft/config/sections.py), where each is declared once.

A field's flag, help, choices, range and default all come from its declaration, so a new field is a new flag with
nothing else to write, and `--help` cannot drift from the config. Keys without a flag of their own are still
reachable by ``--set section.key=value``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any, Optional

import typer

from graft.config import flag_of, option_fields
from graft.errors import GraftError

__all__ = ["PANELS", "config_option", "field_parameters", "given_fields", "parse_set"]

PANELS = {"data": "Data", "model": "Model", "train": "Training"}  # a field's panel unless it names its own
_ORDER = ("Data", "Model", "Training", "Runtime", "Run")  # of the panels in --help
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_SEP = "__"  # the Python name of a generated parameter: section__field (no field name holds two underscores)


def _kind(spec: dataclasses.Field) -> type:
    """The flag's type: the annotation's first type (``float | str`` reads as str: `--lr auto`)."""
    names = [part.strip() for part in str(spec.type).split("|")]
    return str if "str" in names else _TYPES[names[0]]


def _help(dotted: str, spec: dataclasses.Field, with_default: bool) -> str:
    """The field's help, then its default as a flag would give it (typer's own show_default needs a real default,
    and a generated option's default is None, so that an absent flag leaves the YAML file's value)."""
    text, default = spec.metadata.get("help", ""), spec.default
    if not with_default or default is None or default == "":  # "" (e.g. --log): nothing, not "(default: )"
        return text
    if isinstance(default, bool):
        flag = flag_of(dotted, spec)
        default = flag if default else f"--no-{flag[2:]}"
    return f"{text} (default: {default})"


def config_option(dotted: str, with_default: bool = False, **changes: Any) -> Any:
    """The typer.Option of one field, for other commands that share it (``changes``: e.g. their own help)."""
    spec = dict(option_fields())[dotted]
    kind = _kind(spec)
    choices = spec.metadata.get("choices")
    flags = spec.metadata.get("flags") or (flag_of(dotted, spec),)
    if kind is bool:  # --pretrained/--no-pretrained: either way a flag can override a YAML file
        flags = (f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:])
    metavar = spec.metadata.get("metavar") or (f"[{'|'.join(choices)}]" if choices else None)
    settings = {"help": _help(dotted, spec, with_default), "metavar": metavar}
    return typer.Option(*flags, **{**settings, **changes})


def field_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per settable field except ``data.path`` (fit's argument): default None, so a flag not
    given leaves the YAML file's value, while --help shows the field's default and choices."""
    parameters = []
    for dotted, spec in option_fields():
        if dotted == "data.path":
            continue
        panel = spec.metadata.get("panel") or PANELS[dotted.split(".")[0]]
        option = config_option(dotted, with_default=True, rich_help_panel=panel)
        annotation = Annotated[Optional[_kind(spec)], option]
        parameter = inspect.Parameter(dotted.replace(".", _SEP), inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                      annotation=annotation)
        parameters.append((_ORDER.index(panel), parameter))
    return [parameter for _, parameter in sorted(parameters, key=lambda pair: pair[0])]  # stable: field order


def given_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The generated parameters that were given, as dotted overrides (``train__lr`` → ``train.lr``); a flag not given
    is None and left out, so that it never hides a --set of the same key."""
    return {name.replace(_SEP, "."): value for name, value in values.items() if value is not None}


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set train.momentum=0.8`` → {"train.momentum": 0.8}; a value is read as a YAML scalar, as in --config."""
    overrides: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise GraftError(f"--set '{item:.60}': expected KEY=VALUE with a dotted key, e.g. --set train.momentum=0.8")
        overrides[key.strip()] = _scalar(key.strip(), text)
    return overrides


def _scalar(key: str, text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):  # "a: b: c", "[[[..." thousands deep: the field's type check names
        return text  # the key if a string is wrong here
    if value is None:  # None means "not given" to load_config: refused rather than silently skipped
        raise GraftError(f"--set {key:.60}: a value is needed (a key cannot be unset; leave it out instead)")
    return value
