"""Which experiment trackers can run here, asked before anything is trained: each one's package importable, and the
mode a Weights & Biases run starts in (offline unless a login is configured)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from graft.config import parse_log
from graft.errors import GraftError

__all__ = ["check_available", "wandb_mode"]

_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker → the module it needs


def check_available(names: tuple[str, ...] | str) -> tuple[str, ...]:
    """The trackers ``names`` (a --log value or parsed names), each with its package importable.

    Raises:
        GraftError: for an unknown name, or a package that is missing, before anything is trained.
    """
    names = parse_log(names) if isinstance(names, str) else names
    for name in names:
        module = _PACKAGES.get(name)
        if module and _missing(module):
            raise GraftError(f"--log {name} needs the {module} package: pip install 'graft[track]'")
    return names


def wandb_mode() -> str:
    """``WANDB_MODE`` when the user set one; offline when graft is offline or no W&B login is configured (an online
    init would otherwise stop to ask for an API key); else online."""
    chosen = os.environ.get("WANDB_MODE", "").strip().lower()
    if chosen in ("online", "offline", "disabled"):
        return chosen
    if os.environ.get("GRAFT_OFFLINE") == "1" or os.environ.get("WANDB_OFFLINE", "").lower() in ("1", "true"):
        return "offline"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in netrc.read_text(errors="replace")
    except OSError:
        logged_in = False
    return "online" if logged_in else "offline"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # sys.modules[module] = None (blocked) raises here
        return True
