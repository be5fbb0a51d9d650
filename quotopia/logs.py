"""Logging set-up shared by both services: plain text, one line per event.

Readable in a terminal and in ``docker logs``; ``quotopia up`` prefixes each line
with the service's name.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure"]

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure(level: str = "INFO") -> None:
    """Send every log record to stderr in one plain-text format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our own lines already say what these libraries announce at INFO (hypercorn's
    # bind, grpclib's "Request was cancelled", asyncio's debug-mode "is serving").
    # Keep their warnings and errors.
    for chatty in ("hypercorn.error", "grpclib", "asyncio"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
