"""FT over real gRPC: an in-process server on an OS-assigned port, real clients.

FT runs in the test's own event loop (AnyIO, asyncio backend) through
``tg.start(serve, FTConfig(port=0, ...))``, so the port is the one FT really
bound. Clients: grpclib (what Core uses), grpcio (C-core) in a worker thread for
wire compatibility, and grpcio's reflection client in a child process (its
descriptors clash with grpclib's in one interpreter; see ``_REFLECTION_CLIENT``).

No test sleeps to let time pass: every wait is for a condition, bounded by
``fail_after`` or a gRPC deadline. Prices are checked against a reference
:class:`~quotopia.market.Market` with the same seed, so a wrong price, sequence
or change is an exact mismatch, not a tolerance question.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import anyio
import grpc
import pytest
from anyio.abc import TaskStatus
from grpclib.client import Channel
from grpclib.client import Stream as GrpcStream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from quotopia._proto import Quote, QuoteServiceStub, StreamQuotesRequest
from quotopia.ft.config import FTConfig
from quotopia.ft.server import serve
from quotopia.market import DEFAULT_SYMBOLS, Instrument, Market, parse_symbols

ClientStream = GrpcStream[StreamQuotesRequest, Quote]

pytestmark = pytest.mark.anyio

#: Bound on every wait. Generous for a noisy 2-core machine; a pass takes far less.
DEADLINE = 20.0
SEED = 7
TICK = 0.05
SYMBOLS = ("SBER", "BTC", "ETH")
METHOD = "/QuoteService/StreamQuotes"
REPO = Path(__file__).resolve().parents[1]

#: HTTP/2's smallest flow-control window (64 KiB - 1), for clients that stop reading.
SMALL_WINDOW = Configuration(
    http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1
)


# --- helpers ---------------------------------------------------------------------


def ft_config(**overrides: Any) -> FTConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "tick_interval": TICK,
        "seed": SEED,
    }
    settings.update(overrides)
    return FTConfig(**settings)


def bulky_instruments(count: int = 80, name_length: int = 1000) -> tuple[Instrument, ...]:
    """Instruments whose quotes are ~1 KB each: one snapshot overfills a 64 KiB window.

    A client that does not read then blocks FT's handler mid-snapshot, at once and
    for sure, instead of after an unknowable number of small ticks.
    """
    return parse_symbols(
        ",".join(f"S{i}{'X' * (name_length - len(str(i)) - 1)}=100" for i in range(count))
    )


@dataclass
class RunningFT:
    port: int
    stop: anyio.Event
    stopped: anyio.Event


@asynccontextmanager
async def running_ft(config: FTConfig) -> AsyncIterator[RunningFT]:
    """FT in a task group of the test's loop; ``stop`` drains it, leaving cancels it."""
    stop = anyio.Event()
    stopped = anyio.Event()

    async def run(*, task_status: TaskStatus[int]) -> None:
        await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    try:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(DEADLINE):
                port = await tg.start(run)
            yield RunningFT(port, stop, stopped)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Show the test's own failure (an AssertionError, say) rather than the task
        # group's wrapper around it, when it is the only one.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


class LogWatch(logging.Filter):
    """Keeps FT's connection and drain log lines; drops its per-tick price lines.

    Installed as a *logger* filter, so a flood of bulky tick lines never reaches
    any handler (pytest's included).
    """

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("%s: "):
            return False  # a price move
        message = record.getMessage()
        self.messages.append(message)
        # Lines that list the bulky symbols are kept here but not passed on.
        return len(message) < 500

    def saw(self, text: str) -> bool:
        return any(text in message for message in self.messages)


@contextmanager
def watch_ft_log() -> Iterator[LogWatch]:
    logger = logging.getLogger("quotopia.ft")
    watch = LogWatch()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addFilter(watch)
    try:
        yield watch
    finally:
        logger.removeFilter(watch)
        logger.setLevel(level)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds, within DEADLINE."""
    try:
        with anyio.fail_after(DEADLINE):
            while True:
                if condition():
                    return
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@asynccontextmanager
async def quote_stream(channel: Channel, *symbols: str) -> AsyncIterator[AsyncIterator[Quote]]:
    """The generated stub's stream; leaving the block closes it (cancelling the call)."""
    stub = QuoteServiceStub(channel)
    # The stub is an async generator, though annotated as a plain AsyncIterator.
    quotes = cast(
        "AsyncGenerator[Quote, None]", stub.stream_quotes(StreamQuotesRequest(list(symbols)))
    )
    async with aclosing(quotes):
        yield quotes


