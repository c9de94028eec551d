"""Networks: backbones (registry and sources), surgery, heads, batch norm, the grafted model and the run folder.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "GraftModel": "graft.models.grafted",
    "create_model": "graft.models.grafted",
    "create_head": "graft.models.heads",
    "Capture": "graft.models.surgery",
    "Trunk": "graft.models.surgery",
    "cut": "graft.models.surgery",
    "list_nodes": "graft.models.inspection",
    "fold_batch_norms": "graft.models.batchnorm",
    "load": "graft.models.run_folder",
    "read_history": "graft.models.run_folder",
    "save_model": "graft.models.run_folder",
    "Backbone": "graft.models.backbones.base",
    "Preprocessing": "graft.models.backbones.base",
    "create_backbone": "graft.models.backbones.registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
