"""``GET /ws``: a WebSocket with a small JSON protocol, after the exchanges' feeds.

The client sends operations; Core answers each, and streams the quotes of the
symbols subscribed to (the protocol, with examples, is in docs/push.md)::

    → {"op": "subscribe", "symbols": ["BTC", "eth"], "id": 1}
    ← {"type": "ack", "op": "subscribe", "id": 1, "symbols": ["BTC", "ETH"], ...}
    ← {"type": "snapshot", "quotes": [{"symbol": "BTC", ...}, {"symbol": "ETH", ...}]}
    ← {"type": "quote", "symbol": "BTC", "price": 95440.5, ...}
    → {"op": "unsubscribe", "symbols": ["ETH"]}      → {"op": "list"}      → {"op": "ping"}

Every server message has a ``type``: ``hello`` (first, with the symbols and the
limits), ``ack``, ``snapshot``, ``quote``, ``feed``, ``pong`` and ``error``. A bad
message gets an ``error`` with a ``code`` and the connection stays open. Close
codes: 1001 when Core shuts down, 1008 past the subscription limit, 1009 for a
message over the size limit (sent by hypercorn), 1013 for a client that fell
behind; a peer that stops answering pings is dropped (1006 at the client).

:func:`parse_operation` is the protocol's grammar, pure; :func:`serve_websocket`
is one connection: a reader task that parses what arrives, and the connection's
own task, which alone decides what is sent, in order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import trio

from quotopia.core.push.hub import Batch, CloseReason, Kind, PushHub, Subscriber
from quotopia.core.push.sse import snapshot_json
from quotopia.core.recent import QuoteEvent

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_LATER",
    "MAILBOX",
    "Operation",
    "ProtocolError",
    "parse_operation",
    "serve_websocket",
]

logger = logging.getLogger("quotopia.core")

#: RFC 6455 close codes Core uses (docs/push.md says when).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013

#: Client messages parsed but not yet answered, per connection. When it is full
#: the reader stops reading, and TCP slows the client down.
MAILBOX = 16

OPS = ("subscribe", "unsubscribe", "list", "ping")
Op = Literal["subscribe", "unsubscribe", "list", "ping"]
#: A client's correlation id, echoed in the answer.
RequestId = int | str | None


@dataclass(frozen=True, slots=True)
class Operation:
    """One valid client message."""

    op: Op
    #: As the client spelled them (subscribe and unsubscribe only).
    symbols: tuple[str, ...] = ()
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A client message Core cannot act on; answered with an ``error``."""

    code: Literal["bad_json", "bad_message", "missing_field", "bad_field", "unknown_op"]
    message: str
    id: RequestId = None


def parse_operation(message: str | bytes) -> Operation | ProtocolError:
    """What a client's message asks for, or why it cannot be done."""
    if isinstance(message, bytes):
        return ProtocolError("bad_message", "send text frames holding JSON, not binary frames")
    try:
        document = json.loads(message)
    except ValueError as error:  # json.JSONDecodeError, or a number too long to parse
        return ProtocolError("bad_json", f"not valid JSON: {error}")
    if not isinstance(document, dict):
        return ProtocolError("bad_message", 'expected a JSON object, like {"op": "list"}')
    request_id = document.get("id")
    if request_id is not None and (
        isinstance(request_id, bool)
        or not isinstance(request_id, int | str)
        or (isinstance(request_id, str) and len(request_id) > 64)
    ):
        return ProtocolError("bad_field", '"id" must be an integer or a string of 64 at most')
    if "op" not in document:
        return ProtocolError("missing_field", 'missing "op"', request_id)
    op = document["op"]
    if op not in OPS:
        shown = op if isinstance(op, str) and len(op) <= 32 else "?"
        return ProtocolError(
            "unknown_op", f"unknown op {shown!r}; expected one of {', '.join(OPS)}", request_id
        )
    if op in ("list", "ping"):
        return Operation(op, id=request_id)
    if "symbols" not in document:
        return ProtocolError("missing_field", f'missing "symbols" for {op}', request_id)
    symbols = document["symbols"]
    if (
        not isinstance(symbols, list)
        or not symbols
        or not all(isinstance(symbol, str) and symbol.strip() for symbol in symbols)
    ):
        return ProtocolError(
            "bad_field", '"symbols" must be a non-empty list of symbol names', request_id
        )
    return Operation(op, tuple(symbol.strip() for symbol in symbols), request_id)


def _message(kind: str, request_id: RequestId = None, /, **fields: object) -> str:
    body: dict[str, object] = {"type": kind}
    if request_id is not None:
        body["id"] = request_id
    body.update(fields)
    return json.dumps(body)


def _error(code: str, message: str, request_id: RequestId = None, /, **fields: object) -> str:
    return _message("error", request_id, code=code, message=message, **fields)


@dataclass(frozen=True, slots=True)
class _Goodbye:
    """The connection is to be closed with ``code`` and ``reason``."""

    code: int
    reason: str
    why: CloseReason


