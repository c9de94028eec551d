"""graft's command line: a thin typer layer over the library.

``graft.cli.shared`` holds the app and the shared options; one module per command group registers its commands on
import.
"""

from graft.cli import active, analysis, data, deploy, explain, inference, probing, train  # noqa: F401  (registers)
from graft.cli.shared import app, main

__all__ = ["app", "main"]