async def read_all(channel: Channel, *symbols: str) -> list[Quote]:
    """Every quote until the stream ends; raises GRPCError on a non-OK status."""
    async with quote_stream(channel, *symbols) as quotes:
        return [quote async for quote in quotes]


def reference_path(steps: int) -> dict[tuple[str, int], tuple[float, float]]:
    """(symbol, sequence) -> (price, change_percent), from a Market with FT's seed."""
    market = Market(parse_symbols(DEFAULT_SYMBOLS), SEED)
    now = datetime.now(UTC)
    path = {(q.symbol, q.sequence): (q.price, q.change_percent) for q in market.open(now)}
    for _ in range(steps):
        path.update({(q.symbol, q.sequence): (q.price, q.change_percent) for q in market.step(now)})
    return path


def check_against_reference(quotes: list[tuple[str, float, float, int]]) -> None:
    """Every (symbol, price, change_percent, sequence) is exactly the seeded walk's."""
    path = reference_path(max(seq for *_, seq in quotes))
    for symbol, price, change, seq in quotes:
        assert (price, change) == path[symbol, seq], f"{symbol} #{seq}"


def check_time(moment: datetime | None) -> datetime:
    assert moment is not None
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - moment) < timedelta(minutes=1)
    return moment


async def read(stream_quotes: AsyncIterator[Quote], count: int) -> list[Quote]:
    received: list[Quote] = []
    with anyio.fail_after(DEADLINE):
        async for quote in stream_quotes:
            received.append(quote)
            if len(received) == count:
                break
    return received


# --- the stream ------------------------------------------------------------------


async def test_snapshot_then_gapless_updates() -> None:
    ticks = 6
    async with (
        running_ft(ft_config()) as ft,
        Channel("127.0.0.1", ft.port) as channel,
        quote_stream(channel) as stream,
    ):
        quotes = await read(stream, len(SYMBOLS) * (1 + ticks))

    snapshot, updates = quotes[: len(SYMBOLS)], quotes[len(SYMBOLS) :]
    assert sorted(q.symbol for q in snapshot) == sorted(SYMBOLS)
    current = {q.sequence for q in snapshot}
    assert len(current) == 1, "a snapshot is one tick: every symbol at the same sequence"
    (first,) = current
    assert first >= 1

    previous = {q.symbol: q for q in snapshot}
    for quote in updates:
        before = previous[quote.symbol]
        assert quote.sequence == before.sequence + 1, (
            f"gap after {before.symbol} #{before.sequence}"
        )
        assert check_time(quote.time) >= check_time(before.time)
        expected = (quote.price - before.price) / before.price * 100.0
        assert quote.change_percent == pytest.approx(expected, rel=1e-9, abs=1e-9)
        previous[quote.symbol] = quote
    assert {q.sequence for q in previous.values()} == {first + ticks}
    check_against_reference([(q.symbol, q.price, q.change_percent, q.sequence) for q in quotes])


async def test_symbol_filter_is_case_insensitive_and_canonical() -> None:
    async with (
        running_ft(ft_config()) as ft,
        Channel("127.0.0.1", ft.port) as channel,
        quote_stream(channel, "btc") as stream,
    ):
        quotes = await read(stream, 4)
    assert [q.symbol for q in quotes] == ["BTC"] * 4
    sequences = [q.sequence for q in quotes]
    assert sequences == list(range(sequences[0], sequences[0] + 4))


async def test_unknown_symbol_is_invalid_argument_naming_it() -> None:
    async with running_ft(ft_config()) as ft, Channel("127.0.0.1", ft.port) as channel:
        with anyio.fail_after(DEADLINE), pytest.raises(GRPCError) as failure:
            await read_all(channel, "BTC", "doge")
    assert failure.value.status is Status.INVALID_ARGUMENT
    assert "'doge'" in (failure.value.message or "")


# --- health and reflection -------------------------------------------------------


