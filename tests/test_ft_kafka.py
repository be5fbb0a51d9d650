"""FT's Kafka publisher against a real broker (Tansu), FT in-process.

What must hold: every quote reaches the topic, keyed by symbol, with the very
bytes of the gRPC message; the topic is created when missing and left alone when
present; a broker that is away, frozen or refusing never holds up ticks or gRPC
subscribers; its buffer is bounded, drops the oldest, and accounts for every
quote; a drain sends what is buffered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import pytest
from _kafka import TansuBroker, tansu_broker
from _services import DEADLINE, scrape
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from anyio.abc import TaskStatus
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec

from quotopia._proto import StreamQuotesRequest
from quotopia.contract import STREAM_QUOTES
from quotopia.ft.config import FTConfig
from quotopia.ft.server import serve
from quotopia.quote_codec import DecodedQuote, decode_quote

pytestmark = pytest.mark.anyio

TICK = 0.05
TOPIC = "quotes"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # FT runs on asyncio (grpclib, aiokafka)


@pytest.fixture
def broker() -> Iterator[TansuBroker]:
    with tansu_broker() as running:
        yield running


def ft_config(bootstrap: str, **overrides: Any) -> FTConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "tick_interval": TICK,
        "seed": 7,
        "kafka": bootstrap,
        # Tansu 0.6 refuses aiokafka's idempotent producer (see test_kafka_harness).
        "kafka_idempotence": False,
    }
    settings.update(overrides)
    return FTConfig(**settings)


@dataclass
class RunningFT:
    port: int
    metrics_port: int
    stop: anyio.Event

    async def metrics(self) -> dict[str, float]:
        """FT's /metrics, by sample name (labels left out: summed)."""
        samples = await anyio.to_thread.run_sync(scrape, self.metrics_port)
        totals: dict[str, float] = {}
        for (name, _labels), value in samples.items():
            totals[name] = totals.get(name, 0.0) + value
        return totals


@asynccontextmanager
async def running_ft(config: FTConfig) -> AsyncIterator[RunningFT]:
    """FT in the test's task group; ``stop`` drains it (the block then waits for
    the drain), leaving without it cancels FT."""
    stop = anyio.Event()
    stopped = anyio.Event()

    async def run(*, task_status: TaskStatus[int]) -> None:
        await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    async with anyio.create_task_group() as tg:
        with ft_log() as log, anyio.fail_after(DEADLINE):
            port = await tg.start(run)
        (metrics_port,) = [
            getattr(r, "port", 0) for r in log if r.getMessage().startswith("FT metrics on")
        ]
        yield RunningFT(port, metrics_port, stop)
        if stop.is_set():
            with anyio.fail_after(DEADLINE):
                await stopped.wait()
        tg.cancel_scope.cancel()


async def wait_for_metric(ft: RunningFT, name: str, at_least: float) -> None:
    try:
        with anyio.fail_after(DEADLINE):
            while True:
                if (await ft.metrics()).get(name, 0.0) >= at_least:
                    return
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {name} >= {at_least}") from None


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes
    value: bytes

    @property
    def quote(self) -> DecodedQuote:
        return decode_quote(self.value)


async def read_topic(bootstrap: str, *, at_least: int = 1, topic: str = TOPIC) -> list[Record]:
    """Every record of ``topic``, from the start, once at least ``at_least`` are there."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        with anyio.fail_after(DEADLINE):
            # topics() asks the broker; partitions_for_topic() would answer from
            # the metadata the consumer had at start, before FT created the topic.
            while True:
                if topic in await consumer.topics():
                    break
                await anyio.sleep(0.05)
            partitions = await partition_count(bootstrap, topic)
            assigned = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            records: list[Record] = []
            while len(records) < at_least:
                batches = await consumer.getmany(timeout_ms=200)
                for tp, messages in batches.items():
                    records += [
                        Record(tp.partition, m.offset, m.key or b"", m.value or b"")
                        for m in messages
                    ]
            # And whatever else is there now, up to each partition's end.
            while [
                tp for tp in assigned if (consumer.highwater(tp) or 0) > await consumer.position(tp)
            ]:
                for tp, messages in (await consumer.getmany(timeout_ms=200)).items():
                    records += [
                        Record(tp.partition, m.offset, m.key or b"", m.value or b"")
                        for m in messages
                    ]
    finally:
        await consumer.stop()
    return records


async def partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return len(described["partitions"])


class RawReply:
    """The reply type of :class:`RawCodec`: a message's payload, undecoded."""


