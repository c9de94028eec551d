"""Getting models out: export (ONNX, torch.export, safetensors) and the HTTP server.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "ExportResult": "graft.deploy.export",
    "export_onnx": "graft.deploy.export",
    "ServeConfig": "graft.deploy.serve",
    "create_app": "graft.deploy.serve",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