async def test_health_reports_serving() -> None:
    async with running_ft(ft_config()) as ft, Channel("127.0.0.1", ft.port) as channel:
        health = HealthStub(channel)
        with anyio.fail_after(DEADLINE):
            overall = await health.Check(HealthCheckRequest(service=""))
            quotes = await health.Check(HealthCheckRequest(service="QuoteService"))
            with pytest.raises(GRPCError) as unknown:
                await health.Check(HealthCheckRequest(service="NoSuchService"))
    assert overall.status == HealthCheckResponse.SERVING
    assert quotes.status == HealthCheckResponse.SERVING
    assert unknown.value.status is Status.NOT_FOUND


#: grpcio's reflection client runs in a child interpreter: grpc_reflection and
#: grpclib each register ``grpc.reflection.v1alpha.*`` in protobuf's default pool
#: under different file names, and the second import fails ("duplicate symbol").
_REFLECTION_CLIENT = """
import json, sys
import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

with grpc.insecure_channel(sys.argv[1]) as channel:
    grpc.channel_ready_future(channel).result(timeout=float(sys.argv[2]))
    database = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(database.get_services())
    pool = DescriptorPool(database)
    service = pool.FindServiceByName("QuoteService")
    method = service.FindMethodByName("StreamQuotes")
    health = pool.FindServiceByName("grpc.health.v1.Health")
    print(json.dumps({
        "services": services,
        "methods": [m.name for m in service.methods],
        "input": method.input_type.full_name,
        "output": method.output_type.full_name,
        "server_streaming": method.server_streaming,
        "client_streaming": method.client_streaming,
        "request_fields": {
            f.name: [f.number, f.type, f.is_repeated] for f in method.input_type.fields
        },
        "fields": {f.name: [f.number, f.type] for f in method.output_type.fields},
        "time_type": method.output_type.fields_by_name["time"].message_type.full_name,
        "health_methods": sorted(m.name for m in health.methods),
    }))
"""


async def test_reflection_lists_and_describes_the_services() -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    async with running_ft(ft_config()) as ft:
        with anyio.fail_after(DEADLINE):
            result = await anyio.run_process(
                [sys.executable, "-c", _REFLECTION_CLIENT, f"127.0.0.1:{ft.port}", str(DEADLINE)],
                check=False,
            )
    assert result.returncode == 0, result.stderr.decode()
    found = json.loads(result.stdout)
    assert {"QuoteService", "grpc.health.v1.Health"} <= set(found["services"])
    assert found["methods"] == ["StreamQuotes"]
    assert (found["input"], found["output"]) == ("StreamQuotesRequest", "Quote")
    assert (found["client_streaming"], found["server_streaming"]) == (False, True)
    assert found["request_fields"] == {"symbols": [1, F.TYPE_STRING, True]}
    assert found["fields"] == {
        "symbol": [1, F.TYPE_STRING],
        "price": [2, F.TYPE_DOUBLE],
        "time": [3, F.TYPE_MESSAGE],
        "change_percent": [4, F.TYPE_DOUBLE],
        "sequence": [5, F.TYPE_UINT64],
        "run_id": [6, F.TYPE_FIXED64],
    }
    assert found["time_type"] == "google.protobuf.Timestamp"
    assert found["health_methods"] == ["Check", "Watch"]


# --- a grpcio (C-core) client ----------------------------------------------------


def read_with_grpcio(target: str, pb2: ModuleType, symbols: list[str], count: int) -> list[Any]:
    """Read ``count`` quotes with grpcio, then cancel the call and close the channel."""
    with grpc.insecure_channel(target) as channel:
        stream_quotes = channel.unary_stream(
            METHOD,
            request_serializer=pb2.StreamQuotesRequest.SerializeToString,
            response_deserializer=pb2.Quote.FromString,
        )
        call = stream_quotes(pb2.StreamQuotesRequest(symbols=symbols), timeout=DEADLINE)
        received: list[Any] = []
        try:
            for quote in call:
                received.append(quote)
                if len(received) == count:
                    break
        finally:
            call.cancel()
    return received


async def test_grpcio_client_reads_the_same_stream(quotes_pb2: ModuleType) -> None:
    ticks = 4
    async with running_ft(ft_config()) as ft:
        quotes = await anyio.to_thread.run_sync(
            read_with_grpcio, f"127.0.0.1:{ft.port}", quotes_pb2, ["eth", "Sber"], 2 * (1 + ticks)
        )
    assert sorted(q.symbol for q in quotes[:2]) == ["ETH", "SBER"]
    assert {q.symbol for q in quotes} == {"ETH", "SBER"}
    last: dict[str, int] = {}
    for quote in quotes:
        assert quote.price > 0
        assert quote.HasField("time")
        check_time(quote.time.ToDatetime(tzinfo=UTC))
        if quote.symbol in last:
            assert quote.sequence == last[quote.symbol] + 1
        last[quote.symbol] = quote.sequence
    check_against_reference([(q.symbol, q.price, q.change_percent, q.sequence) for q in quotes])


