"""Using and measuring trained runs: inference, metrics and the HTML report.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "evaluate": "graft.evaluation.scoring",
    "predict": "graft.evaluation.inference",
    "Prediction": "graft.evaluation.inference",
    "classification_metrics": "graft.evaluation.metrics",
    "expected_calibration_error": "graft.evaluation.metrics",
    "reliability_bins": "graft.evaluation.metrics",
    "write_report": "graft.evaluation.report",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
