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


class _DropWritesToClosedSockets(logging.Filter):
    """Drop asyncio's "socket.send() raised exception." warning.

    asyncio logs it for each write to a connection that is already gone, from the
    fifth on, naming neither the peer nor the error. When a client carrying many
    streams vanishes, FT's handlers still write that tick's quotes before they
    learn of it: dozens of these per connection. FT logs each disconnect itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "socket.send() raised exception."


_DROP_WRITES_TO_CLOSED_SOCKETS = _DropWritesToClosedSockets()


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
    logging.getLogger("asyncio").addFilter(_DROP_WRITES_TO_CLOSED_SOCKETS)