# --- shutdown: the drain ---------------------------------------------------------


async def test_drain_ends_open_streams_with_status_ok() -> None:
    async with (
        running_ft(ft_config()) as ft,
        Channel("127.0.0.1", ft.port) as channel,
        channel.request(METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote) as stream,
    ):
        await stream.send_message(StreamQuotesRequest(), end=True)
        with anyio.fail_after(DEADLINE):
            snapshot = [await stream.recv_message() for _ in SYMBOLS]
            ft.stop.set()
            rest = [quote async for quote in stream]
            await ft.stopped.wait()
        # Leaving the request block reads the trailers: a status but OK would raise.
    received = [q for q in [*snapshot, *rest] if q is not None]
    assert len(received) == len(snapshot) + len(rest)
    last: dict[str, int] = {}
    for quote in received:
        assert quote.sequence == last.get(quote.symbol, quote.sequence - 1) + 1
        last[quote.symbol] = quote.sequence


async def test_drain_waits_for_a_slow_stream_and_refuses_new_ones() -> None:
    """While a stream still has data to deliver, FT is NOT_SERVING and refuses new
    streams; once the client reads it all, the stream ends OK and serve() returns."""
    config = ft_config(instruments=bulky_instruments(), drain_timeout=DEADLINE * 2)
    async with (
        running_ft(config) as ft,
        Channel("127.0.0.1", ft.port, config=SMALL_WINDOW) as slow,
        Channel("127.0.0.1", ft.port) as other,
        slow.request(METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote) as stream,
    ):
        await stream.send_message(StreamQuotesRequest(), end=True)
        with anyio.fail_after(DEADLINE):
            # Sent with the first message: FT has subscribed us, and is now stuck on
            # a snapshot bigger than our window.
            await stream.recv_initial_metadata()
        ft.stop.set()

        health = HealthStub(other)
        with anyio.fail_after(DEADLINE):
            while True:
                reply = await health.Check(HealthCheckRequest(service="QuoteService"))
                if reply.status == HealthCheckResponse.NOT_SERVING:
                    break
                await anyio.sleep(0.01)
            with pytest.raises(GRPCError) as refused:
                await read_all(other)
        assert refused.value.status is Status.UNAVAILABLE
        assert not ft.stopped.is_set(), "the drain must wait for the open stream"

        with anyio.fail_after(DEADLINE):
            received = [quote async for quote in stream]
            await ft.stopped.wait()
        # Leaving the request block reads the trailers: a status but OK would raise.
    assert len(received) >= len(config.instruments)
    assert {q.symbol for q in received[: len(config.instruments)]} == {
        i.symbol for i in config.instruments
    }


async def assert_connection_closed(stream: ClientStream) -> None:
    """The stuck client is cut off, not left hanging on a half-open connection."""

    async def read_to_the_end() -> None:
        while await stream.recv_message() is not None:
            pass

    with anyio.fail_after(DEADLINE), pytest.raises(StreamTerminatedError, match="Connection lost"):
        await read_to_the_end()


async def test_drain_deadline_cuts_a_stuck_stream() -> None:
    config = ft_config(instruments=bulky_instruments(), drain_timeout=0.5)
    async with (
        running_ft(config) as ft,
        Channel("127.0.0.1", ft.port, config=SMALL_WINDOW) as stuck,
        stuck.request(METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote) as stream,
    ):
        await stream.send_message(StreamQuotesRequest(), end=True)
        with anyio.fail_after(DEADLINE):
            await stream.recv_initial_metadata()
            ft.stop.set()
            started = anyio.current_time()
            await ft.stopped.wait()
        took = anyio.current_time() - started
        assert config.drain_timeout <= took < config.drain_timeout + 5
        await assert_connection_closed(stream)


