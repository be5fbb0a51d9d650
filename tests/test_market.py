"""The market model: properties of the seeded random walk, and symbol-spec parsing.

The walk is pure, so every property drives it directly with an injected ``now``;
nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from quotopia.market import (
    DEFAULT_SYMBOLS,
    MAX_STEP,
    Instrument,
    Market,
    Quote,
    parse_symbols,
)

T0 = datetime(2025, 1, 11, 22, 30, tzinfo=UTC)

seeds = st.integers(min_value=0, max_value=2**64)
step_counts = st.integers(min_value=1, max_value=150)
symbols = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=6)


@st.composite
def tick_sizes(draw: st.DrawFn) -> Decimal:
    """Tick sizes from 1e-6 to 100, e.g. 0.01, 0.05, 0.25, 1, 5E-7."""
    return Decimal(draw(st.integers(1, 100))).scaleb(-draw(st.integers(0, 6)))


@st.composite
def instruments(draw: st.DrawFn, *, min_ticks: int = 1, symbol: str | None = None) -> Instrument:
    """An instrument whose start price is at least ``min_ticks`` ticks, not always a whole tick."""
    tick = draw(tick_sizes())
    whole = draw(st.integers(min_ticks, 10**9))
    # Hundredths of a tick on top, so a start price between two ticks is covered too.
    extra = Decimal(draw(st.integers(0, 99))) / 100
    return Instrument(symbol or draw(symbols).upper(), tick * (whole + extra), tick)


@st.composite
def instrument_sets(draw: st.DrawFn, *, min_ticks: int = 1) -> tuple[Instrument, ...]:
    names = draw(st.lists(symbols, min_size=1, max_size=5, unique_by=str.upper))
    return tuple(draw(instruments(min_ticks=min_ticks, symbol=name.upper())) for name in names)


def walk(market: Market, steps: int) -> Iterator[tuple[Quote, ...]]:
    """Open ``market`` and step it ``steps`` times, a second apart."""
    yield market.open(T0)
    for i in range(1, steps + 1):
        yield market.step(T0 + timedelta(seconds=i))


def whole_ticks(price: float, tick: Decimal) -> int:
    """The number of ticks ``price`` is, checking it is exactly a whole number of them."""
    exact_tick = Fraction(tick)
    ticks = round(Fraction(price) / exact_tick)
    # Prices are whole ticks, correctly rounded to the nearest float.
    assert float(ticks * exact_tick) == price, f"{price} is not a whole number of {tick} ticks"
    assert math.isclose(price / float(tick), ticks, rel_tol=1e-9)
    return ticks


# --- properties of the walk -------------------------------------------------------


@given(instrument_sets(), seeds, step_counts)
def test_each_step_moves_at_most_max_step_plus_half_a_tick(
    universe: tuple[Instrument, ...], seed: int, steps: int
) -> None:
    ticks = {i.symbol: i.tick_size for i in universe}
    market = Market(universe, seed)
    previous = {q.symbol: q.price for q in market.open(T0)}
    for i in range(1, steps + 1):
        for quote in market.step(T0 + timedelta(seconds=i)):
            old, new = previous[quote.symbol], quote.price
            tick = ticks[quote.symbol]
            # In whole ticks the bound is exact: |new - old| <= old * MAX_STEP + 1/2,
            # up to the float rounding of old * (1 + u) inside the walk.
            old_ticks, new_ticks = whole_ticks(old, tick), whole_ticks(new, tick)
            assert abs(new_ticks - old_ticks) <= old_ticks * MAX_STEP + 0.5 + old_ticks * 1e-12
            # The same bound in prices, with a float tolerance.
            assert abs(new - old) <= old * MAX_STEP + float(tick) / 2 + old * 1e-12
            previous[quote.symbol] = new


@given(instrument_sets(), seeds, step_counts)
def test_prices_stay_positive_whole_ticks(
    universe: tuple[Instrument, ...], seed: int, steps: int
) -> None:
    ticks = {i.symbol: i.tick_size for i in universe}
    for quotes in walk(Market(universe, seed), steps):
        for quote in quotes:
            tick = ticks[quote.symbol]
            assert whole_ticks(quote.price, tick) >= 1
            assert quote.price >= float(tick) > 0


@given(instrument_sets())
def test_open_quotes_are_the_configured_prices_rounded_to_a_tick(
    universe: tuple[Instrument, ...],
) -> None:
    quotes = Market(universe, 0).open(T0)
    assert tuple(q.symbol for q in quotes) == tuple(i.symbol for i in universe)
    for instrument, quote in zip(universe, quotes, strict=True):
        assert quote.time == T0
        assert quote.sequence == 1
        assert quote.change_percent == 0.0
        assert whole_ticks(quote.price, instrument.tick_size) >= 1
        error = abs(Fraction(quote.price) - Fraction(instrument.price))
        # Half a tick of rounding, plus the float's own rounding of the price.
        float_rounding = Fraction(quote.price) * Fraction(1, 2**52)
        assert error <= Fraction(instrument.tick_size) / 2 + float_rounding


@given(instrument_sets(), seeds, step_counts)
def test_same_seed_same_path(universe: tuple[Instrument, ...], seed: int, steps: int) -> None:
    first = list(walk(Market(universe, seed), steps))
    second = list(walk(Market(universe, seed), steps))
    assert first == second


@given(instrument_sets(min_ticks=10_000), seeds, seeds)
def test_different_seeds_different_paths(
    universe: tuple[Instrument, ...], seed: int, other_seed: int
) -> None:
    assume(seed != other_seed)
    # At 10,000 ticks or more a step can move a price by 10 ticks or more, so
    # 50 steps of two independent walks coincide with negligible probability.
    first = [[q.price for q in quotes] for quotes in walk(Market(universe, seed), 50)]
    second = [[q.price for q in quotes] for quotes in walk(Market(universe, other_seed), 50)]
    assert first != second


@given(instrument_sets(), seeds, step_counts)
def test_sequence_numbers_count_updates_per_symbol(
    universe: tuple[Instrument, ...], seed: int, steps: int
) -> None:
    market = Market(universe, seed)
    assert market.symbols == tuple(i.symbol for i in universe)
    for expected, quotes in enumerate(walk(market, steps), start=1):
        assert tuple(q.symbol for q in quotes) == market.symbols
        assert all(q.sequence == expected for q in quotes)


@given(instrument_sets(), seeds, step_counts)
def test_change_percent_matches_prices_and_time_is_now(
    universe: tuple[Instrument, ...], seed: int, steps: int
) -> None:
    market = Market(universe, seed)
    previous = {q.symbol: q.price for q in market.open(T0)}
    for i in range(1, steps + 1):
        now = T0 + timedelta(seconds=i)
        for quote in market.step(now):
            old = previous[quote.symbol]
            assert quote.time == now
            assert math.isclose(
                quote.change_percent, (quote.price - old) / old * 100.0, rel_tol=1e-9, abs_tol=1e-9
            )
            previous[quote.symbol] = quote.price


@given(st.lists(instruments(), min_size=1, max_size=5, unique_by=lambda i: i.symbol))
def test_parse_symbols_round_trips_a_spec(universe: list[Instrument]) -> None:
    spec = ",".join(f" {i.symbol.lower()} = {i.price} : {i.tick_size} " for i in universe)
    assert parse_symbols(spec) == tuple(universe)


# --- examples: parse_symbols, Instrument, Market misuse ------------------------------


def test_parse_symbols_good_spec() -> None:
    assert parse_symbols("SBER=275.50,BTC=95400.00,eth=2650.20") == (
        Instrument("SBER", Decimal("275.50"), Decimal("0.01")),
        Instrument("BTC", Decimal("95400.00"), Decimal("0.01")),
        Instrument("ETH", Decimal("2650.20"), Decimal("0.01")),
    )


def test_parse_symbols_default_symbols() -> None:
    assert tuple(i.symbol for i in parse_symbols(DEFAULT_SYMBOLS)) == ("SBER", "BTC", "ETH")


def test_parse_symbols_tick_suffix() -> None:
    (sber,) = parse_symbols("SBER=275.50:0.05")
    assert sber == Instrument("SBER", Decimal("275.50"), Decimal("0.05"))
    quotes = Market((sber,), seed=1).open(T0)
    assert quotes[0].price == 275.50


@pytest.mark.parametrize("spec", ["SBER=1,SBER=2", "SBER=1,BTC=2,sber=3", "btc=1, BTC = 2:0.5"])
def test_parse_symbols_rejects_duplicates(spec: str) -> None:
    with pytest.raises(ValueError, match=r"^symbol (SBER|BTC) is listed twice$"):
        parse_symbols(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", r"^bad symbol spec '': expected SYMBOL=PRICE\[:TICK\]$"),
        ("SBER", r"^bad symbol spec 'SBER': expected SYMBOL=PRICE\[:TICK\]$"),
        ("SBER=1,", r"^bad symbol spec '': expected"),
        ("SBER=1,,BTC=2", r"^bad symbol spec '': expected"),
        ("SBER:0.05", r"^bad symbol spec 'SBER:0.05': expected"),
        ("SBER=", r"^bad number in symbol spec 'SBER='$"),
        ("SBER=abc", r"^bad number in symbol spec 'SBER=abc'$"),
        ("SBER=1:x", r"^bad number in symbol spec 'SBER=1:x'$"),
        ("SBER=1:2:3", r"^bad number in symbol spec 'SBER=1:2:3'$"),
        ("SBER=0", r"^SBER: price must be at least one tick \(0.01\), got 0$"),
        ("SBER=-1", r"^SBER: price must be at least one tick \(0.01\), got -1$"),
        ("SBER=0.001", r"^SBER: price must be at least one tick \(0.01\), got 0.001$"),
        ("SBER=NaN", r"^SBER: price must be at least one tick \(0.01\), got NaN$"),
        ("SBER=Infinity", r"^SBER: price must be at least one tick \(0.01\), got Infinity$"),
        ("SBER=1:0", r"^SBER: tick size must be positive, got 0$"),
        ("SBER=1:-0.01", r"^SBER: tick size must be positive, got -0.01$"),
        ("SBER=1:NaN", r"^SBER: tick size must be positive, got NaN$"),
        ("SBER=1:0.5,BTC=0.1:0.5", r"^BTC: price must be at least one tick \(0.5\), got 0.1$"),
        ("=1", r"^symbol '' must be non-empty ASCII letters and digits$"),
        ("SB-ER=1", r"^symbol 'SB-ER' must be non-empty ASCII letters and digits$"),
        ("SB ER=1", r"^symbol 'SB ER' must be non-empty ASCII letters and digits$"),
        ("ΣBER=1", r"^symbol 'ΣBER' must be non-empty ASCII letters and digits$"),
    ],
)
def test_parse_symbols_rejects_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        parse_symbols(spec)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("spec", ["SBER=1e400", "SBER=1e-390:1e-400"])
def test_parse_symbols_rejects_numbers_beyond_float_range(spec: str) -> None:
    with pytest.raises(ValueError, match="SBER"):
        parse_symbols(spec)


@pytest.mark.parametrize(
    ("symbol", "price", "tick"),
    [
        ("", "1", "0.01"),
        ("A.B", "1", "0.01"),
        ("ÄB", "1", "0.01"),
        ("A", "0.009", "0.01"),
        ("A", "1", "0"),
        ("A", "1", "-1"),
        ("A", "1", "Infinity"),
        ("A", "sNaN", "0.01"),
        ("A", "1", "sNaN"),
    ],
)
def test_instrument_validation(symbol: str, price: str, tick: str) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        Instrument(symbol, Decimal(price), Decimal(tick))


@pytest.mark.parametrize(
    ("tick", "decimals"),
    [("0.01", 2), ("0.05", 2), ("0.5", 2), ("1", 2), ("10", 2), ("0.0001", 4), ("0.050", 2)],
)
def test_instrument_decimals(tick: str, decimals: int) -> None:
    assert Instrument("A", Decimal(100), Decimal(tick)).decimals == decimals


def test_instrument_default_tick_is_a_cent() -> None:
    assert Instrument("A", Decimal(1)).tick_size == Decimal("0.01")


def test_market_needs_an_instrument() -> None:
    with pytest.raises(ValueError, match="at least one instrument"):
        Market(())


def test_open_twice_raises() -> None:
    market = Market(parse_symbols(DEFAULT_SYMBOLS), seed=1)
    market.open(T0)
    with pytest.raises(RuntimeError, match="already open"):
        market.open(T0)
    market.step(T0)
    with pytest.raises(RuntimeError, match="already open"):
        market.open(T0)


def test_step_before_open_raises() -> None:
    market = Market(parse_symbols(DEFAULT_SYMBOLS), seed=1)
    with pytest.raises(RuntimeError, match="open the market"):
        market.step(T0)
    # A refused step changes nothing: the market still opens at sequence 1.
    assert all(q.sequence == 1 for q in market.open(T0))
