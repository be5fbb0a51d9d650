"""A lean gRPC client for one call shape: many server-streaming calls per connection.

Why it exists: grpcio's Python API costs the client about as much CPU per message
as the server spends sending it (tens of µs), so on a small machine a grpcio
load competes with the server it measures. This client speaks plain HTTP/2 and
gRPC framing on an asyncio protocol and hands each message's bytes to a callback;
per message it does a frame header, a length prefix, and the protobuf parse.

Just enough HTTP/2 for that (RFC 9113): the preface, SETTINGS (acknowledged),
PING (answered), flow control (windows opened wide and topped up), HEADERS and
CONTINUATION (decoded with hpack, so the table stays in step, and trailers give
the grpc-status), DATA (padding allowed), RST_STREAM and GOAWAY (the stream or
connection fails). No compression: the client does not offer any.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

import hpack

__all__ = ["Connection", "StreamHandler"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_MAX_WINDOW = 2**31 - 1
_TOP_UP = 2**30  # re-open a window once this much of it has been used
_HEADER = struct.Struct(">I")  # 24-bit length + type, read as one word


class StreamHandler(Protocol):
    """What a stream's owner is told."""

    def on_message(self, message: bytes) -> None: ...

    def on_end(self, status: str) -> None:
        """The stream ended: ``"OK"``, a gRPC status name, or a transport error."""


_STATUS_NAMES = {
    "0": "OK",
    "1": "CANCELLED",
    "2": "UNKNOWN",
    "3": "INVALID_ARGUMENT",
    "4": "DEADLINE_EXCEEDED",
    "5": "NOT_FOUND",
    "8": "RESOURCE_EXHAUSTED",
    "13": "INTERNAL",
    "14": "UNAVAILABLE",
}


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


class _Stream:
    __slots__ = ("buffer", "handler", "used")

    def __init__(self, handler: StreamHandler) -> None:
        self.handler = handler
        self.buffer = b""
        self.used = 0


class Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying server-streaming gRPC calls to one method.

    Use :meth:`open` to connect, :meth:`call` to start a stream, :meth:`close` to end.
    """

    def __init__(self, authority: str, path: str) -> None:
        self._authority = authority
        self._path = path
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._used = 0
        self._block: bytearray | None = None
        self._block_ends_stream = False
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(f"{host}:{port}", path), host, port)
        return protocol

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        settings = struct.pack(">HIHI", 0x2, 0, 0x4, _MAX_WINDOW)  # no push; wide windows
        transport.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, (_MAX_WINDOW - 65535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("connection lost")
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        while end - offset >= 9:
            word = _HEADER.unpack_from(buffer, offset)[0]
            length = word >> 8
            if end - offset - 9 < length:
                break
            kind = word & 0xFF
            flags = buffer[offset + 4]
            stream_id = int.from_bytes(buffer[offset + 5 : offset + 9], "big") & _MAX_WINDOW
            payload = bytes(buffer[offset + 9 : offset + 9 + length])
            offset += 9 + length
            if kind == _DATA:
                self._on_data(stream_id, flags, payload)
            else:
                self._on_control(kind, flags, stream_id, payload)
        del buffer[:offset]

    # -- the calls ------------------------------------------------------------------

    def call(self, request: bytes, handler: StreamHandler) -> None:
        """Start one call: send its headers and its one request message."""
        assert self._transport is not None
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(handler)
        block = self._encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", self._path),
                (":authority", self._authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        message = b"\x00" + len(request).to_bytes(4, "big") + request
        self._transport.write(
            _frame(_HEADERS, _END_HEADERS, stream_id, block)
            + _frame(_DATA, _END_STREAM, stream_id, message)
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- frames ---------------------------------------------------------------------

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        size = len(payload)
        if flags & _PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        self._used += size
        if self._used > _TOP_UP:
            self._write(_frame(_WINDOW_UPDATE, 0, 0, self._used.to_bytes(4, "big")))
            self._used = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.used += size
        if stream.used > _TOP_UP:
            self._write(_frame(_WINDOW_UPDATE, 0, stream_id, stream.used.to_bytes(4, "big")))
            stream.used = 0
        data = stream.buffer + payload if stream.buffer else payload
        offset = 0
        end = len(data)
        on_message = stream.handler.on_message
        while end - offset >= 5:
            length = int.from_bytes(data[offset + 1 : offset + 5], "big")
            if end - offset - 5 < length:
                break
            on_message(data[offset + 5 : offset + 5 + length])
            offset += 5 + length
        stream.buffer = data[offset:]
        if flags & _END_STREAM:
            self._end(stream_id, "INTERNAL")  # data ended without trailers

    def _on_control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind in (_HEADERS, _CONTINUATION):
            self._on_headers(kind, flags, stream_id, payload)
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._write(_frame(_SETTINGS, _ACK, 0))
        elif kind == _PING:
            if not flags & _ACK:
                self._write(_frame(_PING, _ACK, 0, payload))
        elif kind == _RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self._end(stream_id, "RESOURCE_EXHAUSTED" if code == 0xB else f"RST_STREAM({code})")
        elif kind == _GOAWAY:
            self._fail_all("GOAWAY")
            self.close()

    def _on_headers(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        # CONTINUATION frames follow their HEADERS frame at once (RFC 9113, 6.10), so
        # one pending block per connection is enough.
        if kind == _HEADERS:
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & _PRIORITY:
                payload = payload[5:]
            self._block = bytearray(payload)
            self._block_ends_stream = bool(flags & _END_STREAM)
        elif self._block is None:
            return
        else:
            self._block += payload
        if not flags & _END_HEADERS:
            return
        # Decode every block, even a dropped stream's, to keep the table in step.
        headers = dict(self._decoder.decode(bytes(self._block), raw=True))
        self._block = None
        if self._block_ends_stream or b"grpc-status" in headers:
            status = headers.get(b"grpc-status", b"2").decode()
            self._end(stream_id, _STATUS_NAMES.get(status, f"status {status}"))

    def _end(self, stream_id: int, status: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.handler.on_end(status)

    def _fail_all(self, status: str) -> None:
        for stream_id in list(self._streams):
            self._end(stream_id, status)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