async def test_drain_deadline_warning_counts_the_stuck_stream() -> None:
    # Ticks keep coming during the drain; they must not unregister the stuck stream.
    config = ft_config(instruments=bulky_instruments(), drain_timeout=1.0, tick_interval=0.02)
    with watch_ft_log() as log:
        async with (
            running_ft(config) as ft,
            Channel("127.0.0.1", ft.port, config=SMALL_WINDOW) as stuck,
            stuck.request(METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote) as stream,
        ):
            await stream.send_message(StreamQuotesRequest(), end=True)
            with anyio.fail_after(DEADLINE):
                await stream.recv_initial_metadata()
                ft.stop.set()
                await ft.stopped.wait()
            await assert_connection_closed(stream)
    warnings = [m for m in log.messages if "drain deadline" in m]
    assert len(warnings) == 1
    assert "with 1 streams still open" in warnings[0]


# --- slow consumers --------------------------------------------------------------


async def test_a_client_reading_in_bursts_gets_every_tick_once_in_order() -> None:
    """Stalls long enough to fill the flow-control window, then reads on.

    FT writes a tick straight from publish() while a stream has room, and queues it
    for the handler when it has none; this client makes it switch back and forth.
    With a buffer big enough for every stall, nothing is conflated: every quote
    must arrive exactly once, in order.
    """
    config = ft_config(
        instruments=bulky_instruments(count=3, name_length=3000),
        tick_interval=0.01,
        subscriber_buffer=10_000,
        slow_consumer_timeout=DEADLINE * 2,
    )
    received: list[tuple[str, int]] = []
    async with (
        running_ft(config) as ft,
        Channel("127.0.0.1", ft.port, config=SMALL_WINDOW) as channel,
        quote_stream(channel) as quotes,
    ):
        with anyio.fail_after(DEADLINE):
            async for quote in quotes:
                received.append((quote.symbol, quote.sequence))
                if len(received) % 30 == 0:
                    await anyio.sleep(0.1)  # ten ticks of ~9 KB: more than the window
                if len(received) == 300:
                    break
    last: dict[str, int] = {}
    for symbol, sequence in received:
        if symbol in last:
            assert sequence == last[symbol] + 1, f"{symbol}: #{last[symbol]} then #{sequence}"
        last[symbol] = sequence
    assert len(last) == len(config.instruments)


