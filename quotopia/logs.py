"""Logging set-up shared by every command: one line per event, on stderr.

Two formats, chosen with ``--log-format``:

- ``text`` (the default), for people: readable in a terminal and in ``docker
  logs``; ``quotopia up`` prefixes each line with the service's name::

      2026-11-26 18:04:51.517 INFO    FT listening on 0.0.0.0:50051 (symbols SBER,BTC,ETH, tick 1s)

- ``json``, for log collectors: one JSON object per line, with the fields a call
  passes in ``extra={...}`` as keys of their own, so they can be searched without
  parsing the message::

      {"time": "2026-11-26T18:04:51.534Z", "level": "INFO", "logger": "quotopia.ft",
       "message": "client connected: 127.0.0.1:60254; 1 subscribers", "service": "ft",
       "peer": "127.0.0.1:60254", "subscribers": 1}

  (one line, wrapped here). A record with a traceback has it as the
  string ``exception``. The encoding is ``python-json-logger``'s ``JsonFormatter``.
"""

from __future__ import annotations

import logging
import sys
import time

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

__all__ = ["LOG_FORMATS", "configure"]

#: The formats :func:`configure` accepts.
LOG_FORMATS = ("text", "json")

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: The keys every JSON line has (``exception`` only with a traceback, ``worker``
#: only from a Core worker), in the order they are written.
JSON_KEYS = ("time", "level", "logger", "message", "service", "worker", "exception")


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


class _JsonLines(JsonFormatter):
    """``JsonFormatter`` with ``time`` in RFC 3339, UTC, to the millisecond.

    logging's own ``formatTime`` makes the string: with no ``datefmt`` it writes
    ``default_time_format`` of ``converter(record.created)``, then the milliseconds
    through ``default_msec_format``. (The library's ``timestamp=True`` would give
    microseconds and ``+00:00`` instead.)
    """

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def _formatter(fmt: str, service: str, worker: int | None) -> logging.Formatter:
    if fmt == "text":
        if worker is None:
            return logging.Formatter(FORMAT, DATE_FORMAT)
        # The N workers of one Core share a stderr: say which one wrote each line.
        prefixed = FORMAT.replace("%(message)s", f"worker {worker}: %(message)s")
        return logging.Formatter(prefixed, DATE_FORMAT)
    if fmt == "json":
        static: dict[str, object] = {"service": service}
        if worker is not None:
            static["worker"] = worker
        return _JsonLines(
            ["asctime", "levelname", "name", "message"],
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
            },
            static_fields=static,
            # Every other attribute of the record is an extra and gets a key, except
            # one named like a fixed key: a collector must be able to rely on
            # ``level`` being the level. (Names starting with "_" are skipped too.)
            reserved_attrs=[*RESERVED_ATTRS, *JSON_KEYS],
            # Plain ASCII, so no byte of a line depends on the stream's encoding, and
            # no character a line splitter might take for a line break (U+2028...)
            # is written raw.
            json_ensure_ascii=True,
        )
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")


def configure(
    level: str = "INFO",
    fmt: str = "text",
    service: str = "quotopia",
    *,
    worker: int | None = None,
) -> None:
    """Send every record at ``level`` or above to stderr, one line each, in ``fmt``.

    ``fmt`` is one of :data:`LOG_FORMATS`. ``service`` (``"ft"``, ``"core"``,
    ``"up"``) is the ``service`` key of every JSON line; ``worker``, the number of a
    Core worker, is its ``worker`` key, or a ``worker N:`` prefix of the text.
    Replaces whatever handlers the root logger had, so it can be called again.

    Error handling: raises :class:`ValueError` for an unknown format or level,
    before anything changes.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt, service, worker))
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.handlers[:] = [handler]
    # Our own lines already say what these libraries announce at INFO (hypercorn's
    # bind, grpclib's "Request was cancelled", asyncio's debug-mode "is serving",
    # Alembic's "Context impl SQLiteImpl." whenever a schema revision is read).
    # Keep their warnings and errors.
    for chatty in ("hypercorn.error", "grpclib", "asyncio", "alembic"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("asyncio").addFilter(_DROP_WRITES_TO_CLOSED_SOCKETS)
    # aiokafka logs each failed connection attempt at ERROR and each retried request
    # at WARNING, ten times a second while a broker is away; the services report the
    # broker's state themselves (one WARNING per outage) and see every failure that
    # matters as an exception. At DEBUG a developer gets aiokafka's lines too.
    logging.getLogger("aiokafka").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL
    )
