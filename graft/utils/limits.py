"""Size limits written once: the largest image graft decodes, in training and behind the server.

They live here, in the lowest layer, because ``graft.config`` (below ``graft.data``) needs the training limit as a
field default and the CLI needs the server's as an option default without importing the server.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_PIXELS", "SERVE_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3): ~256 MiB decoded RGB
SERVE_MAX_PIXELS = 40_000_000  # tighter than training's limit: a server faces strangers