def _status_after_drop_with_grpcio(
    target: str, pb2: ModuleType, dropped: threading.Event
) -> grpc.StatusCode:
    # No BDP probing: the window stays at its initial 64 KiB, which FT's first
    # (bulky) snapshot overfills.
    options = [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        stream_quotes = channel.unary_stream(
            METHOD,
            request_serializer=pb2.StreamQuotesRequest.SerializeToString,
            response_deserializer=pb2.Quote.FromString,
        )
        call = stream_quotes(pb2.StreamQuotesRequest(), timeout=DEADLINE * 2)
        try:
            if not dropped.wait(DEADLINE):
                raise AssertionError("FT never dropped the client that does not read")
            with pytest.raises(grpc.RpcError) as failure:
                for _ in call:
                    pass
        finally:
            call.cancel()
    error: Any = failure.value
    code: grpc.StatusCode = error.code()
    return code


async def test_client_that_stops_reading_is_dropped_with_resource_exhausted(
    quotes_pb2: ModuleType,
) -> None:
    config = ft_config(
        instruments=bulky_instruments(),
        subscriber_buffer=1,
        slow_consumer_timeout=0.2,
        tick_interval=0.02,
    )
    dropped = threading.Event()
    with watch_ft_log() as log:
        async with running_ft(config) as ft, anyio.create_task_group() as tg:

            async def watch() -> None:
                await wait_for(lambda: log.saw("(slow consumer)"), "a slow-consumer drop")
                dropped.set()

            tg.start_soon(watch)
            code = await anyio.to_thread.run_sync(
                _status_after_drop_with_grpcio,
                f"127.0.0.1:{ft.port}",
                quotes_pb2,
                dropped,
            )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_slow_consumer_drop_never_truncates_a_message() -> None:
    config = ft_config(
        instruments=bulky_instruments(),
        subscriber_buffer=1,
        slow_consumer_timeout=0.2,
        tick_interval=0.02,
    )
    symbols = {i.symbol for i in config.instruments}

    async def read_after_the_drop(channel: Channel, log: LogWatch) -> None:
        async with channel.request(
            METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote
        ) as stream:
            await stream.send_message(StreamQuotesRequest(), end=True)
            await wait_for(lambda: log.saw("(slow consumer)"), "a slow-consumer drop")
            with anyio.fail_after(DEADLINE):
                async for quote in stream:
                    assert quote.symbol in symbols

    with watch_ft_log() as log:
        async with (
            running_ft(config) as ft,
            Channel("127.0.0.1", ft.port, config=SMALL_WINDOW) as channel,
        ):
            # Whole quotes, then the drop: RESOURCE_EXHAUSTED in the trailers, or a
            # stream reset. Never half a message (which grpclib reports as an
            # AssertionError, "Received less data than expected").
            with pytest.raises((GRPCError, StreamTerminatedError)) as ended:
                await read_after_the_drop(channel, log)
    if isinstance(ended.value, GRPCError):
        assert ended.value.status is Status.RESOURCE_EXHAUSTED


async def test_one_stalled_subscriber_does_not_delay_fifty_healthy_ones() -> None:
    """1 client that stops reading, 50 that read: the 50 get every tick, on time.

    The stalled client reads nothing, so FT's handler for it blocks on HTTP/2 flow
    control once its window is full (bulky quotes make that a matter of a few
    ticks); its buffer fills, its quotes are conflated, and after the slow-consumer
    timeout it is disconnected. Throughout, the healthy ones see no gap in any
    symbol's sequence and no quote older than LATE when it arrives.
    """
    late = timedelta(seconds=2)  # generous on a noisy machine; typically milliseconds
    config = ft_config(
        instruments=bulky_instruments(count=3, name_length=3000),
        tick_interval=0.1,
        subscriber_buffer=2,
        slow_consumer_timeout=0.5,
    )
    healthy = 50
    channels_used = 5
    received: list[list[tuple[str, int]]] = [[] for _ in range(healthy)]
    too_late: list[timedelta] = []
    dropped = anyio.Event()

    async def read_healthy(channel: Channel, index: int) -> None:
        async with quote_stream(channel) as quotes:
            async for quote in quotes:
                arrived = datetime.now(UTC)
                if arrived - check_time(quote.time) > late:
                    too_late.append(arrived - check_time(quote.time))
                received[index].append((quote.symbol, quote.sequence))
                if dropped.is_set():
                    return

    async def stall(channel: Channel) -> None:
        """Ask for quotes, never read them; expect the reset FT gives a slow consumer."""

        async def open_and_wait() -> None:
            async with channel.request(
                METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote
            ) as stream:
                await stream.send_message(StreamQuotesRequest(), end=True)
                await dropped.wait()
                while await stream.recv_message() is not None:
                    pass

        # Cut mid-message, the stream is reset with ENHANCE_YOUR_CALM, which gRPC
        # clients report as RESOURCE_EXHAUSTED.
        with pytest.raises(StreamTerminatedError, match="error_code: 11"):
            await open_and_wait()

    with watch_ft_log() as log:
        async with running_ft(config) as ft:
            channels = [Channel("127.0.0.1", ft.port) for _ in range(channels_used)]
            stalled_channel = Channel("127.0.0.1", ft.port, config=SMALL_WINDOW)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stall, stalled_channel)
                    for index in range(healthy):
                        tg.start_soon(read_healthy, channels[index % channels_used], index)
                    await wait_for(lambda: log.saw("(slow consumer)"), "the stalled client's drop")
                    dropped.set()  # each reader stops at its next quote
            finally:
                for channel in (*channels, stalled_channel):
                    channel.close()
            ft.stop.set()
            with anyio.fail_after(DEADLINE):
                await ft.stopped.wait()
        (summary,) = [m for m in log.messages if m.startswith("FT stopped")]
    # Stalled first (conflated), then dropped: both are counted.
    counts = re.fullmatch(
        r"FT stopped \((\d+) slow consumers disconnected, (\d+) quotes conflated\)", summary
    )
    assert counts is not None, summary
    assert int(counts[1]) == 1
    assert int(counts[2]) > 0

    assert not too_late, f"{len(too_late)} quotes late, worst {max(too_late)}"
    for index, quotes in enumerate(received):
        last: dict[str, int] = {}
        for symbol, sequence in quotes:
            if symbol in last:
                assert sequence == last[symbol] + 1, f"reader {index}: {symbol} gap"
            last[symbol] = sequence
        assert len(last) == len(config.instruments), f"reader {index} missed a symbol"
