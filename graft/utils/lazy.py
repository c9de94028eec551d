"""Lazy re-exports (PEP 562) for package ``__init__`` files: a name is imported from its module on first use.

A subpackage re-exports its main public names so that ``from graft.data import discover`` works, without making
``import graft.data.discovery`` (which runs ``graft/data/__init__.py`` first) pay for torch or PIL.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``, resolving each name in ``exports``.

    Args:
        package: the package's ``__name__``.
        exports: public name → module that defines it. A name must not equal a submodule's: the first look-up caches
            the object in the package namespace, where ``import package.name`` would then find it instead of the
            module (tests/test_package_layout.py checks this).
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
