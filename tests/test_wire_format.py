"""FT's bytes on the wire are exactly what a stock gRPC encoder produces.

FT encodes each quote once per tick and writes a subscriber's share of a tick as
one HTTP/2 DATA frame (``quotopia.ft.wire``, ``quotopia.ft.writer``), bypassing
grpclib's per-message encoding. These tests pin the result down byte for byte:

- each message is the 5-byte gRPC prefix (flag 0, big-endian length) followed by
  a payload equal to protoc's ``quotes_pb2.Quote(...).SerializeToString()`` and to
  betterproto2's ``bytes(Quote(...))`` (what FT sent before);
- read off a live FT by a raw HTTP/2 client (h2, no gRPC library in between),
  the DATA frames hold whole messages, one tick's worth each, with those exact
  bytes and the seeded walk's prices.

grpclib and grpcio clients decoding the same stream is covered in test_ft_grpc.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotopia import _proto
from quotopia.ft.config import FTConfig
from quotopia.ft.server import serve
from quotopia.ft.wire import (
    EncodedQuote,
    encode_quotes,
    join_messages,
    length_prefixed,
    new_run_id,
)
from quotopia.market import DEFAULT_SYMBOLS, Market, Quote, parse_symbols

#: Bound on every wait. Generous for a noisy 2-core machine; a pass takes far less.
DEADLINE = 20.0
SEED = 11
TICK = 0.05
SYMBOLS = ("SBER", "BTC", "ETH")
REPO = Path(__file__).resolve().parents[1]


def stock_encodings(pb2: ModuleType, quote: Quote, run_id: int) -> tuple[bytes, bytes]:
    """``quote`` encoded by protoc's classes and by betterproto2's, independently."""
    message = pb2.Quote(
        symbol=quote.symbol,
        price=quote.price,
        change_percent=quote.change_percent,
        sequence=quote.sequence,
        run_id=run_id,
    )
    message.time.FromDatetime(quote.time)
    betterproto = _proto.Quote(
        symbol=quote.symbol,
        price=quote.price,
        time=quote.time,
        change_percent=quote.change_percent,
        sequence=quote.sequence,
        run_id=run_id,
    )
    return message.SerializeToString(), bytes(betterproto)


def split_messages(data: bytes) -> list[bytes]:
    """Split gRPC length-prefixed messages; fail on a compressed flag or a short tail."""
    payloads = []
    while data:
        assert len(data) >= 5, f"a partial prefix: {data!r}"
        assert data[0] == 0, "compressed flag set"
        size = int.from_bytes(data[1:5], "big")
        assert len(data) >= 5 + size, "a message cut short"
        payloads.append(data[5 : 5 + size])
        data = data[5 + size :]
    return payloads


# --- the encoding, unit by unit ------------------------------------------------------


def test_the_prefix_is_a_zero_flag_and_a_big_endian_length() -> None:
    assert length_prefixed(b"") == b"\x00\x00\x00\x00\x00"
    assert length_prefixed(b"abc") == b"\x00\x00\x00\x00\x03abc"
    big = bytes(70_000)
    assert length_prefixed(big) == b"\x00\x00\x01\x11\x70" + big


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    steps=st.integers(min_value=0, max_value=30),
    run_id=st.integers(min_value=1, max_value=2**63 - 1),
)
def test_each_quote_is_the_stock_encoding_behind_a_grpc_prefix(
    quotes_pb2: ModuleType, seed: int, steps: int, run_id: int
) -> None:
    market = Market(parse_symbols(DEFAULT_SYMBOLS), seed)
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    tick = market.open(moment)
    for _ in range(steps):
        tick = market.step(moment)
    encoded = encode_quotes(tick, 12.5, run_id)
    assert [e.symbol for e in encoded] == [q.symbol for q in tick]
    for quote, message in zip(tick, encoded, strict=True):
        protoc, betterproto = stock_encodings(quotes_pb2, quote, run_id)
        assert protoc == betterproto
        assert message.message == length_prefixed(protoc)
        # The Kafka record's value: the same bytes, without the gRPC prefix.
        assert message.payload == protoc


def test_run_ids_are_positive_63_bit_numbers_and_differ() -> None:
    run_ids = [new_run_id() for _ in range(1000)]
    assert all(1 <= run_id < 2**63 for run_id in run_ids)
    assert len(set(run_ids)) == len(run_ids)


def test_joined_messages_keep_order_and_honour_the_filter() -> None:
    tick = (
        EncodedQuote("A", b"\x00\x00\x00\x00\x01a", 1.0, 0.0, b"a"),
        EncodedQuote("B", b"\x00\x00\x00\x00\x01b", 2.0, 0.0, b"b"),
    )
    assert join_messages(tick, None) == tick[0].message + tick[1].message
    assert join_messages(tick, frozenset({"B"})) == tick[1].message
    assert join_messages(tick, frozenset({"C"})) == b""
    assert split_messages(join_messages(tick, None)) == [b"a", b"b"]


# --- on the wire, read by a raw HTTP/2 client ----------------------------------------


@asynccontextmanager
async def running_ft(config: FTConfig) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            port: int = await tg.start(partial(serve, config))
        yield port
        tg.cancel_scope.cancel()


async def read_data_frames(port: int, request: bytes, count: int) -> list[bytes]:
    """The first ``count`` DATA frames of one StreamQuotes call, exactly as sent."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    connection.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/QuoteService/StreamQuotes"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    connection.send_data(stream_id, length_prefixed(request), end_stream=True)
    frames: list[bytes] = []
    async with await anyio.connect_tcp("127.0.0.1", port) as sock:
        await sock.send(connection.data_to_send())
        while len(frames) < count:
            events: list[Any] = connection.receive_data(await sock.receive())
            for event in events:
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    frames.append(event.data)
                    connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    raise AssertionError(f"the stream ended early: {event}")
            await sock.send(connection.data_to_send())
    return frames[:count]


