"""Frozen features: the cache, extraction, linear probes, leaderboards and advice.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "FeatureExtractor": "graft.probing.extraction",
    "FeatureSet": "graft.probing.extraction",
    "extract_features": "graft.probing.extraction",
    "fit_linear_probe": "graft.probing.linear",
    "probe_backbones": "graft.probing.leaderboard",
    "advise": "graft.probing.advice",
    "cache_folder": "graft.probing.cache",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
