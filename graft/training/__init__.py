"""Training: recipes, the loop, stages, checkpoints, lr-find, precise BN and `fit`.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "fit": "graft.training.fitting",
    "FitResult": "graft.training.state",
    "Hooks": "graft.training.state",
    "create_optimizer": "graft.training.optim",
    "create_scheduler": "graft.training.optim",
    "find_lr": "graft.training.lr_find",
    "recompute_bn_statistics": "graft.training.precise_bn",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
