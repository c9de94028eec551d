"""Numeric ranges: what a number-valued option accepts, and the one check behind the config's fields and the CLI's
own options (``graft serve --port`` ...)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from graft.errors import GraftError

__all__ = ["Range", "check_number", "check_option"]


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


def check_number(name: str, value: Any, allowed: Range, integer: bool = False) -> None:
    """Raises GraftError naming ``name`` and the range unless ``value`` is a finite number inside ``allowed``."""
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
