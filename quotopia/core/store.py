"""Core's state: the latest quote per symbol and the feed's health.

The feed consumer is the only writer; HTTP handlers and push connections only
read. Nothing here awaits, so a read never sees a half-applied update. Listeners
(the push hub) are called after every change, synchronously. The JSON bodies of ``GET /quotes`` and
``GET /quotes/<symbol>`` are rendered once per update, not once per request (only a
quote's ``age_seconds`` changes between two updates; it is appended per request).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from quotopia.core.recent import RecentQuotes, quote_fields
from quotopia.telemetry.metrics import FastHistogram

__all__ = ["QuoteStore", "StoredQuote"]


@dataclass(frozen=True, slots=True)
class StoredQuote:
    symbol: str
    price: float
    time: datetime | None
    change_percent: float
    sequence: int
    #: When Core received it, on the store's (monotonic) clock.
    received_at: float


class QuoteStore:
    """The latest quote per symbol plus the feed's connection state.

    ``clock`` is a monotonic clock in seconds, ``wall_clock`` the time of day in
    seconds since the epoch (to compare with FT's quote times); tests pass fakes.
    ``recent`` holds the last quotes of every symbol, numbered, for push clients
    (by default 600 per symbol, with a random epoch).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        recent: RecentQuotes | None = None,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        #: The recent quotes, numbered: what push clients read and resume from.
        self.recent = recent if recent is not None else RecentQuotes(secrets.token_hex(4))
        #: Goes up by one whenever ``connected`` changes.
        self.feed_version = 0
        self._listeners: list[Callable[[], None]] = []
        self._quotes: dict[str, StoredQuote] = {}
        self._quotes_json: bytes | None = b"{}"
        #: Per symbol, the body of GET /quotes/<symbol> up to its ``age_seconds`` value.
        self._quote_heads: dict[str, bytes] = {}
        #: Is a stream from FT open right now?
        self.connected = False
        #: How many times the feed was (re)established after a loss.
        self.reconnects = 0
        #: Quotes applied since start.
        self.updates = 0
        #: Quotes applied since start, per symbol.
        self.received: dict[str, int] = {}
        #: From a quote's generation at FT (its ``time``) to its arrival here. The
        #: two clocks are the two machines' time of day: across hosts, this includes
        #: their clock offset.
        self.feed_latency = FastHistogram()
        #: True once a whole snapshot (every current quote FT has) has arrived: from
        #: then on Core has something to serve for every symbol.
        self.has_snapshot = False
        #: Quotes of the current stream's snapshot still to come (None: unknown).
        self._snapshot_left: int | None = None
        self._ever_connected = False
        self._last_update: float | None = None

    def apply(
        self, symbol: str, price: float, time: datetime | None, change_percent: float, sequence: int
    ) -> None:
        """Record one quote from the feed."""
        now = self._clock()
        key = symbol.upper()
        previous = self._quotes.get(key)
        self._quotes[key] = StoredQuote(symbol, price, time, change_percent, sequence, now)
        self._quotes_json = None
        self._quote_heads.pop(key, None)
        self._last_update = now
        self.updates += 1
        self.received[symbol] = self.received.get(symbol, 0) + 1
        if self._snapshot_left:
            # A snapshot quote is as old as the last tick: no measure of the feed's delay.
            self._snapshot_left -= 1
        elif time is not None:
            self.feed_latency.observe(max(0.0, self._wall_clock() - time.timestamp()))
        if not self._snapshot_left:  # None (the size is unknown) or 0
            self.has_snapshot = True
        # A reconnect's snapshot repeats the quotes Core already has: not news.
        if previous is None or (previous.sequence, previous.price, previous.time) != (
            sequence,
            price,
            time,
        ):
            self.recent.append(symbol, price, time, change_percent, sequence, now)
            self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every new quote and every change of the feed's
        state. It must not raise, nor block."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def feed_up(self, snapshot_size: int | None = None) -> None:
        """A stream from FT is open; ``snapshot_size`` quotes open it, if FT said so.

        An FT that does not say (another implementation of the contract) counts
        its first quote as the snapshot.
        """
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.connected = True
        self._snapshot_left = snapshot_size
        if snapshot_size == 0:
            self.has_snapshot = True
        self.feed_version += 1
        self._changed()

    @property
    def latest(self) -> list[StoredQuote]:
        """The latest quote of every symbol, sorted by symbol."""
        return sorted(self._quotes.values(), key=lambda q: q.symbol)

    def feed_down(self) -> None:
        if self.connected:
            self.connected = False
            self.feed_version += 1
            self._changed()

    def get(self, symbol: str) -> StoredQuote | None:
        """The latest quote of ``symbol``, matched case-insensitively."""
        return self._quotes.get(symbol.upper())

    def age(self, quote: StoredQuote) -> float:
        """Seconds since Core received ``quote``."""
        return max(0.0, self._clock() - quote.received_at)

    def quotes_json(self) -> bytes:
        """``{"BTC": 95432.12, ...}``: every symbol's latest price, sorted by symbol."""
        if self._quotes_json is None:
            prices = {
                q.symbol: q.price for q in sorted(self._quotes.values(), key=lambda q: q.symbol)
            }
            self._quotes_json = json.dumps(prices).encode()
        return self._quotes_json

    def quote_json(self, symbol: str) -> bytes | None:
        """The body of ``GET /quotes/<symbol>`` (matched case-insensitively), or None.

        ``{"symbol": "BTC", "price": 95432.12, "time": "2025-01-11T22:30:00.123Z",
        "change_percent": 0.034, "sequence": 7, "age_seconds": 1.234}``, exactly as
        ``json.dumps`` writes it: all but the age is rendered once per update.
        """
        key = symbol.upper()
        found = self._quotes.get(key)
        if found is None:
            return None
        head = self._quote_heads.get(key)
        if head is None:
            head = self._quote_heads[key] = _render_head(found)
        # json.dumps writes a float as its repr(); the age is never NaN or infinite.
        return head + repr(round(self.age(found), 3)).encode() + b"}"

    def feed_status(self) -> dict[str, object]:
        """The ``feed`` object of ``GET /health``."""
        age = None if self._last_update is None else round(self._clock() - self._last_update, 3)
        return {
            "connected": self.connected,
            "last_update_age_seconds": age,
            "reconnects": self.reconnects,
        }


def _render_head(quote: StoredQuote) -> bytes:
    """A quote's JSON up to the value of ``age_seconds``, its last member."""
    rendered = json.dumps(
        quote_fields(quote.symbol, quote.price, quote.time, quote.change_percent, quote.sequence)
    )
    return rendered[:-1].encode() + b', "age_seconds": '
