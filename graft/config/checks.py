"""Every user-settable field checked against what is declared beside it: its choices, its range, its grammar."""

from __future__ import annotations

import dataclasses
from typing import Any

from graft.config.sections import SECTIONS, FitConfig
from graft.config.specs import ArchOptions, parse_head, parse_log, parse_unfreeze
from graft.errors import GraftError
from graft.utils.ranges import check_number

__all__ = ["check_ranges", "flag_of", "option_fields", "validate"]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise GraftError(f"{name} '{value}' not understood: choose one of {', '.join(choices)}")


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every field a user may set, as (dotted key, field): the sections' fields, then ``output``."""
    found = []
    for spec in dataclasses.fields(FitConfig):
        if spec.name in SECTIONS:
            found += [(f"{spec.name}.{leaf.name}", leaf) for leaf in dataclasses.fields(SECTIONS[spec.name])]
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
