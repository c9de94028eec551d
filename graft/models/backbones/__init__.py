"""The backbone registry and its sources (timm, torchvision, the lab's scratch networks).

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "Backbone": "graft.models.backbones.base",
    "Preprocessing": "graft.models.backbones.base",
    "create_backbone": "graft.models.backbones.registry",
    "register_source": "graft.models.backbones.registry",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
