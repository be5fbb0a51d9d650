"""The market model: a pure, seeded random walk of prices.

Nothing here does I/O or reads a clock. The generator task in FT calls
:meth:`Market.step` once per tick and passes the time in, so the same seed always
gives the same price path, and tests can drive the walk as fast as they like.

Prices are kept as whole numbers of ticks (an instrument's minimum price step), so
rounding is exact and a price can never fall below one tick.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

__all__ = ["DEFAULT_SYMBOLS", "MAX_STEP", "Instrument", "Market", "Quote", "parse_symbols"]

#: Largest relative move of one step: every tick a price is multiplied by (1 + u),
#: with u uniform in [-MAX_STEP, +MAX_STEP].
MAX_STEP = 0.001

#: The instruments FT simulates unless told otherwise (``--symbols``).
DEFAULT_SYMBOLS = "SBER=275.50,BTC=95400.00,ETH=2650.20"


@dataclass(frozen=True, slots=True)
class Instrument:
    """A simulated instrument: its symbol, starting price and tick size."""

    symbol: str
    price: Decimal
    tick_size: Decimal = Decimal("0.01")

    @property
    def decimals(self) -> int:
        """Decimal places a price of this instrument needs (at least 2)."""
        exponent = self.tick_size.normalize().as_tuple().exponent
        assert isinstance(exponent, int)  # a finite Decimal, checked below
        return max(2, -exponent)

    def __post_init__(self) -> None:
        if not self.symbol or not self.symbol.isascii() or not self.symbol.isalnum():
            raise ValueError(f"symbol {self.symbol!r} must be non-empty ASCII letters and digits")
        if not self.tick_size.is_finite() or self.tick_size <= 0:
            raise ValueError(f"{self.symbol}: tick size must be positive, got {self.tick_size}")
        if not self.price.is_finite() or self.price < self.tick_size:
            raise ValueError(
                f"{self.symbol}: price must be at least one tick ({self.tick_size}), "
                f"got {self.price}"
            )
        # Quotes are floats: a number no float can hold would overflow or round to 0.
        if math.isinf(float(self.price)) or float(self.tick_size) == 0:
            raise ValueError(
                f"{self.symbol}: {self.price}:{self.tick_size} is out of a float's range"
            )


@dataclass(frozen=True, slots=True)
class Quote:
    """One price update of one symbol, as FT publishes it."""

    symbol: str
    price: float
    time: datetime
    change_percent: float
    sequence: int


def parse_symbols(spec: str) -> tuple[Instrument, ...]:
    """Parse ``"SBER=275.50,BTC=95400.00"`` into instruments.

    An optional tick size follows a colon: ``"SBER=275.50:0.05"``. Symbols are
    upper-cased. Raises :class:`ValueError` with a one-line message on bad input.
    """
    instruments: list[Instrument] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        item = raw.strip()
        symbol, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad symbol spec {item!r}: expected SYMBOL=PRICE[:TICK]")
        price_text, _, tick_text = value.partition(":")
        try:
            price = Decimal(price_text.strip())
            tick = Decimal(tick_text.strip()) if tick_text else Decimal("0.01")
        except ArithmeticError:
            raise ValueError(f"bad number in symbol spec {item!r}") from None
        instrument = Instrument(symbol.strip().upper(), price, tick)
        if instrument.symbol in seen:
            raise ValueError(f"symbol {instrument.symbol} is listed twice")
        seen.add(instrument.symbol)
        instruments.append(instrument)
    return tuple(instruments)


class _Walk:
    """The state of one instrument's walk, in whole ticks."""

    __slots__ = ("instrument", "sequence", "tick", "ticks")

    def __init__(self, instrument: Instrument) -> None:
        self.instrument = instrument
        # A tick size as an exact fraction turns "ticks -> price" into one correctly
        # rounded division, so 27552 ticks of 0.01 is exactly the float 275.52.
        self.tick = Fraction(instrument.tick_size)
        self.ticks = max(1, round(Fraction(instrument.price) / self.tick))
        self.sequence = 0

    def price(self, ticks: int) -> float:
        return float(ticks * self.tick)


class Market:
    """A seeded random walk over a fixed set of instruments.

    The same instruments and seed always give the same sequence of prices.
    """

    def __init__(self, instruments: tuple[Instrument, ...], seed: int | None = None) -> None:
        if not instruments:
            raise ValueError("a market needs at least one instrument")
        self._walks = [_Walk(i) for i in instruments]
        self._random = random.Random(seed)

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols in configuration order."""
        return tuple(w.instrument.symbol for w in self._walks)

    def open(self, now: datetime) -> tuple[Quote, ...]:
        """Return the opening quotes (the configured prices), stamped ``now``.

        Call it once, before the first :meth:`step`: it is sequence 1 of every symbol.
        """
        if any(w.sequence for w in self._walks):
            raise RuntimeError("the market is already open")
        for walk in self._walks:
            walk.sequence = 1
        return tuple(
            Quote(w.instrument.symbol, w.price(w.ticks), now, 0.0, w.sequence) for w in self._walks
        )

    def step(self, now: datetime) -> tuple[Quote, ...]:
        """Move every price one step and return the new quotes, stamped ``now``.

        Each price is multiplied by (1 + u), u uniform in [-0.1%, +0.1%], rounded to
        the instrument's tick and kept at one tick or more.
        """
        if not self._walks[0].sequence:
            raise RuntimeError("open the market before stepping it")
        quotes = []
        for walk in self._walks:
            u = self._random.uniform(-MAX_STEP, MAX_STEP)
            old = walk.ticks
            new = max(1, round(old * (1.0 + u)))
            walk.ticks = new
            walk.sequence += 1
            quotes.append(
                Quote(
                    symbol=walk.instrument.symbol,
                    price=walk.price(new),
                    time=now,
                    change_percent=(new - old) / old * 100.0,
                    sequence=walk.sequence,
                )
            )
        return tuple(quotes)
