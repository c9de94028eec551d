"""graft: a folder of labelled images in, an accurate fine-tuned classifier out, by transfer learning."""

__version__ = "0.1.0"

from graft.backbones import Backbone, Preprocessing, create_backbone  # noqa: E402
from graft.config import FitConfig, load_config  # noqa: E402
from graft.errors import GraftError  # noqa: E402
from graft.evaluate import evaluate, predict  # noqa: E402
from graft.model import GraftModel, load  # noqa: E402
from graft.surgery import cut, list_nodes  # noqa: E402
from graft.trainer import FitResult, Hooks, fit  # noqa: E402

__all__ = [
    "Backbone", "FitConfig", "FitResult", "GraftError", "GraftModel", "Hooks", "Preprocessing", "create_backbone",
    "cut", "evaluate", "fit", "list_nodes", "load", "load_config", "predict", "__version__",
]
