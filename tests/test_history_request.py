"""The history API's parameters and cursors, without a database (pure code)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotopia.history.cursor import Cursor, CursorError
from quotopia.history.request import (
    DEFAULT_LIMIT,
    INTERVALS,
    MAX_CANDLES,
    MAX_LIMIT,
    ParameterError,
    candle_query,
    history_query,
    parse_time,
)

NOW = 1_764_698_400_000_000  # 2025-12-02T18:00:00Z


@given(
    symbol=st.sampled_from(["BTC", "ETH", "X1"]),
    order=st.sampled_from(["asc", "desc"]),
    key=st.tuples(*[st.integers(0, 2**63 - 1)] * 3),
)
def test_a_cursor_decodes_to_what_was_encoded(
    symbol: str, order: str, key: tuple[int, ...]
) -> None:
    cursor = Cursor(symbol, order, *key)  # type: ignore[arg-type]
    text = cursor.encode()
    assert text.isascii()
    assert not set(text) & set("=/+")  # URL-safe as it is
    assert Cursor.decode(text, symbol=symbol, order=order) == cursor  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "!!!",
        "bm90IGEgY3Vyc29y",  # "not a cursor"
        base64.urlsafe_b64encode(b"h2|BTC|asc|1|2|3").decode(),
        base64.urlsafe_b64encode(b"h1|BTC|asc|1|2").decode(),
        base64.urlsafe_b64encode(b"h1|BTC|asc|-1|2|3").decode(),
        base64.urlsafe_b64encode(b"h1|BTC|up|1|2|3").decode(),
        base64.urlsafe_b64encode(b"h1|BTC|asc|99999999999999999999|2|3").decode(),
        # An Arabic-Indic digit one: str.isdigit() says yes, int() agrees; refused.
        base64.urlsafe_b64encode("h1|BTC|asc|\u0661|2|3".encode()).decode(),
    ],
)
def test_malformed_cursors_are_refused(text: str) -> None:
    with pytest.raises(CursorError, match="malformed"):
        Cursor.decode(text, symbol="BTC", order="asc")


def test_a_cursor_from_other_pages_is_foreign() -> None:
    text = Cursor("ETH", "asc", 1, 2, 3).encode()
    with pytest.raises(CursorError, match="belongs to the asc pages of ETH"):
        Cursor.decode(text, symbol="BTC", order="asc")
    with pytest.raises(CursorError, match="not to the desc pages"):
        Cursor.decode(text, symbol="ETH", order="desc")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764698400", NOW),
        ("1764698400.25", NOW + 250_000),
        ("2025-12-02T18:00:00Z", NOW),
        ("2025-12-02T21:00:00.5+03:00", NOW + 500_000),
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_times_are_rfc3339_or_unix_seconds(text: str, expected: int) -> None:
    assert parse_time("from", text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("yesterday", "cannot read"),
        ("2025-12-02T18:00:00", "no UTC offset"),
        ("1969-12-31T23:59:59Z", "out of range"),
        ("-5", "cannot read"),
        ("1e9", "cannot read"),
    ],
)
def test_bad_times_name_the_parameter(text: str, says: str) -> None:
    with pytest.raises(ParameterError, match=says) as caught:
        parse_time("to", text)
    assert caught.value.parameter == "to"


def test_history_defaults_and_bounds() -> None:
    query = history_query("BTC", {})
    assert (query.limit, query.order, query.from_us, query.to_us, query.after) == (
        DEFAULT_LIMIT,
        "desc",
        None,
        None,
        None,
    )
    assert history_query("BTC", {"limit": str(MAX_LIMIT)}).limit == MAX_LIMIT


@pytest.mark.parametrize(
    ("args", "parameter"),
    [
        ({"limit": str(MAX_LIMIT + 1)}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"from": "1764698401", "to": "1764698400"}, "from"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": Cursor("ETH", "desc", 1, 1, 1).encode()}, "cursor"),
    ],
)
def test_bad_history_parameters_are_named(args: dict[str, str], parameter: str) -> None:
    with pytest.raises(ParameterError) as caught:
        history_query("BTC", args)
    assert caught.value.parameter == parameter


@given(
    interval=st.sampled_from(list(INTERVALS)),
    start=st.integers(0, 10**12),
    span=st.integers(0, 10**9),
)
def test_candle_windows_are_whole_intervals_around_the_request(
    interval: str, start: int, span: int
) -> None:
    width = INTERVALS[interval]
    args = {
        "interval": interval,
        "from": f"{start / 1000:.3f}",
        "to": f"{(start + span) / 1000:.3f}",
    }
    from_us, to_us = start * 1000, (start + span) * 1000
    aligned_from = from_us - from_us % width
    aligned_to = max(-(-to_us // width) * width, aligned_from + width)
    if (aligned_to - aligned_from) // width > MAX_CANDLES:
        with pytest.raises(ParameterError, match="at most") as caught:
            candle_query("BTC", args, NOW)
        assert caught.value.parameter == "from"
        return
    query = candle_query("BTC", args, NOW)
    assert (query.from_us, query.to_us) == (aligned_from, aligned_to)
    assert query.from_us <= from_us < query.from_us + width
    assert to_us <= query.to_us
    assert 1 <= (query.to_us - query.from_us) // width <= MAX_CANDLES


def test_candles_default_to_the_last_sixty_intervals() -> None:
    query = candle_query("BTC", {"interval": "1m"}, NOW + 1)
    assert query.to_us == NOW + 60_000_000
    assert query.from_us == NOW - 59 * 60_000_000


@pytest.mark.parametrize(
    ("args", "parameter"),
    [
        ({}, "interval"),
        ({"interval": "2m"}, "interval"),
        ({"interval": "1s", "from": "0"}, "from"),  # far more than 1,000 candles
        ({"interval": "1m", "from": "x"}, "from"),
        ({"interval": "1m", "from": "10", "to": "5"}, "from"),
    ],
)
def test_bad_candle_parameters_are_named(args: dict[str, str], parameter: str) -> None:
    with pytest.raises(ParameterError) as caught:
        candle_query("BTC", args, NOW)
    assert caught.value.parameter == parameter
