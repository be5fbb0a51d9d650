"""Core's recent quotes: every quote it received, numbered, the last few per symbol.

Each quote the feed delivers becomes a :class:`QuoteEvent` with an *event id*:
Core's own counter (1, 2, 3, ... across all symbols), not FT's sequence number,
which starts again whenever FT restarts. Ids are unique within one Core process;
an *epoch* chosen at start tells one process's ids from another's, so an id a
client kept across a Core restart is recognised as foreign, not misread.

Push clients (SSE, WebSocket) read from here: a reconnecting client resumes after
the last id it saw, as long as Core still holds every event of its symbols since
then. Each symbol keeps its last :data:`DEFAULT_PER_SYMBOL` events: ten minutes at
FT's 1 s tick, a few kilobytes per symbol.

Every event is rendered once, when it arrives, in the forms the push protocols
send (an SSE frame, a WebSocket message), so a tick costs the same to render for
one client as for ten thousand.

Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["DEFAULT_PER_SYMBOL", "QuoteEvent", "RecentQuotes", "quote_fields"]

#: Events held per symbol: 600 is ten minutes at FT's 1 s tick.
DEFAULT_PER_SYMBOL = 600


@dataclass(frozen=True, slots=True)
class QuoteEvent:
    """One quote as the push protocols send it, rendered once."""

    #: Core's event number (see the module's docstring).
    id: int
    symbol: str
    price: float
    #: When Core received it, on the store's monotonic clock.
    received_at: float
    #: The quote's JSON object: symbol, price, time, change_percent, sequence.
    json: str
    #: The SSE frame: ``id``, ``event: quote`` and the JSON as ``data``.
    sse: bytes
    #: The WebSocket message: the JSON with ``"type": "quote"`` first.
    ws: str


def quote_fields(
    symbol: str, price: float, time: datetime | None, change_percent: float, sequence: int
) -> dict[str, object]:
    """A quote's fields as every push message and snapshot carries them."""
    return {
        "symbol": symbol,
        "price": price,
        "time": None if time is None else _rfc3339_precise(time),
        "change_percent": round(change_percent, 4),
        "sequence": sequence,
    }


class RecentQuotes:
    """The last ``per_symbol`` events of every symbol, with ids from 1 up.

    ``epoch`` names this process's ids (see the module's docstring); an event's
    full id, as clients see it, is ``f"{epoch}-{id}"``.
    """

    def __init__(self, epoch: str, per_symbol: int = DEFAULT_PER_SYMBOL) -> None:
        if per_symbol < 1:
            raise ValueError(f"per_symbol must be at least 1, got {per_symbol}")
        if not epoch or "-" in epoch:
            raise ValueError(f"epoch must be non-empty, without '-', got {epoch!r}")
        self.epoch = epoch
        self.per_symbol = per_symbol
        #: The id of the newest event, 0 before the first.
        self.last_id = 0
        self._events: dict[str, deque[QuoteEvent]] = {}
        #: Per symbol, the id of the newest event dropped to keep the bound (0: none).
        self._dropped_up_to: dict[str, int] = {}

    def append(
        self,
        symbol: str,
        price: float,
        time: datetime | None,
        change_percent: float,
        sequence: int,
        received_at: float,
    ) -> QuoteEvent:
        """Number, render and keep one quote; the oldest of its symbol may go."""
        self.last_id += 1
        number = self.last_id
        body = json.dumps(quote_fields(symbol, price, time, change_percent, sequence))
        event = QuoteEvent(
            id=number,
            symbol=symbol,
            price=price,
            received_at=received_at,
            json=body,
            sse=f"id: {self.epoch}-{number}\nevent: quote\ndata: {body}\n\n".encode(),
            ws='{"type": "quote", ' + body[1:],
        )
        held = self._events.get(symbol)
        if held is None:
            held = self._events[symbol] = deque()
            self._dropped_up_to[symbol] = 0
        if len(held) == self.per_symbol:
            self._dropped_up_to[symbol] = held.popleft().id
        held.append(event)
        return event

    @property
    def symbols(self) -> list[str]:
        """Every symbol seen, sorted."""
        return sorted(self._events)

    def of(self, symbol: str) -> list[QuoteEvent]:
        """The events held for ``symbol`` (exact, canonical spelling), oldest first."""
        return list(self._events.get(symbol, ()))

    def full_id(self, number: int) -> str:
        """The id clients see for event ``number``."""
        return f"{self.epoch}-{number}"

    def parse_id(self, text: str) -> int | None:
        """The event number of ``text`` (an id a client sent back), or None if it is
        not one of this process's ids: malformed, from another epoch (Core
        restarted), or newer than any event so far."""
        epoch, sep, number = text.strip().rpartition("-")
        if not sep or epoch != self.epoch or not number.isdigit():
            return None
        value = int(number)
        return value if value <= self.last_id else None

    def holds_after(self, after: int, symbols: Collection[str] | None) -> bool:
        """Does Core still hold every event of ``symbols`` (None: of every symbol)
        newer than ``after``?"""
        dropped = self._dropped_up_to
        if symbols is None:
            return all(up_to <= after for up_to in dropped.values())
        return all(dropped.get(symbol, 0) <= after for symbol in symbols)

    def latest(self, symbol: str, up_to: int) -> QuoteEvent | None:
        """The newest held event of ``symbol`` whose id is at most ``up_to``."""
        held = self._events.get(symbol)
        if not held or held[0].id > up_to:
            return None
        if held[-1].id <= up_to:
            return held[-1]
        # The last held event at or before ``up_to``: a bisection over ids.
        low, high = 0, len(held) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if held[middle].id <= up_to:
                low = middle
            else:
                high = middle - 1
        return held[low]

    def after(self, after: int, symbols: Iterable[str] | None) -> list[QuoteEvent]:
        """The held events of ``symbols`` (None: of every symbol) newer than
        ``after``, oldest first."""
        found: list[QuoteEvent] = []
        streams = 0
        for symbol in self._events if symbols is None else symbols:
            held = self._events.get(symbol)
            if not held or held[-1].id <= after:
                continue
            streams += 1
            # Newest first until the cursor: what is pending is usually one event.
            newer: list[QuoteEvent] = []
            for event in reversed(held):
                if event.id <= after:
                    break
                newer.append(event)
            newer.reverse()
            found.extend(newer)
        if streams > 1:
            found.sort(key=lambda event: event.id)
        return found

    def oldest_after(self, after: int, symbols: Iterable[str] | None) -> QuoteEvent | None:
        """The oldest held event of ``symbols`` (None: of every symbol) newer than
        ``after``, if any."""
        oldest: QuoteEvent | None = None
        for symbol in self._events if symbols is None else symbols:
            held = self._events.get(symbol)
            if not held or held[-1].id <= after:
                continue
            # The first held event newer than ``after``: a bisection over ids.
            low, high = 0, len(held) - 1
            while low < high:
                middle = (low + high) // 2
                if held[middle].id <= after:
                    low = middle + 1
                else:
                    high = middle
            candidate = held[low]
            if oldest is None or candidate.id < oldest.id:
                oldest = candidate
        return oldest


def _rfc3339_precise(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds: quote times are finer than a second."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
