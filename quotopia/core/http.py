"""Adapting hypercorn to Core: the places where its defaults fall short.

hypercorn serves the app well, but a few things it does on its own, below the
app, break Core's promises (every response JSON; connections closed when asked;
out within 2 s of SIGTERM):

- :class:`FinishResponses` wraps the ASGI app so the end of every response is
  handled by hypercorn in full, and a benign race at connection close is not
  logged as an ERROR.
- :func:`json_protocol_errors` makes hypercorn's own answers to requests that are
  not valid HTTP/1.1 (a malformed request line, headers over its 16 KiB limit,
  ...) JSON, like every other error. The app never sees those requests, and
  hypercorn has no hook for them, so this replaces one private method of its
  HTTP/1.1 protocol; hypercorn is pinned (<0.19) and tests/test_bad_input.py
  checks the result.
- :func:`quotopia.status_lines.reason_phrases` (re-exported here) puts the
  reason phrase in the status line of every HTTP/1.1 response.
- :func:`track_connections` and :func:`abort_connections` let a shutdown cut the
  connections hypercorn's graceful timeout cannot end (a write to a client that
  stopped reading runs under an unbounded shield). tests/test_resilience.py
  checks it.
"""

from __future__ import annotations

import json
import weakref
from http import HTTPStatus
from typing import Any

import h11
import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from quotopia.status_lines import reason, reason_phrases

__all__ = [
    "FINISH_TIMEOUT",
    "FinishResponses",
    "abort_connections",
    "json_protocol_errors",
    "reason_phrases",
    "track_connections",
]

#: Longest time the end of a response is protected from cancellation, in seconds.
FINISH_TIMEOUT = 1.0


class FinishResponses:
    """The app, with every response's end handled by hypercorn in full.

    hypercorn delivers ``http.disconnect`` from inside the app's final ``send``, and
    quart-trio answers it by cancelling the task still inside that ``send``: the
    cleanup after a response (close the connection after ``Connection: close``, arm
    the keep-alive timeout otherwise) is cancelled with it, and the connection stays
    open until the client closes it. The final send is therefore shielded, for at
    most :data:`FINISH_TIMEOUT` seconds, so a client that stops reading cannot hold
    up Core's shutdown.

    Error handling: hypercorn's trio server closes a connection (``send_eof``)
    without taking its send lock, so a client that leaves just as the response ends
    makes the last send raise ``trio.BusyResourceError``. The connection is going
    away anyway; that is not an error.
    """

    def __init__(self, app: ASGIFramework) -> None:
        self._app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        async def finishing_send(message: ASGISendEvent) -> None:
            try:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    with trio.move_on_after(FINISH_TIMEOUT, shield=True):
                        await send(message)
                else:
                    # Only the end needs the protection, and a cancel scope with a
                    # deadline costs ~10 µs: 2% of a whole request on the fast path.
                    await send(message)
            except trio.BusyResourceError:
                pass

        await self._app(scope, receive, finishing_send if scope["type"] == "http" else send)


async def _send_json_error(self: H11Protocol, status_code: int) -> None:
    """hypercorn's own HTTP/1.1 errors (a malformed request, headers over 16 KiB...)
    as JSON, like the app's, with a reason phrase; replaces
    ``H11Protocol._send_error_response``, which sends no body, since hypercorn has
    no hook for them."""
    body = json.dumps({"error": HTTPStatus(status_code).phrase.lower()}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    response = h11.Response(status_code=status_code, headers=headers, reason=reason(status_code))
    await self._send_h11_event(response)
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


def json_protocol_errors() -> None:
    """Make hypercorn's own HTTP/1.1 error responses JSON (idempotent)."""
    H11Protocol._send_error_response = _send_json_error  # type: ignore[method-assign]


#: Every connection hypercorn serves, so a shutdown can cut those it cannot end.
_connections: weakref.WeakSet[TCPServer] = weakref.WeakSet()
_hypercorn_tcp_server_init = TCPServer.__init__


def _tracked_init(self: TCPServer, *args: Any, **kwargs: Any) -> None:
    _hypercorn_tcp_server_init(self, *args, **kwargs)
    _connections.add(self)


def track_connections() -> None:
    """Remember every connection hypercorn accepts, for :func:`abort_connections`."""
    TCPServer.__init__ = _tracked_init  # type: ignore[method-assign]


def abort_connections() -> int:
    """Close the socket of every connection still open; return how many.

    hypercorn writes with an unbounded shield (so a cancellation cannot cut a
    response in half), which its graceful timeout cannot interrupt: a client that
    stops reading would hold the shutdown forever. Closing the socket can: the
    stuck write raises ``trio.ClosedResourceError``, which hypercorn handles as a
    closed connection.
    """
    aborted = 0
    for connection in list(_connections):
        sock = getattr(connection.stream, "socket", None)
        if sock is not None and sock.fileno() != -1:
            sock.close()
            aborted += 1
    return aborted