def reference_quotes(steps: int) -> dict[tuple[str, int], Quote]:
    """(symbol, sequence) -> the seeded walk's quote, with FT's seed and symbols."""
    market = Market(parse_symbols(DEFAULT_SYMBOLS), SEED)
    moment = datetime.now(UTC)
    path = {(q.symbol, q.sequence): q for q in market.open(moment)}
    for _ in range(steps):
        path.update({(q.symbol, q.sequence): q for q in market.step(moment)})
    return path


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("requested", "per_tick"), [((), len(SYMBOLS)), (("btc",), 1), (("Sber", "ETH"), 2)]
)
async def test_each_tick_is_one_data_frame_of_stock_encoded_messages(
    quotes_pb2: ModuleType, requested: tuple[str, ...], per_tick: int
) -> None:
    config = FTConfig(host="127.0.0.1", port=0, metrics_port=0, tick_interval=TICK, seed=SEED)
    request = quotes_pb2.StreamQuotesRequest(symbols=list(requested)).SerializeToString()
    async with running_ft(config) as port:
        with anyio.fail_after(DEADLINE):
            frames = await read_data_frames(port, request, count=8)

    received: list[tuple[int, Any, bytes]] = []  # (frame index, decoded, payload)
    for index, frame in enumerate(frames):
        payloads = split_messages(frame)  # whole messages only, none split over frames
        # One tick per frame (two or more only if the client fell behind).
        assert payloads
        assert len(payloads) % per_tick == 0, f"frame {index}: {len(payloads)} messages"
        received += [(index, quotes_pb2.Quote.FromString(p), p) for p in payloads]

    wanted = {s.upper() for s in requested} or set(SYMBOLS)
    assert {q.symbol.upper() for _, q, _ in received} == wanted
    reference = reference_quotes(max(q.sequence for _, q, _ in received))
    for index, decoded, payload in received:
        # The walk's own values, and FT's own time: encoded, they must give the
        # payload byte for byte, by either encoder.
        expected = reference[decoded.symbol, decoded.sequence]
        moment = decoded.time.ToDatetime(tzinfo=UTC)
        protoc, betterproto = stock_encodings(
            quotes_pb2,
            Quote(
                expected.symbol,
                expected.price,
                moment,
                expected.change_percent,
                expected.sequence,
            ),
            decoded.run_id,
        )
        assert payload == protoc == betterproto, f"frame {index}: {decoded}"
    # One FT process, one run id, on every quote.
    assert len({decoded.run_id for _, decoded, _ in received}) == 1
    assert received[0][1].run_id != 0