class _Session:
    """One connection's state and what it sends; only the connection's own task
    calls it, so its messages go out in order."""

    def __init__(
        self, hub: PushHub, subscriber: Subscriber, send: Callable[[str], Awaitable[None]]
    ) -> None:
        self.hub = hub
        self.subscriber = subscriber
        self.send = send
        self.symbols: set[str] = set()

    async def answer(self, item: Operation | ProtocolError) -> _Goodbye | None:
        """Answer one client message; a goodbye if the connection must close."""
        if isinstance(item, ProtocolError):
            await self.send(_error(item.code, item.message, item.id))
            return None
        store = self.hub.store
        if item.op == "ping":
            await self.send(_message("pong", item.id))
            return None
        if item.op == "list":
            await self.send(
                _message(
                    "ack",
                    item.id,
                    op="list",
                    subscriptions=sorted(self.symbols),
                    symbols=store.recent.symbols,
                )
            )
            return None
        canonical: list[str] = []
        unknown: list[str] = []
        for name in item.symbols:
            found = store.get(name)
            if found is None:
                unknown.append(name[:32])
            elif found.symbol not in canonical:
                canonical.append(found.symbol)
        if unknown:
            await self.send(
                _error(
                    "unknown_symbol",
                    f"unknown symbol(s): {', '.join(unknown)}; nothing changed",
                    item.id,
                    symbols=unknown,
                )
            )
            return None
        if item.op == "subscribe":
            return await self._subscribe(canonical, item.id)
        removed = sorted(symbol for symbol in canonical if symbol in self.symbols)
        self.symbols.difference_update(removed)
        self.subscriber.symbols = frozenset(self.symbols)
        await self.send(
            _message(
                "ack",
                item.id,
                op="unsubscribe",
                symbols=removed,
                subscriptions=sorted(self.symbols),
            )
        )
        return None

    async def _subscribe(self, symbols: list[str], request_id: RequestId) -> _Goodbye | None:
        added = sorted(symbol for symbol in symbols if symbol not in self.symbols)
        limit = self.hub.limits.ws_max_subscriptions
        if len(self.symbols) + len(added) > limit:
            return _Goodbye(CLOSE_POLICY, f"more than {limit} subscriptions", CloseReason.LIMIT)
        # The snapshot is as of the cursor: what came after it follows as quotes,
        # so no quote is sent twice.
        recent = self.hub.store.recent
        cursor = self.subscriber.cursor
        latest = [event for symbol in added if (event := recent.latest(symbol, cursor))]
        self.symbols.update(added)
        self.subscriber.symbols = frozenset(self.symbols)
        await self.send(
            _message(
                "ack", request_id, op="subscribe", symbols=added, subscriptions=sorted(self.symbols)
            )
        )
        if added:
            await self.send('{"type": "snapshot", ' + snapshot_json(latest)[1:])
        return None

    async def deliver(self, batch: Batch) -> None:
        events: list[QuoteEvent] = batch.events
        feed = None if batch.feed is None else _message("feed", **batch.feed)
        # Quotes arrive only while the feed is up: after it came up, before it went
        # down.
        if feed is not None and batch.feed and batch.feed["connected"]:
            await self.send(feed)
            feed = None
        for event in events:
            await self.send(event.ws)
        if feed is not None:
            await self.send(feed)
        self.hub.sent(self.subscriber, len(events))


async def serve_websocket(
    hub: PushHub,
    client: tuple[str, int] | None,
    accept: Callable[[], Awaitable[None]],
    receive: Callable[[], Awaitable[str | bytes]],
    send: Callable[[str], Awaitable[None]],
    close: Callable[[int, str], Awaitable[None]],
) -> None:
    """Serve one WebSocket until the client leaves, Core shuts down, or the
    client breaks a limit or falls behind; the callables are the server's
    (Quart's ``websocket`` object).

    Error handling: a client's bad message is answered, never raised. The
    connection's end is counted by reason in the hub.
    """
    await accept()
    mail_send, mail_receive = trio.open_memory_channel[Operation | ProtocolError](MAILBOX)
    cursor = hub.store.recent.last_id
    with hub.subscribe(Kind.WS, (), cursor, client) as subscriber:
        session = _Session(hub, subscriber, send)
        limits = hub.limits
        await send(
            _message(
                "hello",
                symbols=hub.store.recent.symbols,
                limits={
                    "max_subscriptions": limits.ws_max_subscriptions,
                    "max_message_bytes": limits.ws_max_message,
                },
            )
        )
        await send(_message("feed", **hub.store.feed_status()))

        async def read() -> None:
            async with mail_send:
                while True:
                    parsed = parse_operation(await receive())
                    await mail_send.send(parsed)
                    subscriber.mail()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            goodbye = await _converse(session, mail_receive)
            nursery.cancel_scope.cancel()
        subscriber.reason = goodbye.why
        # Bounded: a client that stopped reading cannot take the goodbye (the hub
        # then cuts the connection).
        with trio.move_on_after(1.0):
            await close(goodbye.code, goodbye.reason)


async def _converse(
    session: _Session, mail: trio.MemoryReceiveChannel[Operation | ProtocolError]
) -> _Goodbye:
    """The connection's own loop: quotes and the feed as they come, answers to the
    client's messages in order; returns when the connection is to close."""
    hub, subscriber = session.hub, session.subscriber
    while True:
        batch = await hub.next_batch(subscriber)
        if batch.closing:
            return _Goodbye(CLOSE_GOING_AWAY, "Core is shutting down", CloseReason.SHUTDOWN)
        if batch.slow:
            return _Goodbye(CLOSE_TRY_LATER, "slow consumer", CloseReason.SLOW)
        await session.deliver(batch)
        while True:
            try:
                item = mail.receive_nowait()
            except trio.WouldBlock:
                break
            if (goodbye := await session.answer(item)) is not None:
                return goodbye
