"""Fan-out of price updates: one bounded memory object stream per subscriber.

The generator calls :meth:`Broadcaster.publish` once per tick; it never blocks and
never waits for a subscriber. Each subscriber reads its own bounded stream. A
subscriber that falls ``buffer_size`` ticks behind (a client that stopped reading)
is disconnected as a *slow consumer* rather than allowed to hold memory or slow
anybody else down: its :attr:`Subscription.cancel_scope` is cancelled, which
interrupts the subscriber even while it is stuck writing to a client that does not
read, and :attr:`Subscription.slow` tells it why.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

__all__ = ["Broadcaster", "BroadcasterClosed", "Subscription"]


class HasSymbol(Protocol):
    @property
    def symbol(self) -> str: ...


Q = TypeVar("Q", bound=HasSymbol)


class BroadcasterClosed(Exception):
    """Raised by :meth:`Broadcaster.subscribe` once the server has begun draining."""


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

    def __enter__(self) -> Subscription[Q]:
        return self

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

    def __init__(self, buffer_size: int = 16) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self._buffer_size = buffer_size
        self._latest: dict[str, Q] = {}
        self._subscribers: set[Subscription[Q]] = set()
        self._closed = False
        self._empty: anyio.Event | None = None
        #: Subscribers dropped as slow consumers since start.
        self.slow_disconnects = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def latest(self) -> dict[str, Q]:
        """A copy of the latest quote of every symbol published so far."""
        return dict(self._latest)

    def publish(self, quotes: tuple[Q, ...]) -> None:
        """Record one tick's quotes and hand them to every subscriber, without blocking."""
        for quote in quotes:
            self._latest[quote.symbol] = quote
        if self._closed:
            # close() has ended every stream already; the subscribers drain what is
            # buffered and unregister themselves when they leave.
            return
        for sub in list(self._subscribers):
            try:
                sub._send.send_nowait(quotes)
            except anyio.WouldBlock:
                sub.slow = True
                sub.cancel_scope.cancel()
                self.slow_disconnects += 1
                self._drop(sub)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._drop(sub)

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
