"""quotopia.quote_codec against the stock encoders: protoc's classes and betterproto2.

The hand-written codec is only worth having if it is indistinguishable from them:
the same bytes out for any quote, the same fields back from any encoder's bytes
(in any field order, with fields this version does not know), and nothing but a
``DecodeError`` for bytes that are not a ``Quote``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotopia import _proto
from quotopia.quote_codec import DecodedQuote, DecodeError, decode_quote, encode_quote

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

symbols = st.text(max_size=40)
doubles = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1e-310, math.inf])
times = st.none() | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def protoc_bytes(pb2: ModuleType, fields: dict[str, object]) -> bytes:
    time = fields["time"]
    message = pb2.Quote(**{k: v for k, v in fields.items() if k != "time"})
    if isinstance(time, datetime):
        message.time.FromDatetime(time)
    return bytes(message.SerializeToString())


#: A Quote's fields, by name, as betterproto2's ``Quote(**fields)`` takes them.
quote_fields = st.fixed_dictionaries(
    {
        "symbol": symbols,
        "price": doubles,
        "time": times,
        "change_percent": doubles,
        "sequence": uint64,
        "run_id": uint64,
    }
)


@given(fields=quote_fields)
def test_encoding_is_byte_for_byte_the_stock_one(
    quotes_pb2: ModuleType, fields: dict[str, Any]
) -> None:
    ours = encode_quote(**fields)
    assert ours == bytes(_proto.Quote(**fields))
    # protoc writes -0.0 where betterproto2 (and so FT, before and now) leaves it out.
    doubles_given = (fields["price"], fields["change_percent"])
    if not any(x == 0.0 and math.copysign(1, x) < 0 for x in doubles_given):
        assert ours == protoc_bytes(quotes_pb2, fields)


@given(fields=quote_fields, unknown=st.binary(max_size=20))
def test_decoding_gives_back_what_protoc_encoded_whatever_else_is_there(
    quotes_pb2: ModuleType, fields: dict[str, Any], unknown: bytes
) -> None:
    data = protoc_bytes(quotes_pb2, fields)
    time = fields["time"]
    expected = DecodedQuote(
        fields["symbol"],
        fields["price"],
        None if time is None else micros(time),
        fields["change_percent"],
        fields["sequence"],
        fields["run_id"],
    )
    assert decode_quote(data) == expected
    # A newer FT's field 15 (length-delimited), before and after the known ones.
    extra = b"\x7a" + bytes([len(unknown)]) + unknown
    assert decode_quote(extra + data) == expected
    assert decode_quote(data + extra) == expected


def test_the_last_of_a_repeated_field_wins_and_absent_fields_are_defaults() -> None:
    first = encode_quote("AAA", 1.0, None, 0.0, 1, 1)
    second = encode_quote("BBB", 2.0, None, 0.0, 2, 0)
    assert decode_quote(first + second) == DecodedQuote("BBB", 2.0, None, 0.0, 2, 1)
    assert decode_quote(b"") == DecodedQuote("", 0.0, None, 0.0, 0, 0)


@given(st.binary(max_size=80))
def test_garbage_is_a_decode_error_or_a_quote_never_anything_else(data: bytes) -> None:
    try:
        decoded = decode_quote(data)
    except DecodeError:
        return
    assert isinstance(decoded, DecodedQuote)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05BT",  # a symbol cut short
        b"\x11\x00\x00",  # a double cut short
        b"\x28\xff\xff",  # a varint cut short
        b"\x0a\x02\xff\xfe",  # a symbol that is not UTF-8
        b"\x1a\x02\x10\x80",  # a Timestamp cut short
        b"\x00\x01",  # field number 0
        b"\x0b",  # wire type 3 (groups)
        b"\x21\x00",  # change_percent cut short
    ],
)
def test_malformed_quotes_are_named(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_quote(data)
