"""Images in: decoding, discovery of folders and CSV manifests, the scan, datasets and transforms.

The main public names are re-exported lazily (``graft.utils.lazy``): importing the package costs nothing.
"""

from graft.utils.lazy import lazy_exports

_EXPORTS = {
    "DatasetSplits": "graft.data.discovery",
    "Sample": "graft.data.discovery",
    "discover": "graft.data.discovery",
    "DEFAULT_MAX_PIXELS": "graft.data.images",
    "ImageError": "graft.data.images",
    "decode_image": "graft.data.images",
    "load_image": "graft.data.images",
    "ImageDataset": "graft.data.datasets",
    "ScanReport": "graft.data.scan",
    "create_transform": "graft.data.transforms",
    "TTAViews": "graft.data.transforms",
    "dataset_statistics": "graft.data.statistics",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
