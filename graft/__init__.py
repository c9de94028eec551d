"""graft: a folder of labelled images in, an accurate fine-tuned classifier out, by transfer learning.

The public API is imported lazily (PEP 562), so ``import graft`` and ``graft --help`` do not pay for torch and timm;
the first use of a name below imports the module that holds it.
"""

from __future__ import annotations

from graft.utils import timings  # noqa: F401  first: its clock starts with graft (`graft fit --timings`' start-up)
from graft.utils.lazy import lazy_exports
from graft.utils.versions import __version__

_EXPORTS = {
    "Backbone": "graft.models.backbones.base", "Preprocessing": "graft.models.backbones.base",
    "create_backbone": "graft.models.backbones.registry", "FitConfig": "graft.config", "load_config": "graft.config",
    "GraftError": "graft.errors", "evaluate": "graft.evaluation.scoring", "predict": "graft.evaluation.inference",
    "GraftModel": "graft.models.grafted", "load": "graft.models.run_folder", "cut": "graft.models.surgery",
    "list_nodes": "graft.models.inspection", "FitResult": "graft.training.state", "Hooks": "graft.training.state",
    "fit": "graft.training.fitting", "suggest": "graft.analysis.suggest", "audit": "graft.analysis.audit",
}

__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
