"""Core's recent quotes (:mod:`quotopia.core.recent`): numbering, bounds, and the
queries push connections resume from, checked against a plain list of every event."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotopia.core.recent import QuoteEvent, RecentQuotes

SYMBOLS = ("BTC", "ETH", "SBER")
WHEN = datetime(2025, 1, 11, 22, 30, 0, 123456, tzinfo=UTC)

symbol_runs = st.lists(st.sampled_from(SYMBOLS), max_size=60)
bounds = st.integers(1, 8)


def filled(symbols: list[str], per_symbol: int) -> tuple[RecentQuotes, list[QuoteEvent]]:
    recent = RecentQuotes("e1", per_symbol)
    log = [
        recent.append(symbol, 100.0 + n, WHEN, 0.01, n, received_at=float(n))
        for n, symbol in enumerate(symbols)
    ]
    return recent, log


@given(symbol_runs, bounds)
def test_ids_count_up_from_one_across_symbols(symbols: list[str], per_symbol: int) -> None:
    recent, log = filled(symbols, per_symbol)
    assert [event.id for event in log] == list(range(1, len(symbols) + 1))
    assert recent.last_id == len(symbols)


@given(symbol_runs, bounds)
def test_each_symbol_keeps_its_newest_events_up_to_the_bound(
    symbols: list[str], per_symbol: int
) -> None:
    recent, log = filled(symbols, per_symbol)
    for symbol in SYMBOLS:
        of_symbol = [event for event in log if event.symbol == symbol]
        assert recent.of(symbol) == of_symbol[-per_symbol:]


@given(symbol_runs, bounds, st.integers(0, 70), st.sets(st.sampled_from(SYMBOLS)) | st.none())
def test_after_and_holds_after_agree_with_the_whole_log(
    symbols: list[str], per_symbol: int, after: int, wanted: set[str] | None
) -> None:
    recent, log = filled(symbols, per_symbol)
    chosen = set(SYMBOLS) if wanted is None else wanted
    expected = [event for event in log if event.id > after and event.symbol in chosen]
    held = {event.id for symbol in chosen for event in recent.of(symbol)}
    complete = all(event.id in held for event in expected)
    assert recent.holds_after(after, wanted) == complete
    found = recent.after(after, wanted)
    # Oldest first, only what is held: everything newer if it is all held.
    assert found == [event for event in expected if event.id in held]
    assert recent.oldest_after(after, wanted) == (found[0] if found else None)


@given(symbol_runs, bounds, st.integers(0, 70), st.sampled_from(SYMBOLS))
def test_latest_is_the_newest_held_event_at_or_before_an_id(
    symbols: list[str], per_symbol: int, up_to: int, symbol: str
) -> None:
    recent, _ = filled(symbols, per_symbol)
    candidates = [event for event in recent.of(symbol) if event.id <= up_to]
    assert recent.latest(symbol, up_to) == (candidates[-1] if candidates else None)


def test_full_ids_round_trip_and_foreign_ones_are_refused() -> None:
    recent, _ = filled(["BTC", "ETH"], 4)
    assert recent.parse_id(recent.full_id(2)) == 2
    assert recent.parse_id(" e1-0 ") == 0
    for foreign in ("e2-1", "e1-3", "e1-", "e1-x", "1", "", "e1--1", "e1-1.5"):
        assert recent.parse_id(foreign) is None, foreign


def test_every_event_is_rendered_once_for_each_protocol() -> None:
    recent = RecentQuotes("ab12")
    event = recent.append("BTC", 95432.12, WHEN, 0.034567, 7, received_at=1.0)
    fields = {
        "symbol": "BTC",
        "price": 95432.12,
        "time": "2025-01-11T22:30:00.123Z",
        "change_percent": 0.0346,
        "sequence": 7,
    }
    assert json.loads(event.json) == fields
    assert event.sse == (b"id: ab12-1\nevent: quote\ndata: " + event.json.encode() + b"\n\n")
    assert json.loads(event.ws) == {"type": "quote", **fields}


@pytest.mark.parametrize(("epoch", "per_symbol"), [("", 5), ("a-b", 5), ("ok", 0)])
def test_bad_settings_are_refused(epoch: str, per_symbol: int) -> None:
    with pytest.raises(ValueError, match="must"):
        RecentQuotes(epoch, per_symbol)
