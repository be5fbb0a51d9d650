"""Fan-out of price updates: one bounded memory object stream per subscriber.

The generator calls :meth:`Broadcaster.publish` once per tick; it never blocks and
never waits for a subscriber. Each subscriber reads its own bounded stream.

The slow-consumer policy, for a subscriber whose stream is full (``buffer_size``
ticks behind, typically a client that reads slowly or not at all):

1. *Conflation*, for a transient stall: later ticks are merged into one pending
   batch that keeps only the newest quote per symbol, and is handed over as soon
   as the stream has room. Memory stays bounded (one quote per symbol); the
   client sees a gap in the sequence numbers, not stale data. Each quote dropped
   this way is counted in :attr:`Broadcaster.conflated`.
2. *Disconnection*, for a dead or hopeless one: once a subscriber has been behind
   for longer than ``slow_consumer_timeout`` seconds, it is dropped: its
   :attr:`Subscription.cancel_scope` is cancelled, which interrupts it even while
   it is stuck writing to a client that does not read, and
   :attr:`Subscription.slow` tells it why. Counted in
   :attr:`Broadcaster.slow_disconnects`.

Nobody else waits for a slow subscriber at any point.

*Direct delivery*, for the common case of a subscriber that keeps up: while it
waits in :meth:`Subscription.receive` with nothing buffered, it may offer a
function that delivers a tick on the spot (FT's writes the tick's bytes to the
client's socket if flow control allows). :meth:`Broadcaster.publish` then calls
that function instead of queueing the tick and waking the subscriber's task. Waking
a task per subscriber per tick (a memory-stream hand-over, an event, a trip
through the event loop) cost more than the write itself. The first time the
function declines, the tick is queued as above and the subscriber wakes to send it
the slow way; ticks stay in order because nothing is delivered directly again until
the subscriber is back to waiting with an empty buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

__all__ = ["Broadcaster", "BroadcasterClosed", "Lag", "Subscription"]


class HasSymbol(Protocol):
    @property
    def symbol(self) -> str: ...


Q = TypeVar("Q", bound=HasSymbol)
T = TypeVar("T")


class BroadcasterClosed(Exception):
    """Raised by :meth:`Broadcaster.subscribe` once the server has begun draining."""


@dataclass(frozen=True, slots=True)
class Lag:
    """How far behind the subscribers are, at one moment (see :meth:`Broadcaster.lag`)."""

    #: Subscribers whose stream is full, so their quotes are being conflated.
    behind: int = 0
    #: Ticks waiting for the most backlogged subscriber (a conflated batch counts one).
    max_backlog: int = 0
    #: How long the longest-lagging subscriber has been behind, in seconds.
    max_behind_seconds: float = 0.0


class Subscription(Generic[Q]):
    """One subscriber's view: a snapshot, then every later tick in order.

    Use it as a context manager (``with broadcaster.subscribe() as sub:``); leaving
    the block unregisters the subscriber and closes its stream.
    """

    def __init__(
        self, broadcaster: Broadcaster[Q], snapshot: tuple[Q, ...], buffer_size: int
    ) -> None:
        self._broadcaster = broadcaster
        send, receive = anyio.create_memory_object_stream[tuple[Q, ...]](buffer_size)
        self._send = send
        #: The latest quote of every symbol at the moment of subscribing.
        self.snapshot = snapshot
        #: One item per tick: the quotes published in that tick. It ends when the
        #: broadcaster closes (a drain) or drops this subscriber.
        self.updates: MemoryObjectReceiveStream[tuple[Q, ...]] = receive
        #: Cancelled when the subscriber is dropped as a slow consumer. The
        #: subscriber runs its read-and-forward loop inside it.
        self.cancel_scope = anyio.CancelScope()
        #: True once this subscriber was dropped for falling too far behind.
        self.slow = False
        # Quotes that did not fit in the stream, newest per symbol, and since when
        # (the broadcaster's clock) the subscriber has been behind.
        self._pending: dict[str, Q] = {}
        self._behind_since = 0.0
        # Set only while receive() waits with nothing buffered: see _deliver().
        self._direct: Callable[[tuple[Q, ...]], bool] | None = None

    def __enter__(self) -> Subscription[Q]:
        return self

    async def receive(
        self, direct: Callable[[tuple[Q, ...]], bool] | None = None
    ) -> list[tuple[Q, ...]]:
        """Every tick buffered so far, oldest first; waits until there is at least one.

        Taking all buffered ticks at once lets a subscriber that fell behind catch
        up with one write instead of one per tick.

        ``direct``: while this waits, :meth:`Broadcaster.publish` offers each new
        tick to ``direct`` instead of buffering it. ``direct`` either delivers the
        tick itself, synchronously and completely, and returns True, or returns
        False, and then that tick and every later one are buffered and returned by
        this call. It must not raise.

        Raises :class:`anyio.EndOfStream` once the updates have ended (see
        :attr:`updates`) and everything buffered has been received.
        """
        await anyio.lowlevel.checkpoint()
        ticks = _take_buffered(self.updates)
        if ticks:
            return ticks
        self._direct = direct
        try:
            tick = await self.updates.receive()
        finally:
            self._direct = None
        return [tick, *_take_buffered(self.updates)]

    @property
    def backlog(self) -> int:
        """Ticks waiting for this subscriber: those buffered, plus a conflated batch."""
        return self.updates.statistics().current_buffer_used + bool(self._pending)

    def __exit__(self, *exc_info: object) -> None:
        self._send.close()
        self.updates.close()
        self._broadcaster._leave(self)


class Broadcaster(Generic[Q]):
    """Keeps the latest quote per symbol and fans every tick out to subscribers.

    Resource handling: every subscription's streams are closed when its
    ``subscribe()`` block exits, whatever the reason, so a cancelled subscriber
    leaves nothing behind.
    """

    def __init__(self, buffer_size: int = 16, slow_consumer_timeout: float = 10.0) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if slow_consumer_timeout < 0:
            raise ValueError("slow_consumer_timeout must be >= 0")
        self._buffer_size = buffer_size
        self._slow_consumer_timeout = slow_consumer_timeout
        self._latest: dict[str, Q] = {}
        self._subscribers: set[Subscription[Q]] = set()
        self._closed = False
        self._empty: anyio.Event | None = None
        #: Subscribers dropped as slow consumers since start.
        self.slow_disconnects = 0
        #: Quotes replaced by a newer quote of the same symbol before a lagging
        #: subscriber could take them, since start.
        self.conflated = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (FT is draining)."""
        return self._closed

    @property
    def latest(self) -> dict[str, Q]:
        """A copy of the latest quote of every symbol published so far."""
        return dict(self._latest)

    def lag(self, now: float) -> Lag:
        """How far behind the subscribers are at ``now`` (the clock of :meth:`publish`).

        One pass over the subscribers: for a scrape, not for every tick.
        """
        behind = max_backlog = 0
        oldest = now
        for sub in self._subscribers:
            if sub._direct is not None:
                # Waiting for a tick with nothing buffered: the usual case, and
                # reading the stream's statistics would cost ten times as much.
                continue
            max_backlog = max(max_backlog, sub.backlog)
            if sub._pending:
                behind += 1
                oldest = min(oldest, sub._behind_since)
        return Lag(behind, max_backlog, now - oldest)

    def publish(self, quotes: tuple[Q, ...], now: float | None = None) -> None:
        """Record one tick's quotes and hand them to every subscriber, without blocking.

        ``now`` is the time on the event loop's clock (tests pass their own); it
        only decides how long a lagging subscriber has been behind.
        """
        for quote in quotes:
            self._latest[quote.symbol] = quote
        if self._closed:
            # close() has ended every stream already; the subscribers drain what is
            # buffered and unregister themselves when they leave.
            return
        if now is None:
            now = anyio.current_time()
        for sub in list(self._subscribers):
            self._deliver(sub, quotes, now)

    def _deliver(self, sub: Subscription[Q], quotes: tuple[Q, ...], now: float) -> None:
        direct = sub._direct
        if direct is not None:
            # Pending (conflated) quotes are older than this tick: they must go
            # first, so they go through the stream, and this tick with them.
            if not sub._pending and direct(quotes):
                return
            sub._direct = None
        if sub._pending:
            # Already behind: conflate this tick into what is waiting.
            for quote in quotes:
                if quote.symbol in sub._pending:
                    self.conflated += 1
                sub._pending[quote.symbol] = quote
            quotes = tuple(sub._pending.values())
        try:
            sub._send.send_nowait(quotes)
        except anyio.WouldBlock:
            if not sub._pending:
                sub._pending = {quote.symbol: quote for quote in quotes}
                sub._behind_since = now
            elif now - sub._behind_since > self._slow_consumer_timeout:
                sub.slow = True
                sub.cancel_scope.cancel()
                self.slow_disconnects += 1
                self._drop(sub)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._drop(sub)
        else:
            sub._pending = {}

    def subscribe(self) -> Subscription[Q]:
        """Register a subscriber; use the result in a ``with`` block.

        The snapshot and the registration happen together, with no await in
        between, so the subscriber sees each tick exactly once: either in the
        snapshot or as an update.

        Raises :class:`BroadcasterClosed` once :meth:`close` has been called.
        """
        if self._closed:
            raise BroadcasterClosed("the feed is shutting down")
        sub = Subscription(self, tuple(self._latest.values()), self._buffer_size)
        self._subscribers.add(sub)
        return sub

    def close(self) -> None:
        """Refuse new subscribers and end every open subscription's updates."""
        self._closed = True
        for sub in self._subscribers:
            sub._send.close()

    async def wait_empty(self) -> None:
        """Wait until every subscriber has left."""
        while self._subscribers:
            if self._empty is None or self._empty.is_set():
                self._empty = anyio.Event()
            await self._empty.wait()

    def _drop(self, sub: Subscription[Q]) -> None:
        # Closing the send side ends the subscriber's ``async for`` once it has
        # read what is already buffered.
        sub._send.close()
        self._subscribers.discard(sub)

    def _leave(self, sub: Subscription[Q]) -> None:
        self._subscribers.discard(sub)
        if not self._subscribers and self._empty is not None:
            self._empty.set()


def _take_buffered(updates: MemoryObjectReceiveStream[T]) -> list[T]:
    """The items already waiting in ``updates``, taken without blocking."""
    items = []
    while True:
        try:
            items.append(updates.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return items
