"""The history API's query parameters, checked and converted. Pure: no I/O.

Core's routes turn a :class:`ParameterError` into a 400 answer that names the
parameter; everything here is testable without a server.

Times (``from``, ``to``) are RFC 3339 with a UTC offset (``2026-12-02T18:00:00Z``,
``2026-12-02T21:00:00+03:00``), or Unix seconds (``1764698400``,
``1764698400.25``). ``from`` is inclusive, ``to`` exclusive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from quotopia.history.cursor import Cursor, CursorError, Order

__all__ = [
    "DEFAULT_LIMIT",
    "INTERVALS",
    "MAX_CANDLES",
    "MAX_LIMIT",
    "CandleQuery",
    "HistoryQuery",
    "ParameterError",
    "candle_query",
    "history_query",
    "parse_time",
]

#: Quotes per history page unless ``limit`` says otherwise, and the most it may say.
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000

#: Candle intervals and their widths in microseconds. Buckets are aligned to
#: whole multiples of the width since the Unix epoch: minutes start at :00
#: seconds, days at 00:00 UTC.
INTERVALS: Final = {
    "1s": 1_000_000,
    "1m": 60_000_000,
    "5m": 300_000_000,
    "1h": 3_600_000_000,
    "1d": 86_400_000_000,
}

#: The most candles one request may span: ``to - from`` is at most this many intervals.
MAX_CANDLES: Final = 1000

#: Candles unless ``from`` says otherwise: the last this many intervals before ``to``.
DEFAULT_CANDLES: Final = 60

_UNIX_SECONDS = re.compile(r"\d{1,12}(\.\d{1,6})?")
#: The latest time a microsecond count in a signed 64-bit integer can hold, and more.
_LATEST_US: Final = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z


class ParameterError(ValueError):
    """A query parameter the API cannot take. ``parameter`` names it."""

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(f"{parameter}: {detail}")
        self.parameter = parameter
        self.detail = detail


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    symbol: str
    from_us: int | None
    to_us: int | None
    limit: int
    order: Order
    after: Cursor | None


@dataclass(frozen=True, slots=True)
class CandleQuery:
    symbol: str
    interval: str
    width_us: int
    #: Aligned to whole intervals: ``from`` rounded down, ``to`` rounded up.
    from_us: int
    to_us: int


def to_us(moment: datetime) -> int:
    """``moment`` (timezone-aware) as whole microseconds since the Unix epoch."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_time(parameter: str, text: str) -> int:
    """A ``from``/``to`` value as microseconds since the epoch (see the module docstring)."""
    text = text.strip()
    if _UNIX_SECONDS.fullmatch(text):
        whole, _, fraction = text.partition(".")
        return int(whole) * 1_000_000 + int(fraction.ljust(6, "0") or 0)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ParameterError(
            parameter,
            f"cannot read {text!r} as a time: use RFC 3339 (2026-12-02T18:00:00Z) or Unix seconds",
        ) from None
    if moment.tzinfo is None:
        raise ParameterError(
            parameter, f"{text!r} has no UTC offset: add Z or +HH:MM (2026-12-02T18:00:00Z)"
        )
    us = to_us(moment)
    if not 0 <= us <= _LATEST_US:
        raise ParameterError(parameter, f"{text!r} is out of range (1970 to 9999)")
    return us


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not text.strip().isdigit():
        raise ParameterError("limit", f"must be a whole number from 1 to {MAX_LIMIT}, got {text!r}")
    limit = int(text)
    if not 1 <= limit <= MAX_LIMIT:
        raise ParameterError("limit", f"must be from 1 to {MAX_LIMIT}, got {limit}")
    return limit


def _parse_order(text: str | None) -> Order:
    if text is None or text == "desc":
        return "desc"
    if text == "asc":
        return "asc"
    raise ParameterError(
        "order", f"must be asc (oldest first) or desc (newest first), got {text!r}"
    )


def _window(args: dict[str, str]) -> tuple[int | None, int | None]:
    from_us = parse_time("from", args["from"]) if "from" in args else None
    to_us_ = parse_time("to", args["to"]) if "to" in args else None
    if from_us is not None and to_us_ is not None and from_us > to_us_:
        raise ParameterError("from", "is after to")
    return from_us, to_us_


def history_query(symbol: str, args: dict[str, str]) -> HistoryQuery:
    """The checked parameters of ``GET /quotes/{symbol}/history``.

    ``symbol`` is already canonical. Raises :class:`ParameterError`.
    """
    from_us, to_us_ = _window(args)
    limit = _parse_limit(args.get("limit"))
    order = _parse_order(args.get("order"))
    after = None
    if "cursor" in args:
        try:
            after = Cursor.decode(args["cursor"], symbol=symbol, order=order)
        except CursorError as exc:
            raise ParameterError("cursor", str(exc)) from None
    return HistoryQuery(symbol, from_us, to_us_, limit, order, after)


def candle_query(symbol: str, args: dict[str, str], now_us: int) -> CandleQuery:
    """The checked parameters of ``GET /quotes/{symbol}/candles``.

    ``interval`` is required; ``to`` defaults to ``now_us``, ``from`` to the
    start of the :data:`DEFAULT_CANDLES` intervals that end with ``to``'s.
    Raises :class:`ParameterError`.
    """
    interval = args.get("interval")
    if interval is None:
        raise ParameterError("interval", f"is required: one of {', '.join(INTERVALS)}")
    if interval not in INTERVALS:
        raise ParameterError(
            "interval", f"unknown interval {interval!r}: use one of {', '.join(INTERVALS)}"
        )
    width = INTERVALS[interval]
    from_us, to_us_ = _window(args)
    if to_us_ is None:
        to_us_ = max(now_us, from_us or 0)
    end = -(-to_us_ // width) * width  # rounded up, in integers
    start = max(0, end - DEFAULT_CANDLES * width) if from_us is None else from_us - from_us % width
    end = max(end, start + width)  # from == to: the one bucket that holds them
    if end > _LATEST_US:
        raise ParameterError("to", "is out of range: the last candle would end after 9999")
    if (end - start) // width > MAX_CANDLES:
        raise ParameterError(
            "from",
            f"from..to spans {(end - start) // width} {interval} candles; at most {MAX_CANDLES} "
            "per request: narrow the range or take a longer interval",
        )
    return CandleQuery(symbol, interval, width, start, end)
