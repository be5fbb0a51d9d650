"""The push hub: what every SSE and WebSocket connection reads, and its policy.

Every push connection is a :class:`Subscriber`: a set of symbols and a *cursor*,
the id of the last event it was given (see :mod:`quotopia.core.recent`). The
quotes themselves stay in the store's :class:`~quotopia.core.recent.RecentQuotes`,
rendered once; a connection holds no copy of them. So a tick costs the feed
consumer one wake-up per waiting connection, and nothing per connection for the
connections busy writing.

The per-connection buffer, and its policy (see docs/push.md):

- A connection is given every event of its symbols after its cursor, at most
  :data:`BATCH_LIMIT` at a time. A connection further behind than that (its
  client read slowly, and the events piled up while Core's write waited) is
  *conflated*: it gets only the newest quote of each symbol, and the skipped ones
  are counted. What a connection can have pending is bounded by the store's
  recent history, shared by all: a slow client cannot grow Core's memory.
- A connection whose oldest pending event is older than the lag limit is
  *slow*, and is closed: its client has stopped reading (Core's write has waited
  that long for room in the socket). Closing it frees what it held and never
  delays anyone else, since each connection writes in its own task.
- The feed's state (up, down) is conflated too: a connection gets the newest
  state once, whatever happened while it was busy.

Heartbeats, lag checks and the closing of slow connections are done by one task
for all connections, :meth:`PushHub.watch`, once a second; a connection waits on
nothing but its own wake-up event.

*Direct delivery*, for the common case of an event stream that keeps up: while
its task waits for news, :meth:`PushHub.deliver` (one task for all) writes each
tick straight to its socket (a :class:`Direct` writer), rendered and framed once
for every stream with the same events, without waking its task. Only a stream
whose socket is full, or that has something else to send (the feed's state, a
heartbeat), is woken to send it itself, the slow way.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from quotopia.core.config import PushLimits
from quotopia.core.recent import QuoteEvent
from quotopia.core.store import QuoteStore

__all__ = [
    "BATCH_LIMIT",
    "Batch",
    "CloseReason",
    "Direct",
    "Kind",
    "PushHub",
    "PushLimits",
    "Subscriber",
]

logger = logging.getLogger("quotopia.core")

#: Most events a connection is given at once; further behind, it is conflated.
BATCH_LIMIT = 256


class Kind(enum.Enum):
    """The protocol of a push connection (a metric label)."""

    SSE = "sse"
    WS = "ws"


class CloseReason(enum.Enum):
    """Why a push connection ended (a metric label)."""

    #: The client went away (or, for a WebSocket, closed it).
    CLIENT = "client"
    #: It fell behind past the lag limit.
    SLOW = "slow"
    #: Core is shutting down.
    SHUTDOWN = "shutdown"
    #: It broke a limit of the protocol (a WebSocket's subscriptions).
    LIMIT = "limit"
    #: An unexpected error in Core (logged).
    ERROR = "error"


class Direct(Protocol):
    """Writes to a push connection's socket without its task (see
    :class:`quotopia.core.http.RawWriter`)."""

    #: Is each write framed (an HTTP/1.1 chunk)? Writers that frame alike share frames.
    chunked: bool

    def frame(self, payload: bytes) -> bytes:
        """``payload`` as it goes on the wire (a chunk, say)."""
        ...

    def write_nowait(self, data: bytes) -> int:
        """Write what the socket takes now; how many bytes."""
        ...


@dataclass(slots=True)
class Batch:
    """What a connection is to send next."""

    #: Quote events, oldest first (at most one per symbol if conflated).
    events: list[QuoteEvent] = field(default_factory=list)
    #: The feed's new state (``GET /health``'s ``feed`` object), if it changed.
    feed: dict[str, object] | None = None
    #: A heartbeat is due: nothing was sent for a while.
    heartbeat: bool = False
    #: Core is shutting down: send the goodbye, then end.
    closing: bool = False
    #: The connection fell behind and is being closed: end now.
    slow: bool = False
    #: Its own task has mail for it (a WebSocket's client sent a message).
    mail: bool = False
    #: The rest of a direct write that the socket did not take whole: to be
    #: written as it is, before anything else.
    unsent: bytes = b""


class Subscriber:
    """One push connection, as the hub sees it. Only its own task changes
    ``symbols`` and ``cursor``; the hub's watcher only reads them."""

    __slots__ = (
        "_wake",
        "client",
        "conflated",
        "cursor",
        "direct",
        "feed_seen",
        "has_mail",
        "heartbeat_due",
        "kind",
        "last_write",
        "pending_since",
        "reason",
        "sent",
        "slow_since",
        "symbols",
        "unsent",
    )

    def __init__(
        self,
        kind: Kind,
        symbols: Collection[str] | None,
        cursor: int,
        feed_seen: int,
        client: tuple[str, int] | None,
        now: float,
    ) -> None:
        self.kind = kind
        #: Its symbols, canonically spelled; None for every symbol there is.
        self.symbols: frozenset[str] | None = None if symbols is None else frozenset(symbols)
        #: The id of the last event it was given (every event of its symbols up to
        #: here was sent or conflated away).
        self.cursor = cursor
        #: The store's ``feed_version`` it last sent.
        self.feed_seen = feed_seen
        #: The peer address (ASGI ``scope["client"]``), to cut a stuck connection.
        self.client = client
        #: When it last wrote anything (for heartbeats).
        self.last_write = now
        self.heartbeat_due = False
        self.has_mail = False
        #: When the oldest event it has not been given arrived (None: not known to
        #: have any). Kept, not recomputed: that event may since have dropped out
        #: of the recent history, which at a fast tick spans only seconds.
        self.pending_since: float | None = None
        #: When it was found slow (None: it is not).
        self.slow_since: float | None = None
        self.sent = 0
        self.conflated = 0
        #: Why it ended, when its own task decided (a limit broken, say).
        self.reason: CloseReason | None = None
        #: Its socket, for direct delivery while its task waits (None: none).
        self.direct: Direct | None = None
        #: What a direct write left unwritten (its task writes it).
        self.unsent = b""
        self._wake = trio.Event()

    def poke(self) -> None:
        """Wake its task: something changed (a quote, the feed, a message for it)."""
        self._wake.set()

    def mail(self) -> None:
        """Make its :meth:`PushHub.next_batch` return, with ``mail`` set."""
        self.has_mail = True
        self._wake.set()

    async def _sleep(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()


class PushHub:
    """Every push connection of one Core, over one store.

    ``cut`` closes the TCP connection of a peer address (a stuck write cannot be
    cancelled; see :func:`quotopia.core.http.cut_connection`); ``clock`` is the
    store's monotonic clock. Counters here are read by Core's metrics at scrape
    time.
    """

    def __init__(
        self,
        store: QuoteStore,
        limits: PushLimits,
        *,
        cut: Callable[[tuple[str, int]], bool] = lambda client: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.limits = limits
        self._cut = cut
        self._clock = clock
        self._subscribers: set[Subscriber] = set()
        self._open: dict[Kind, int] = dict.fromkeys(Kind, 0)
        #: Subscribers asleep in :meth:`next_batch`, to wake on news.
        self._waiting: set[Subscriber] = set()
        #: Those of them with a direct writer: :meth:`deliver` writes to them.
        self._parked: set[Subscriber] = set()
        self._due = trio.Event()
        self.closing = False
        #: Counters for the metrics, by kind (and reason).
        self.events_sent: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self.conflated: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self.closed: dict[tuple[Kind, CloseReason], int] = {
            (kind, reason): 0 for kind in Kind for reason in CloseReason
        }
        store.on_change(self._news)

    # --- connections --------------------------------------------------------------

    def connections(self, kind: Kind) -> int:
        """Push connections of ``kind`` open now."""
        return self._open[kind]

    def register(
        self,
        kind: Kind,
        symbols: Collection[str] | None,
        cursor: int,
        client: tuple[str, int] | None,
    ) -> Subscriber:
        """A new connection, given everything after event ``cursor`` of ``symbols``
        (None: of every symbol). Pair with :meth:`release`."""
        subscriber = Subscriber(
            kind, symbols, cursor, self.store.feed_version, client, self._clock()
        )
        self._subscribers.add(subscriber)
        self._open[kind] += 1
        return subscriber

    def release(self, subscriber: Subscriber, *, failed: bool = False) -> None:
        """A connection ended; count it by reason: the one its task set in
        ``reason``, else slow, shutdown, an error (``failed``), or the client's
        leaving. Idempotent."""
        if subscriber not in self._subscribers:
            return
        self._subscribers.discard(subscriber)
        self._waiting.discard(subscriber)
        self._parked.discard(subscriber)
        self._open[subscriber.kind] -= 1
        if subscriber.reason is not None:
            reason = subscriber.reason
        elif subscriber.slow_since is not None:
            reason = CloseReason.SLOW
        elif self.closing:
            reason = CloseReason.SHUTDOWN
        elif failed:
            reason = CloseReason.ERROR
        else:
            reason = CloseReason.CLIENT
        self.closed[subscriber.kind, reason] += 1

    @contextmanager
    def subscribe(
        self,
        kind: Kind,
        symbols: Collection[str] | None,
        cursor: int,
        client: tuple[str, int] | None,
    ) -> Iterator[Subscriber]:
        """:meth:`register`, and :meth:`release` at the end of the block (an
        exception other than a cancellation counts as an error)."""
        subscriber = self.register(kind, symbols, cursor, client)
        failed = False
        try:
            yield subscriber
        except Exception:
            failed = True
            raise
        finally:
            self.release(subscriber, failed=failed)

    def close(self) -> None:
        """Core is shutting down: every connection says goodbye and ends."""
        self.closing = True
        for subscriber in self._subscribers:
            subscriber.poke()

    # --- what a connection sends ------------------------------------------------

    async def next_batch(self, subscriber: Subscriber) -> Batch:
        """Wait until ``subscriber`` has something to send, and take it.

        Advances its cursor past what it returns (and what it conflated away).
        """
        recent = self.store.recent
        while True:
            if subscriber.unsent:
                # First: half a chunk is on the wire, and nothing may come between.
                unsent, subscriber.unsent = subscriber.unsent, b""
                return Batch(unsent=unsent)
            if subscriber.slow_since is not None:
                return Batch(slow=True)
            if self.closing:
                return Batch(closing=True)
            batch = Batch()
            events = recent.after(subscriber.cursor, subscriber.symbols)
            if events:
                if len(events) > BATCH_LIMIT:
                    newest = {event.symbol: event for event in events}
                    skipped = len(events) - len(newest)
                    events = sorted(newest.values(), key=lambda event: event.id)
                    subscriber.conflated += skipped
                    self.conflated[subscriber.kind] += skipped
                batch.events = events
            # Every event of its symbols up to the newest is now given (or skipped).
            subscriber.cursor = recent.last_id
            subscriber.pending_since = None
            if subscriber.feed_seen != self.store.feed_version:
                subscriber.feed_seen = self.store.feed_version
                batch.feed = self.store.feed_status()
            if subscriber.heartbeat_due:
                subscriber.heartbeat_due = False
                batch.heartbeat = True
            if subscriber.has_mail:
                subscriber.has_mail = False
                batch.mail = True
            if batch.events or batch.feed is not None or batch.heartbeat or batch.mail:
                return batch
            (self._waiting if subscriber.direct is None else self._parked).add(subscriber)
            try:
                await subscriber._sleep()
            finally:
                self._waiting.discard(subscriber)
                self._parked.discard(subscriber)

    def sent(self, subscriber: Subscriber, events: int) -> None:
        """``subscriber`` wrote ``events`` quote events (and maybe more) just now."""
        subscriber.last_write = self._clock()
        subscriber.sent += events
        self.events_sent[subscriber.kind] += events

    def _news(self) -> None:
        """The store changed: wake every connection waiting for news, but those
        :meth:`deliver` writes to."""
        waiting, self._waiting = self._waiting, set()
        for subscriber in waiting:
            subscriber.poke()
        if self._parked:
            self._due.set()

    async def deliver(self) -> None:
        """Forever: after each burst of news (a tick's quotes arrive together, and
        this task runs once the feed's task has applied them all), write it to
        every parked connection directly (see the module's docstring)."""
        while True:
            await self._due.wait()
            self._due = trio.Event()
            self.deliver_now()

    def deliver_now(self) -> None:
        """One pass of :meth:`deliver`."""
        recent = self.store.recent
        feed_version = self.store.feed_version
        #: A tick's bytes, by the events in them and their framing: written to
        #: every stream that has the same, rendered once.
        frames: dict[tuple[bool, tuple[int, ...]], bytes] = {}
        for subscriber in list(self._parked):
            direct = subscriber.direct
            assert direct is not None
            if (
                subscriber.slow_since is not None
                or self.closing
                or subscriber.feed_seen != feed_version
                or subscriber.heartbeat_due
                or subscriber.has_mail
            ):
                self._unpark(subscriber)  # its task sends it, in order
                continue
            events = recent.after(subscriber.cursor, subscriber.symbols)
            if not events:
                subscriber.cursor = recent.last_id
                subscriber.pending_since = None
                continue
            if len(events) > BATCH_LIMIT:
                self._unpark(subscriber)  # its task conflates
                continue
            key = (direct.chunked, tuple(event.id for event in events))
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = direct.frame(b"".join([event.sse for event in events]))
            written = direct.write_nowait(frame)
            if written == 0:
                self._unpark(subscriber)  # the socket is full: its task waits for room
                continue
            subscriber.cursor = recent.last_id
            subscriber.pending_since = None
            self.sent(subscriber, len(events))
            if written < len(frame):
                subscriber.unsent = frame[written:]
                self._unpark(subscriber)

    def _unpark(self, subscriber: Subscriber) -> None:
        self._parked.discard(subscriber)
        subscriber.poke()

    # --- the watcher ---------------------------------------------------------------

    async def watch(self, *, period: float = 1.0) -> None:
        """Forever, every ``period`` seconds: heartbeats for idle SSE streams, and
        the closing of connections behind past the lag limit."""
        while True:
            await trio.sleep(period)
            self.check(self._clock())

    def check(self, now: float) -> None:
        """One pass of :meth:`watch` at time ``now``."""
        limits = self.limits
        recent = self.store.recent
        for subscriber in list(self._subscribers):
            if subscriber.slow_since is not None:
                # Asked to end a while ago and still here: its write is stuck (a
                # WebSocket's goodbye could not be written). Cut the connection.
                if now - subscriber.slow_since >= 1.0 and subscriber.client is not None:
                    self._cut(subscriber.client)
                continue
            if subscriber.pending_since is None:
                oldest = recent.oldest_after(subscriber.cursor, subscriber.symbols)
                if oldest is not None:
                    subscriber.pending_since = oldest.received_at
            behind = subscriber.pending_since
            if behind is not None and now - behind > limits.lag_limit:
                self._fell_behind(subscriber, now, now - behind)
            elif subscriber.kind is Kind.SSE and now - subscriber.last_write >= limits.heartbeat:
                subscriber.heartbeat_due = True
                subscriber.poke()

    def _fell_behind(self, subscriber: Subscriber, now: float, lag: float) -> None:
        subscriber.slow_since = now
        logger.warning(
            "closing a slow %s client %s: %.1fs behind (limit %gs)",
            subscriber.kind.value.upper() if subscriber.kind is Kind.SSE else "WebSocket",
            _peer(subscriber.client),
            lag,
            self.limits.lag_limit,
            extra={"peer": _peer(subscriber.client), "lag": round(lag, 3)},
        )
        subscriber.poke()
        if subscriber.kind is Kind.SSE and subscriber.client is not None:
            # An SSE stream is behind only while its write waits for room in the
            # socket: nothing more can be written, so end the connection now.
            self._cut(subscriber.client)


def _peer(client: tuple[str, int] | None) -> str:
    return "?" if client is None else f"{client[0]}:{client[1]}"
