"""``GET /quotes/stream``: Server-Sent Events, one per quote, from a snapshot on.

A stream, as :class:`SseStream` writes it (the protocol is in docs/push.md)::

    retry: 2000                      how long a browser waits before reconnecting

    event: reset                     only if a Last-Event-ID could not be resumed
    data: {"reason": "expired", "last_event_id": "1a2b3c4d-17"}

    id: 1a2b3c4d-42                  the snapshot: the latest quote of each symbol
    event: snapshot
    data: {"quotes": [{"symbol": "BTC", "price": 95432.12, ...}, ...]}

    event: feed                      the feed's state now, and whenever it changes
    data: {"connected": true, "last_update_age_seconds": 0.2, "reconnects": 0}

    id: 1a2b3c4d-43                  then one event per quote, as Core receives it
    event: quote
    data: {"symbol": "BTC", "price": 95440.5, "time": "...", "change_percent": ...}

    : heartbeat                      after 15 s with nothing else to send

A reconnecting client sends the id of the last event it got (``Last-Event-ID``,
which browsers send by themselves); while Core still holds every event of the
client's symbols since then, the stream replays them instead of the snapshot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection

from quotopia.core.http import RawWriter
from quotopia.core.push.hub import Kind, PushHub, Subscriber
from quotopia.core.recent import QuoteEvent

__all__ = ["HEARTBEAT", "RETRY_MILLISECONDS", "SseStream", "snapshot_json"]

#: How long a client should wait before reconnecting, in milliseconds (``retry:``).
RETRY_MILLISECONDS = 2000
#: An SSE comment: keeps proxies and browsers from timing an idle stream out.
HEARTBEAT = b": heartbeat\n\n"
#: Longest part of a client's Last-Event-ID echoed back in a ``reset`` event.
_ECHO_LIMIT = 64


def snapshot_json(events: Collection[QuoteEvent]) -> str:
    """``{"quotes": [...]}``, the quotes of ``events`` (already rendered)."""
    return '{"quotes": [' + ", ".join(event.json for event in events) + "]}"


def feed_frame(feed: dict[str, object]) -> bytes:
    return b"event: feed\ndata: " + json.dumps(feed).encode() + b"\n\n"


class SseStream:
    """The body of one ``GET /quotes/stream`` response: an async iterator of
    chunks, each a whole number of events.

    Resource handling: it joins the hub on its first ``__anext__`` (inside the
    server's sending of the body, which always ends with :meth:`aclose`), and
    leaves it in :meth:`aclose`. Ends (``StopAsyncIteration``) when Core shuts
    down, or when the hub found the client too slow.
    """

    def __init__(
        self,
        hub: PushHub,
        symbols: Collection[str] | None,
        last_event_id: str | None,
        client: tuple[str, int] | None,
        http_version: str = "1.1",
    ) -> None:
        self._hub = hub
        self._symbols = symbols
        self._last_event_id = last_event_id
        self._client = client
        self._http_version = http_version
        self._subscriber: Subscriber | None = None
        self._raw: RawWriter | None = None
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        subscriber = self._subscriber
        if subscriber is None:
            return self._open()
        batch = await self._hub.next_batch(subscriber)
        while batch.unsent:
            # The end of a direct write: on the wire as it is, before anything else.
            assert self._raw is not None
            await self._raw.write(batch.unsent)
            batch = await self._hub.next_batch(subscriber)
        if batch.closing or batch.slow:
            self._done = True
            await self.aclose()
            raise StopAsyncIteration
        chunk = b"".join([event.sse for event in batch.events])
        if batch.feed is not None:
            # Quotes arrive only while the feed is up: after it came up, before it
            # went down.
            frame = feed_frame(batch.feed)
            chunk = frame + chunk if batch.feed["connected"] else chunk + frame
        if batch.heartbeat and not chunk:
            chunk = HEARTBEAT
        self._hub.sent(subscriber, len(batch.events))
        return chunk

    def _open(self) -> bytes:
        """Join the hub; the stream's first chunk: a replay, or a snapshot."""
        hub = self._hub
        recent = hub.store.recent
        symbols = self._symbols
        parts = [b"retry: %d\n\n" % RETRY_MILLISECONDS]
        resume_after = None if self._last_event_id is None else recent.parse_id(self._last_event_id)
        replay: list[QuoteEvent] | None = None
        if resume_after is not None and recent.holds_after(resume_after, symbols):
            replay = recent.after(resume_after, symbols)
        elif self._last_event_id is not None:
            reason = "unknown_id" if resume_after is None else "expired"
            echo = self._last_event_id[:_ECHO_LIMIT]
            body = json.dumps({"reason": reason, "last_event_id": echo})
            parts.append(b"event: reset\ndata: " + body.encode() + b"\n\n")
        cursor = recent.last_id
        self._subscriber = subscriber = hub.register(Kind.SSE, symbols, cursor, self._client)
        # From the next tick on, the hub may write to the socket itself (then this
        # opening chunk is on the wire: its task waits for news only after).
        self._raw = subscriber.direct = RawWriter.for_client(self._client, self._http_version)
        if replay is not None:
            parts.extend(event.sse for event in replay)
        else:
            names = recent.symbols if symbols is None else sorted(symbols)
            latest = [event for name in names if (event := recent.latest(name, cursor))]
            parts.append(
                b"id: %s\nevent: snapshot\ndata: %s\n\n"
                % (recent.full_id(cursor).encode(), snapshot_json(latest).encode())
            )
        parts.append(feed_frame(hub.store.feed_status()))
        hub.sent(subscriber, len(replay or ()))
        return b"".join(parts)

    async def aclose(self) -> None:
        self._done = True
        if self._subscriber is not None:
            self._hub.release(self._subscriber)