class RawCodec(CodecBase):
    """grpclib's protobuf codec, but replies come back as their payload bytes."""

    __content_subtype__ = "proto"

    def __init__(self) -> None:
        self._proto = ProtoCodec()

    def encode(self, message: Any, message_type: Any) -> bytes:
        return self._proto.encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return bytes(data) if message_type is RawReply else self._proto.decode(data, message_type)


async def grpc_payloads(port: int, count: int) -> list[bytes]:
    """The first ``count`` messages of a StreamQuotes stream, as raw payloads."""
    channel = Channel("127.0.0.1", port, codec=RawCodec())
    payloads: list[bytes] = []
    try:
        async with channel.request(
            STREAM_QUOTES, Cardinality.UNARY_STREAM, StreamQuotesRequest, RawReply
        ) as stream:
            await stream.send_message(StreamQuotesRequest(), end=True)
            while len(payloads) < count:
                payload = await stream.recv_message()
                assert isinstance(payload, bytes)
                payloads.append(payload)
            # Leaving the block would wait for the stream's trailers: end it here.
            await stream.cancel()
    finally:
        channel.close()
    return payloads


@contextmanager
def ft_log() -> Iterator[list[logging.LogRecord]]:
    """FT's log records (price moves left out) from this block."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not (isinstance(record.msg, str) and record.msg.startswith("%s: ")):
                records.append(record)

    handler = Keep(logging.DEBUG)
    # aiokafka's own lines are left out: a real process quiets them (see
    # quotopia.logs.configure), and the services report the broker's state themselves.
    loggers = [logging.getLogger("quotopia")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("quotopia").setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def contiguous(records: list[Record]) -> dict[str, list[int]]:
    """Per symbol, the sequences in offset order."""
    seen: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        quote = record.quote
        seen.setdefault(quote.symbol, []).append(quote.sequence)
    return seen


# --- the records ------------------------------------------------------------------


async def test_every_quote_reaches_the_topic_keyed_by_symbol_with_the_grpc_bytes(
    broker: TansuBroker,
) -> None:
    async with running_ft(ft_config(broker.bootstrap)) as ft:
        streamed = await grpc_payloads(ft.port, 30)
        ft.stop.set()
    records = await read_topic(broker.bootstrap, at_least=30)
    # The very bytes: what a gRPC subscriber got is in the topic, unchanged.
    values = {r.value for r in records}
    assert set(streamed) <= values
    # Keyed by symbol, each symbol in the partition the default partitioner gives it.
    partitions = await partition_count(broker.bootstrap, TOPIC)
    assert partitions == 4  # FTConfig's default
    for record in records:
        assert record.key == record.quote.symbol.encode()
        assert record.partition == (murmur2(record.key) & 0x7FFFFFFF) % partitions
    # Every quote once, in order, with one run id: sequences 1, 2, 3, ... per symbol.
    for symbol, sequences in contiguous(records).items():
        assert sequences == list(range(1, len(sequences) + 1)), symbol
    assert len({r.quote.run_id for r in records}) == 1
    assert {r.quote.symbol for r in records} == {"SBER", "BTC", "ETH"}


async def test_a_drain_sends_every_published_quote(broker: TansuBroker) -> None:
    """After a drain nothing is left behind: sent == every quote generated."""
    config = ft_config(broker.bootstrap, tick_interval=0.01)
    with ft_log():
        async with running_ft(config) as ft:
            await anyio.sleep(0.5)
            ft.stop.set()
    records = await read_topic(broker.bootstrap)
    per_symbol = contiguous(records)
    # The last sequence of each symbol is the number of its quotes: none missing.
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_symbol.values())
    assert len({len(seqs) for seqs in per_symbol.values()}) == 1  # every tick, whole


async def test_a_missing_topic_is_created_with_the_configured_partitions(
    broker: TansuBroker,
) -> None:
    async with running_ft(ft_config(broker.bootstrap, kafka_topic="prices.v1", kafka_partitions=6)):
        records = await read_topic(broker.bootstrap, topic="prices.v1", at_least=3)
    assert await partition_count(broker.bootstrap, "prices.v1") == 6
    assert {r.partition for r in records} <= set(range(6))


async def test_an_existing_topic_is_left_as_it_is(broker: TansuBroker) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    async with running_ft(ft_config(broker.bootstrap, kafka_partitions=8)):
        records = await read_topic(broker.bootstrap, at_least=3)
    assert await partition_count(broker.bootstrap, TOPIC) == 2
    assert {r.partition for r in records} <= {0, 1}


# --- a broker that is away, frozen or refusing ------------------------------------------


async def test_an_absent_broker_holds_nothing_up_and_the_buffer_keeps_the_newest(
    broker: TansuBroker,
) -> None:
    """Broker down at start: ticks and gRPC go on; the buffer fills to its capacity,
    dropping the oldest; once the broker is back, the newest quotes reach it, and
    after the drain every quote is accounted for (sent + dropped == generated)."""
    broker.kill()
    capacity = 30
    config = ft_config(broker.bootstrap, kafka_buffer=capacity)
    with ft_log() as log:
        async with running_ft(config) as ft:
            # gRPC subscribers are served on schedule meanwhile: 60 messages is
            # 3 seconds' worth of ticks at most, and more than the buffer holds.
            assert len(await grpc_payloads(ft.port, 60)) == 60
            metrics = await ft.metrics()
            assert metrics["quotopia_ft_kafka_connected"] == 0
            assert metrics["quotopia_ft_kafka_buffer_quotes"] == capacity
            assert metrics["quotopia_ft_kafka_buffer_capacity_quotes"] == capacity
            assert metrics["quotopia_ft_kafka_quotes_dropped_total"] > 0
            assert metrics["quotopia_ft_kafka_quotes_sent_total"] == 0
            broker.restart()
            await wait_for_metric(ft, "quotopia_ft_kafka_quotes_sent_total", capacity)
            assert (await ft.metrics())["quotopia_ft_kafka_connected"] == 1
            ft.stop.set()
    records = await read_topic(broker.bootstrap, at_least=capacity)
    (stopped,) = [r for r in log if r.getMessage().startswith("FT stopped")]
    sent, dropped = getattr(stopped, "kafka_sent", None), getattr(stopped, "kafka_dropped", None)
    assert sent == len(records)
    per_symbol = contiguous(records)
    # Drop-oldest: per symbol, what reached the broker is in order, each quote
    # once, without the oldest quotes of the outage. (Not always one unbroken run:
    # a batch in the producer's hands cannot be recalled, so a tick arriving while
    # the first batch after the outage is in flight pushes out the oldest quote
    # still waiting, the one just after that batch.)
    for symbol, sequences in per_symbol.items():
        assert sequences == sorted(set(sequences)), symbol
        assert sequences[0] > 1, f"{symbol}: the oldest quotes should have been dropped"
    # The last sequence of a symbol is how many quotes of it FT generated.
    generated = sum(sequences[-1] for sequences in per_symbol.values())
    assert sent + dropped == generated
    # One WARNING for the outage, not one per retry; nothing at ERROR.
    warnings = [r for r in log if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not [r for r in log if r.levelno >= logging.ERROR], [r.getMessage() for r in log]


async def test_a_frozen_broker_does_not_slow_grpc_subscribers(broker: TansuBroker) -> None:
    """SIGSTOP the broker: its TCP connection stays open and nothing answers. A gRPC
    subscriber still gets every tick, with no hole in its sequences."""
    config = ft_config(broker.bootstrap)
    async with running_ft(config) as ft:
        await read_topic(broker.bootstrap, at_least=3)
        broker.pause()
        try:
            payloads = await grpc_payloads(ft.port, 90)  # 30 ticks of 3 symbols
        finally:
            broker.resume()
        sequences: dict[str, list[int]] = {}
        for payload in payloads:
            quote = decode_quote(payload)
            sequences.setdefault(quote.symbol, []).append(quote.sequence)
        for symbol, seqs in sequences.items():
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), symbol
        ft.stop.set()


async def test_a_broker_refusing_the_idempotent_producer_is_reported_not_fatal(
    broker: TansuBroker,
) -> None:
    """Tansu refuses InitProducerId v0: FT keeps serving gRPC, counts the failures,
    says so once at WARNING, and logs nothing at ERROR."""
    config = ft_config(broker.bootstrap, kafka_idempotence=True)
    with ft_log() as log:
        async with running_ft(config) as ft:
            await wait_for_metric(ft, "quotopia_ft_kafka_failures_total", 2)
            assert len(await grpc_payloads(ft.port, 9)) == 9
            assert (await ft.metrics())["quotopia_ft_kafka_quotes_sent_total"] == 0
    warnings = [r for r in log if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not [r for r in log if r.levelno >= logging.ERROR], [r.getMessage() for r in log]
