"""Looking at networks and strategies: diagnostics and the scratch-vs-probe-vs-finetune comparison.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "compare_strategies": "graft.analysis.comparison",
    "Diagnosis": "graft.analysis.diagnose",
    "run_demo": "graft.analysis.demo",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
