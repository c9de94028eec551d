"""graft's command line: a thin typer layer over the library.

``graft.cli.shared`` holds the app and the shared options; one module per command group registers its commands on
import.
"""

from graft.cli import (  # noqa: F401  (registers the commands)
    active, analysis, audit, data, deploy, explain, inference, probing, train)
from graft.cli.shared import app, main

__all__ = ["app", "main"]
