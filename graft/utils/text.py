"""Text that leaves graft for people and other programs: names that are not UTF-8, spreadsheet-safe CSV cells and
one-record-per-line text files.

A file or class-folder name that is not valid UTF-8 reaches Python as a ``str`` holding lone surrogates
(``os.fsdecode``'s surrogateescape). Files graft writes for itself (CSV, ``skipped_files.txt``) keep those names as
the bytes they have on disk, so a path can be found again; everything that must be valid Unicode (HTML, plots,
terminal tables, the server's JSON) shows them through ``display_name``.
"""

from __future__ import annotations

import os

__all__ = [
    "FORMULA_STARTS", "display_name", "escape_field", "path_key", "safe_record", "safe_row", "spreadsheet_safe",
    "unescape_field"
]

# A cell a spreadsheet would evaluate as a formula (OWASP "CSV injection"); tab and CR start one in some programs too.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def display_name(text: str) -> str:
    """``text`` as valid Unicode: bytes that are not UTF-8 become ``\\xNN`` escapes (``caf\\xe9``), the rest is kept."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make (from JSON, say): escape it as it is
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def path_key(path: str) -> str:
    """An absolute path as text any store accepts (SQLite, JSON): itself when it is valid Unicode, else ``?hex:`` and
    its bytes in hex — a file name that is not UTF-8 arrives with surrogate escapes, which SQLite refuses to encode.
    No absolute path starts with ``?``, so the two forms never collide."""
    path = os.path.abspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "?hex:" + os.fsencode(path).hex()
    return path


def spreadsheet_safe(value):
    """A CSV cell that a spreadsheet shows as text: strings starting with ``= + - @``, tab or CR get a leading single
    quote (the OWASP rule); other values are returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(values) -> list:
    """``spreadsheet_safe`` over a row."""
    return [spreadsheet_safe(value) for value in values]


def safe_record(record: dict) -> dict:
    """``spreadsheet_safe`` over a ``csv.DictWriter`` row's values."""
    return {key: spreadsheet_safe(value) for key, value in record.items()}


def escape_field(text: str) -> str:
    """One field of a tab-separated, one-record-per-line file: backslash, tab, newline and CR become ``\\\\``, ``\\t``,
    ``\\n`` and ``\\r``, so a file name holding them cannot split or shift a record (``unescape_field`` reverses it)."""
    return "".join(_ESCAPES.get(char, char) for char in text)


def unescape_field(text: str) -> str:
    """The inverse of ``escape_field``."""
    reverse = {value[1]: key for key, value in _ESCAPES.items()}
    out, chars = [], iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            char = reverse.get(following, char + following)
        out.append(char)
    return "".join(out)
