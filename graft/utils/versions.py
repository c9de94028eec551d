"""graft's version, and the versions of what it runs on (saved in every graft.json, printed by --version)."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["__version__", "installed_versions", "versions"]


def _installed_version() -> str:
    try:
        return metadata.version("graft")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()


def versions() -> dict[str, str]:
    """graft's, Python's and the deep-learning stack's versions (imports torch: call it only when they are needed)."""
    import timm
    import torch
    import torchvision

    return {
        "graft": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "python": platform.python_version(),
    }


def installed_versions() -> dict[str, str]:
    """The same as versions(), read from the installed packages' metadata instead of importing them (`graft
    --version` answers in a tenth of a second, not the three of importing torch and timm)."""
    found = {"graft": __version__}
    for name in ("torch", "torchvision", "timm"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found
