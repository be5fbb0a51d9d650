"""Writing already-encoded gRPC messages to one grpclib server stream.

grpclib's public ``Stream.send_message`` takes one message object, encodes it,
prefixes it, and writes it as an HTTP/2 DATA frame of its own: one encoding, one
frame and one socket write per message per subscriber. FT encodes each quote once
per tick (:mod:`quotopia.ft.wire`) and writes a subscriber's share of a tick at
once. grpclib has no public API for that, so this module reaches one level down,
to the HTTP/2 stream under grpclib's ``Stream`` (private attributes). It is one
of the three modules that do, with :mod:`quotopia.ft.h2fast` and the slow-consumer
reset in :mod:`quotopia.ft.service`.

What is kept from ``send_message``: HTTP/2 flow control, the pause while the
transport's buffer is full, frames no larger than the client allows, grpclib's
byte counters and keepalive bookkeeping. What is skipped: grpclib's
``SendMessage`` event (FT registers no listeners) and its per-message counters
(statistics only). The call must be server-streaming, so that the trailers grpclib
sends when the handler returns (status OK) do not depend on a message count.
"""

from __future__ import annotations

from typing import Any

from grpclib.server import Stream

from quotopia.ft.h2fast import data_frame

__all__ = ["MessageWriter"]


class MessageWriter:
    """Writes length-prefixed gRPC messages, as bytes, to one server stream.

    Call :meth:`start` first: it sends the response headers. Then any mix of
    :meth:`write` and :meth:`write_nowait`, never two at a time.
    """

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream
        # grpclib's own HTTP/2 stream (grpclib.protocol.Stream), and through it the
        # connection's h2 state machine and asyncio transport.
        self._h2_stream = stream._stream
        self._h2 = self._h2_stream._h2_connection
        self._transport = self._h2_stream._transport
        # Only a client's stream can lack an id (until its request is sent).
        assert self._h2_stream.id is not None
        self._stream_id = self._h2_stream.id

    async def start(self, metadata: dict[str, str] | None = None) -> None:
        """Send the response headers (grpclib's initial metadata), with ``metadata``."""
        await self._stream.send_initial_metadata(metadata=metadata)

    async def write(self, data: bytes) -> None:
        """Write ``data``, waiting for the client's flow-control window if need be.

        Error handling: cancelled while it waits for the window, it may leave a
        message half-written; trailers must not follow then (the caller resets
        the stream instead).
        """
        await self._h2_stream.send_data(data)

    def write_nowait(self, data: bytes) -> bool:
        """Write ``data`` at once and return True, or write nothing and return False.

        All or nothing, so it never leaves half a message behind: False if the
        client's flow-control window or its largest frame is too small for
        ``data``, if the transport's buffer is full, or if the stream or the
        connection is closed. Then :meth:`write` is the way to wait for room.
        """
        connection = self._h2_stream.connection
        if not connection.write_ready.is_set() or self._transport.is_closing():
            return False
        # One DATA frame, exactly as h2.send_data() would make it, checked and
        # accounted in h2's own state (quotopia.ft.h2fast).
        frame = data_frame(self._h2, self._stream_id, data)
        if frame is None:
            return False
        self._transport.write(frame)
        self._h2_stream.data_sent += len(data)
        connection.data_sent += len(data)
        connection.data_send_process()
        return True
