"""Helpers every layer may use: files, runtime, text, versions, limits. Imports nothing else from graft but errors.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "atomic_write": "graft.utils.files",
    "save_weights": "graft.utils.files",
    "write_json": "graft.utils.files",
    "Runtime": "graft.utils.runtime",
    "autocast": "graft.utils.runtime",
    "autocast_dtype": "graft.utils.runtime",
    "resolve_device": "graft.utils.runtime",
    "seed_everything": "graft.utils.runtime",
    "to_device": "graft.utils.runtime",
    "DEFAULT_MAX_PIXELS": "graft.utils.limits",
    "SERVE_MAX_PIXELS": "graft.utils.limits",
    "display_name": "graft.utils.text",
    "read_safetensors": "graft.utils.safefiles",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
