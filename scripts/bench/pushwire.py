"""Lean push clients for the bench's load: one asyncio protocol per connection.

:class:`SseReader` reads ``GET /quotes/stream`` (as HTTP/1.0, so the body comes
unchunked, ended by the close); :class:`WebSocketReader` opens ``GET /ws``,
subscribes to every symbol, answers pings, and reads the quotes. Both parse only
what the bench needs (a quote's symbol, sequence and time) and hand it to the
load (:mod:`.loadclient`), so that ten thousand of them fit in two processes
without the load becoming the bottleneck. They speak to Core and to the bench's
FastAPI peer alike.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from datetime import datetime
from time import time as _now
from typing import Any, Protocol

__all__ = ["SseReader", "WebSocketReader"]


class Load(Protocol):
    """What a reader reports to (:class:`.loadclient._Load`)."""

    def start(self, sub: Any) -> None: ...

    def record(
        self, sub: Any, symbol: str, sequence: int, generated: float, now: float
    ) -> None: ...

    def end(self, sub: Any, status: str) -> None: ...


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class _Reader(asyncio.Protocol):
    """``stall``: stop reading once subscribed, as a client that froze would."""

    def __init__(self, sub: Any, load: Load, *, stall: bool = False) -> None:
        self.sub = sub
        self.load = load
        self.stall = stall
        self.transport: asyncio.Transport | None = None
        self.head = True
        self.buffer = bytearray()
        self.ended = False

    def quote(self, body: bytes | str, now: float) -> None:
        fields = json.loads(body)
        if fields.get("type", "quote") == "quote":
            self.load.record(
                self.sub, fields["symbol"], fields["sequence"], _epoch(fields["time"]), now
            )
        elif fields.get("type") == "snapshot":
            self.load.start(self.sub)

    def finish(self, status: str) -> None:
        if not self.ended:
            self.ended = True
            self.load.end(self.sub, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("OK" if exc is None else f"lost: {exc}")

    def body_ready(self, data: bytes, expected: bytes) -> bool:
        """Buffer ``data``; True once the response head is off the buffer with the
        ``expected`` status (b" 200 ", say). A head with another status ends the
        connection."""
        self.buffer += data
        if not self.head:
            return True
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
        del self.buffer[: end + 4]
        self.head = False
        if expected not in status:
            self.finish(status.decode(errors="replace"))
            assert self.transport is not None
            self.transport.close()
            return False
        self.opened()
        return True

    def opened(self) -> None:
        """The response head is in: what the client does then (nothing, here)."""


class SseReader(_Reader):
    """One ``GET /quotes/stream``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"GET /quotes/stream HTTP/1.0\r\nHost: bench\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        now = _now()
        if not self.body_ready(data, b" 200 "):
            return
        buffer = self.buffer
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            block = bytes(buffer[start:end])
            start = end + 2
            kind = block.find(b"event: ")
            if kind < 0:
                continue  # retry:, a comment (heartbeat)
            name_end = block.find(b"\n", kind)
            name = block[kind + 7 : name_end]
            data_at = block.find(b"data: ", name_end)
            if name == b"quote":
                self.quote(block[data_at + 6 :], now)
            elif name == b"snapshot":
                self.load.start(self.sub)
                if self.stall:
                    assert self.transport is not None
                    self.transport.pause_reading()
        del buffer[:start]


class WebSocketReader(_Reader):
    """One ``GET /ws``, subscribed to every symbol."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
        )

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (payloads here are short)."""
        assert self.transport is not None
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def opened(self) -> None:
        self.send(0x1, b'{"op": "subscribe", "symbols": ["BTC", "ETH", "SBER"]}')

    def data_received(self, data: bytes) -> None:
        now = _now()
        if not self.body_ready(data, b" 101 "):
            return
        buffer = self.buffer
        at = 0
        while len(buffer) - at >= 2:
            opcode = buffer[at] & 0x0F
            length = buffer[at + 1] & 0x7F
            head = 2
            if length == 126:
                if len(buffer) - at < 4:
                    break
                length = int.from_bytes(buffer[at + 2 : at + 4], "big")
                head = 4
            elif length == 127:
                if len(buffer) - at < 10:
                    break
                length = int.from_bytes(buffer[at + 2 : at + 10], "big")
                head = 10
            if len(buffer) - at < head + length:
                break
            payload = bytes(buffer[at + head : at + head + length])
            at += head + length
            if opcode == 0x1:
                self.quote(payload, now)
            elif opcode == 0x9:
                self.send(0xA, payload)  # pong
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.finish("OK" if code in (1000, 1001) else f"close {code}")
                assert self.transport is not None
                self.transport.close()
                break
        del buffer[:at]
