"""Adapting hypercorn to Core: the places where its defaults fall short.

hypercorn serves the app well, but a few things it does on its own, below the
app, break Core's promises (every response JSON; connections closed when asked;
out within 2 s of SIGTERM):

- :class:`FinishResponses` wraps the ASGI app so the end of every response is
  handled by hypercorn in full, and a benign race at connection close is not
  logged as an ERROR.
- :func:`json_protocol_errors` makes hypercorn's own answers to requests that are
  not valid HTTP/1.1 (a malformed request line, headers over its 16 KiB limit,
  ...) or not valid WebSocket handshakes JSON, like every other error. The app
  never sees those requests, and hypercorn has no hook for them, so this replaces
  one private method of its HTTP/1.1 protocol and one of its WebSocket stream;
  hypercorn is pinned (<0.19) and tests/test_bad_input.py checks the result.
- :func:`quotopia.status_lines.reason_phrases` (re-exported here) puts the
  reason phrase in the status line of every HTTP/1.1 response.
- :func:`track_connections` and :func:`abort_connections` let a shutdown cut the
  connections hypercorn's graceful timeout cannot end (a write to a client that
  stopped reading runs under an unbounded shield). tests/test_resilience.py
  checks it. :func:`cut_connection` does the same to one connection, for the push
  hub to drop a client that stopped reading (tests/test_push_e2e.py).
- :class:`RawWriter` writes bytes straight to an HTTP/1.x connection's socket,
  beside hypercorn, framed as h11 would frame them: how the push hub delivers a
  tick to thousands of event streams without waking a task, or passing each
  chunk through Quart, hypercorn and h11, for each of them (tests/test_push_e2e.py
  reads the bytes through h11).
- :func:`ws_keepalive` makes hypercorn's WebSocket pings detect dead peers:
  hypercorn sends a ping every ``websocket_ping_interval`` seconds but never looks
  for the pong, so a peer that vanished (no FIN, no RST) would hold its
  connection until TCP gives up, minutes or hours later. It replaces one private
  method of hypercorn's WebSocket stream and wraps another.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from http import HTTPStatus
from typing import Any, cast

import h11
import trio
from hypercorn.protocol.events import Body, Data, EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from wsproto.events import Ping

from quotopia.status_lines import reason, reason_phrases

__all__ = [
    "FINISH_TIMEOUT",
    "FinishResponses",
    "RawWriter",
    "abort_connections",
    "cut_connection",
    "json_protocol_errors",
    "reason_phrases",
    "track_connections",
    "ws_keepalive",
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


async def _send_json_handshake_error(self: WSStream, status_code: int) -> None:
    """hypercorn's own answer to a WebSocket handshake it refuses (no
    ``Sec-WebSocket-Key``, an unknown version...) as JSON; replaces
    ``WSStream._send_error_response``, which sends no body."""
    body = json.dumps(
        {
            "error": HTTPStatus(status_code).phrase.lower(),
            "detail": "not a valid WebSocket handshake",
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await self.send(Response(stream_id=self.stream_id, status_code=status_code, headers=headers))
    await self.send(Body(stream_id=self.stream_id, data=body))
    await self.send(EndBody(stream_id=self.stream_id))
    await self.config.log.access(
        self.scope, {"status": status_code, "headers": []}, time.time() - self.start_time
    )


def json_protocol_errors() -> None:
    """Make hypercorn's own HTTP/1.1 error responses JSON, and its refusals of bad
    WebSocket handshakes (idempotent)."""
    H11Protocol._send_error_response = _send_json_error  # type: ignore[method-assign]
    WSStream._send_error_response = _send_json_handshake_error  # type: ignore[method-assign]


#: Every connection hypercorn serves, so a shutdown can cut those it cannot end.
_connections: weakref.WeakSet[TCPServer] = weakref.WeakSet()
#: The same, by the peer's address: ASGI's ``scope["client"]``, ``(host, port)``.
_by_peer: weakref.WeakValueDictionary[tuple[str, int], TCPServer] = weakref.WeakValueDictionary()
_hypercorn_tcp_server_init = TCPServer.__init__


def _tracked_init(self: TCPServer, *args: Any, **kwargs: Any) -> None:
    _hypercorn_tcp_server_init(self, *args, **kwargs)
    _connections.add(self)
    sock = getattr(self.stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:  # already gone
        peer = None
    if isinstance(peer, tuple):
        _by_peer[cast(str, peer[0]), cast(int, peer[1])] = self


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
    return sum(_close_socket(connection) for connection in list(_connections))


def cut_connection(client: tuple[str, int]) -> bool:
    """Close the socket of the connection from ``client`` (an ASGI scope's
    ``client``); False if there is none open. A write stuck on it raises
    ``trio.ClosedResourceError``, which hypercorn handles as a closed connection,
    and the app sees the client leave."""
    connection = _by_peer.get((client[0], client[1]))
    return connection is not None and _close_socket(connection)


def _close_socket(connection: TCPServer) -> bool:
    sock = getattr(connection.stream, "socket", None)
    if sock is None or sock.fileno() == -1:
        return False
    sock.close()
    return True


class RawWriter:
    """Bytes straight to the socket of one HTTP/1.x connection whose response body
    hypercorn is in the middle of sending (an event stream), framed as h11 frames
    them: a chunk each on HTTP/1.1, the bytes as they are on HTTP/1.0.

    Only while nothing else writes to the connection: the response's own task is
    parked (so neither Quart nor hypercorn sends), and :meth:`write_nowait` checks
    hypercorn's send lock anyway. h11 does not see these bytes, which it need not:
    it keeps no count of a chunked body, and ends it with its own last chunk.

    Error handling: a socket that fails (the peer is gone) marks the writer
    broken, and it writes nothing more; the response's own path then finds the
    closed connection, as hypercorn reports it.
    """

    __slots__ = ("_connection", "broken", "chunked")

    def __init__(self, connection: TCPServer, chunked: bool) -> None:
        self._connection = connection
        self.chunked = chunked
        self.broken = False

    @classmethod
    def for_client(cls, client: tuple[str, int] | None, http_version: str) -> RawWriter | None:
        """The writer of the connection from ``client`` (ASGI's ``scope["client"]``),
        or None if there is none such (HTTP/2, TLS, or no tracked connection)."""
        if client is None or http_version not in ("1.0", "1.1"):
            return None
        connection = _by_peer.get((client[0], client[1]))
        if connection is None or getattr(connection.stream, "socket", None) is None:
            return None
        return cls(connection, chunked=http_version == "1.1")

    def frame(self, payload: bytes) -> bytes:
        """``payload`` as one piece of the body on the wire."""
        if not self.chunked:
            return payload
        return b"%x\r\n%b\r\n" % (len(payload), payload)

    def write_nowait(self, data: bytes) -> int:
        """Write what the socket takes now, without waiting; how many bytes (0 if
        hypercorn is writing, the socket is full, or the writer is broken)."""
        if self.broken or self._connection.send_lock.locked():
            return 0
        # Looked up each time: a closed socket says -1, and its number may already
        # belong to another connection.
        fd = self._connection.stream.socket.fileno()
        if fd < 0:
            self.broken = True
            return 0
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self.broken = True
            return 0

    async def write(self, data: bytes) -> None:
        """Write all of ``data``, waiting for room, under hypercorn's send lock and
        shielded as hypercorn shields its writes (a cancelled write would cut a
        chunk in half; a stuck one ends when the hub cuts the connection)."""
        if self.broken:
            return
        async with self._connection.send_lock:
            try:
                with trio.CancelScope(shield=True):
                    await self._connection.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True


# --- WebSocket keepalive ------------------------------------------------------------

#: Seconds a peer may stay silent after a ping before it counts as dead.
_ping_timeout = 20.0
_hypercorn_ws_handle = WSStream.handle


async def _handle_noting_data(self: WSStream, event: StreamEvent) -> None:
    """hypercorn's ``WSStream.handle``, noting when the peer last sent anything
    (a pong, a message, a close): all of it arrives as ``Data``."""
    if isinstance(event, Data):
        self._quotopia_heard = trio.current_time()  # type: ignore[attr-defined]
    await _hypercorn_ws_handle(self, event)


async def _ping_and_watch(self: WSStream) -> None:
    """Replaces ``WSStream._send_pings``: ping every ``websocket_ping_interval``
    seconds, and drop the connection when nothing came back within the timeout.

    Two tasks, since a ping's write can itself be stuck behind a full socket: the
    watcher must not wait for it. A dead peer gets no close frame (it would not
    read one): the connection is closed, and the app sees the client leave with
    code 1006.
    """
    interval = self.config.websocket_ping_interval or 0.0
    self._quotopia_heard = trio.current_time()  # type: ignore[attr-defined]

    async def ping() -> None:
        while not self.closed:
            try:
                await self._send_wsproto_event(Ping())
            except trio.BusyResourceError:
                # The connection is being closed (hypercorn's close sends its EOF
                # without the send lock): nothing more to ping. Raised, it would
                # take every connection of the server down with it.
                return
            await trio.sleep(interval)

    self.task_group.spawn(ping)
    while not self.closed:
        await trio.sleep(interval)
        pinged = trio.current_time()
        await trio.sleep(_ping_timeout)
        if not self.closed and self._quotopia_heard < pinged:  # type: ignore[attr-defined]
            await self.send(StreamClosed(stream_id=self.stream_id))
            return


def ws_keepalive(timeout: float) -> None:
    """Make hypercorn drop a WebSocket whose peer sent nothing (no pong) within
    ``timeout`` seconds of a ping. Pings go every ``websocket_ping_interval``
    seconds, which must be set in hypercorn's config. Idempotent."""
    global _ping_timeout
    _ping_timeout = timeout
    WSStream.handle = _handle_noting_data  # type: ignore[method-assign]
    WSStream._send_pings = _ping_and_watch  # type: ignore[method-assign]
