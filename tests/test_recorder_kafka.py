"""The recorder's Kafka source (a consumer group), in-process against a real broker.

Records are produced here with aiokafka, as FT does (key: the symbol; value: the
protobuf ``Quote``), so each test controls exactly what is in the topic. What is
checked is what a user could see: the rows, the recorder's /metrics, and the
group's committed offsets as the broker reports them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from _kafka import TansuBroker, tansu_broker
from _services import DEADLINE
from _stored import rows, sample_total
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from test_recorder import Running, metrics, ready, recorder_config, until
from test_recorder import stop as drain

from quotopia.bus.admin import ensure_topic
from quotopia.bus.topic import record_key
from quotopia.history.database import parse_database_url, upgrade
from quotopia.quote_codec import encode_quote
from quotopia.recorder.offsets import OffsetLedger
from quotopia.recorder.service import serve as serve_recorder

pytestmark = pytest.mark.anyio

TOPIC = "quotes"
GROUP = "recorders"
RUN_ID = 77
#: One symbol per partition of a 4-partition topic (murmur2 of the key, as FT's
#: producer partitions): SBER 0, ETH 1, BTC 2, DOGE 3.
SYMBOLS = ("SBER", "ETH", "BTC", "DOGE")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the recorder runs on asyncio (grpclib, aiokafka)


@pytest.fixture
def broker() -> Iterator[TansuBroker]:
    with tansu_broker() as running:
        yield running


# --- the ledger: which offsets may be committed ------------------------------------


def test_an_offset_is_committable_once_every_quote_before_it_is_written() -> None:
    ledger: OffsetLedger[str] = OffsetLedger()
    ledger.read("p0", 10, buffered=True)
    ledger.read("p1", 4, buffered=True)
    ledger.read("p0", 11, buffered=False)  # refused: goes with the quotes before it
    ledger.read("p0", 12, buffered=True)
    assert ledger.committable() == {}
    ledger.wrote(1)
    assert ledger.committable() == {"p0": 11}
    ledger.wrote(1)
    assert ledger.committable() == {"p1": 5, "p0": 12}
    ledger.wrote(1)
    assert ledger.committable() == {"p0": 13}
    assert ledger.pending == 0


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("read"), st.sampled_from("ab"), st.booleans()),
            st.tuples(st.just("wrote"), st.integers(1, 4), st.none()),
        ),
        max_size=200,
    )
)
def test_nothing_is_committed_before_its_quote_is_written(
    events: list[tuple[str, Any, Any]],
) -> None:
    """However reads and writes interleave: a committed offset's record, and every
    record before it in its partition, had its quote written (or had none)."""
    ledger: OffsetLedger[str] = OffsetLedger()
    next_offset = {"a": 0, "b": 0}
    buffered_at: dict[tuple[str, int], int] = {}  # record -> quotes buffered by then
    committed = {"a": 0, "b": 0}
    for kind, first, second in events:
        if kind == "read":
            partition, buffered = first, second
            offset = next_offset[partition]
            next_offset[partition] += 1
            ledger.read(partition, offset, buffered=buffered)
            buffered_at[(partition, offset)] = ledger.buffered
        else:
            ledger.wrote(min(first, ledger.buffered - ledger.written))
        for partition, offset in ledger.committable().items():
            assert offset > committed[partition]  # never backwards
            committed[partition] = offset
            for earlier in range(offset):
                assert buffered_at[(partition, earlier)] <= ledger.written


# --- helpers --------------------------------------------------------------------


def payload(symbol: str, sequence: int) -> bytes:
    moment = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp() + sequence
    return encode_quote(
        symbol,
        100.0 + sequence,
        datetime.fromtimestamp(moment, UTC),
        0.01,
        sequence,
        RUN_ID,
    )


async def produce(bootstrap: str, records: list[tuple[str, bytes]]) -> None:
    """``(symbol, value)`` records, in order, acknowledged by the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(TOPIC, value, key=record_key(symbol)) for symbol, value in records
        ]
        for future in futures:
            await future
    finally:
        await producer.stop()


def quotes(first: int, last: int) -> list[tuple[str, bytes]]:
    """Sequences ``first..last`` of every symbol, tick by tick."""
    return [(s, payload(s, n)) for n in range(first, last + 1) for s in SYMBOLS]


async def committed(bootstrap: str, group: str = GROUP) -> dict[int, int]:
    """The group's committed offset per partition, as the broker has it.

    Asked through a consumer of the group that never joins it (``committed()``
    only fetches offsets): the admin client's OffsetFetch is one Tansu 0.6 answers
    in a form aiokafka 0.14 cannot decode.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        result = {}
        for partition in range(4):
            offset = await consumer.committed(TopicPartition(TOPIC, partition))
            if offset is not None:
                result[partition] = offset
        return result
    finally:
        await consumer.stop()


def kafka_config(database: str, bootstrap: str, **overrides: Any) -> Any:
    return recorder_config(
        database,
        1,  # FT's address is not used with --source kafka
        source="kafka",
        kafka=bootstrap,
        kafka_group=GROUP,
        kafka_session_timeout=2.0,
        **overrides,
    )


@asynccontextmanager
async def recorder(config: Any) -> AsyncIterator[Running]:
    """The recorder in the test's task group; ``drain`` stops it, leaving cancels it
    (a crash, as far as the group can tell: nothing more is committed)."""
    stop, stopped = anyio.Event(), anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        await serve_recorder(config, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            port = await tg.start(run)
        await until(lambda: ready(port), "the recorder ready (schema in place)")
        yield Running(port, stop, stopped)
        tg.cancel_scope.cancel()


async def stored_count(database: str, count: int) -> bool:
    return await anyio.to_thread.run_sync(lambda: len(rows(database)) >= count)


async def topic_with_four_partitions(bootstrap: str) -> None:
    await ensure_topic(bootstrap, TOPIC, partitions=4)


# --- the consumer group -------------------------------------------------------------


async def test_every_record_is_stored_once_and_the_offsets_follow(
    broker: TansuBroker, database_url: str
) -> None:
    await topic_with_four_partitions(broker.bootstrap)
    await produce(broker.bootstrap, quotes(1, 50))
    async with recorder(kafka_config(database_url, broker.bootstrap)) as running:
        await until(lambda: stored_count(database_url, 200), "200 rows")
        await produce(broker.bootstrap, quotes(51, 60))
        await until(lambda: stored_count(database_url, 240), "240 rows")
        samples = await metrics(running.port)
        await drain(running)
    stored = rows(database_url)
    assert len(stored) == len(set(stored)) == 240
    assert sample_total(samples, "quotopia_recorder_missed_quotes_total") == 0
    assert sample_total(samples, "quotopia_recorder_kafka_commits_total") > 0
    # After the drain the group has committed every record: 60 per partition.
    assert await committed(broker.bootstrap) == dict.fromkeys(range(4), 60)


@contextmanager
def locked(database: str) -> Iterator[None]:
    """SQLite's write lock held by another connection: the recorder's writes fail."""
    url = parse_database_url(database)
    assert url is not None
    assert url.database is not None
    connection = sqlite3.connect(url.database, isolation_level=None, timeout=DEADLINE)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        connection.close()


async def test_offsets_are_committed_only_after_the_database_commit(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    upgrade(parse_database_url(database))  # type: ignore[arg-type]
    with tansu_broker() as broker:
        await topic_with_four_partitions(broker.bootstrap)
        async with recorder(kafka_config(database, broker.bootstrap)) as running:
            await produce(broker.bootstrap, quotes(1, 5))
            await until(lambda: stored_count(database, 20), "the first 20 rows")
            await until(
                lambda: _committed_at_least(broker.bootstrap, 5), "the first offsets committed"
            )
            with locked(database):
                await produce(broker.bootstrap, quotes(6, 15))

                async def received_all() -> bool:
                    samples = await metrics(running.port)
                    return sample_total(samples, "quotopia_recorder_quotes_received_total") >= 60

                await until(received_all, "the records read into the buffer")
                # Read, but not in the database: the group's offsets stay put.
                await anyio.sleep(1.0)  # several poll-and-commit rounds
                assert await committed(broker.bootstrap) == dict.fromkeys(range(4), 5)
            await until(lambda: stored_count(database, 60), "60 rows once the lock is gone")
            await until(
                lambda: _committed_at_least(broker.bootstrap, 15), "the offsets after the write"
            )
            await drain(running)
    assert len(set(rows(database))) == 60


async def _committed_at_least(bootstrap: str, offset: int) -> bool:
    offsets = await committed(bootstrap)
    return len(offsets) == 4 and min(offsets.values()) >= offset


async def test_two_replicas_share_the_partitions_and_one_takes_over(tmp_path: Path) -> None:
    """A work queue: two recorders in one group each get partitions and write their
    share; when one stops, the other takes its partitions over; together, every
    quote once."""
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    upgrade(parse_database_url(database))  # type: ignore[arg-type]
    with tansu_broker() as broker:
        await topic_with_four_partitions(broker.bootstrap)
        config = kafka_config(database, broker.bootstrap, migrate=False)
        async with recorder(config) as first, recorder(config) as second:

            async def both_assigned() -> bool:
                a, b = await metrics(first.port), await metrics(second.port)
                return all(sample_total(m, "quotopia_recorder_feed_connected") == 1 for m in (a, b))

            await until(both_assigned, "both recorders connected")
            sequence = 0

            async def both_received() -> bool:
                nonlocal sequence
                sequence += 1
                await produce(broker.bootstrap, quotes(sequence, sequence))
                a, b = await metrics(first.port), await metrics(second.port)
                return all(
                    sample_total(m, "quotopia_recorder_quotes_received_total") > 0 for m in (a, b)
                )

            await until(both_received, "each recorder's share of the partitions")
            await drain(first)
            produced = sequence + 20
            await produce(broker.bootstrap, quotes(sequence + 1, produced))
            await until(lambda: stored_count(database, produced * 4), "every quote stored")
            samples = await metrics(second.port)
            await drain(second)
    stored = rows(database)
    assert len(stored) == len(set(stored)) == produced * 4
    # The second took over: it received the first one's partitions' later quotes too.
    assert {s for s, _, n in stored if n == produced} == set(SYMBOLS)
    assert sample_total(samples, "quotopia_recorder_quotes_received_total") >= 20 * 4


async def test_a_crashed_recorder_is_resumed_from_the_committed_offsets(
    broker: TansuBroker, tmp_path: Path
) -> None:
    """Cancelled mid-stream (nothing committed at the end), then a new recorder in
    the group: it re-reads from the last commit, and every quote is stored once."""
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    await topic_with_four_partitions(broker.bootstrap)
    async with recorder(kafka_config(database, broker.bootstrap)) as running:
        await produce(broker.bootstrap, quotes(1, 100))
        await until(lambda: stored_count(database, 40), "some rows")
        # Leaving the block cancels it: a crash, with no drain and no last commit.
    await produce(broker.bootstrap, quotes(101, 120))
    async with recorder(kafka_config(database, broker.bootstrap)) as running:
        await until(lambda: stored_count(database, 480), "every quote")
        samples = await metrics(running.port)
        await drain(running)
    stored = rows(database)
    assert len(stored) == len(set(stored)) == 480
    # What the first wrote but had not committed was read again, and not stored twice.
    written = sample_total(samples, "quotopia_recorder_rows_written_total")
    duplicates = sample_total(samples, "quotopia_recorder_duplicate_quotes_total")
    received = sample_total(samples, "quotopia_recorder_quotes_received_total")
    assert written + duplicates == received
    assert written < 480


async def test_an_undecodable_record_is_skipped_counted_and_committed(
    broker: TansuBroker, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    await topic_with_four_partitions(broker.bootstrap)
    records = [*quotes(1, 2), ("BTC", b"\xff\xff not a quote"), *quotes(3, 3)]
    await produce(broker.bootstrap, records)
    async with recorder(kafka_config(database, broker.bootstrap)) as running:
        await until(lambda: stored_count(database, 12), "the good records")
        samples = await metrics(running.port)
        await drain(running)
    assert len(set(rows(database))) == 12
    assert sample_total(samples, "quotopia_recorder_quotes_rejected_total") == 1
    # BTC's partition (2) holds 4 records: the garbage one's offset is committed too.
    assert (await committed(broker.bootstrap))[2] == 4


# --- tracing: one trace from FT's tick to the insert --------------------------------


async def test_one_trace_runs_from_a_tick_through_kafka_to_the_insert(
    broker: TansuBroker, tmp_path: Path
) -> None:
    """FT and the recorder in-process with tracing on (the SDK's in-memory
    exporter): a quote's path is one trace, ``ft.tick`` → ``send quotes``
    (PRODUCER) → ``process quotes`` (CONSUMER) → ``INSERT quotes`` (CLIENT), and a
    batch from several sends links to each."""
    from opentelemetry.trace import SpanKind
    from test_ft_kafka import ft_config, running_ft

    from quotopia.telemetry import tracing

    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    with tracing.capture_spans() as exporter:
        async with (
            running_ft(ft_config(broker.bootstrap, tick_interval=0.2)) as ft,
            recorder(kafka_config(database, broker.bootstrap)) as running,
        ):
            await until(lambda: stored_count(database, 30), "30 rows")
            await drain(running)
            ft.stop.set()
        spans = exporter.get_finished_spans()

    by_id = {span.context.span_id: span for span in spans}

    def parent(span: Any) -> Any:
        return None if span.parent is None else by_id.get(span.parent.span_id)

    inserts = [s for s in spans if s.name == "INSERT quotes"]
    assert inserts, sorted({s.name for s in spans})
    whole = 0
    for insert in inserts:
        assert insert.kind is SpanKind.CLIENT
        process = parent(insert)
        assert process is not None
        assert process.name == "process quotes"
        assert process.kind is SpanKind.CONSUMER
        assert process.attributes["messaging.consumer.group.name"] == GROUP
        send = parent(process)
        if send is None:
            # No one parent: a batch from several sends, linked to each.
            assert len(process.links) > 1
            continue
        assert send.name == "send quotes"
        assert send.kind is SpanKind.PRODUCER
        tick = parent(send)
        assert tick is not None
        assert tick.name == "ft.tick"
        assert tick.parent is None
        assert {s.context.trace_id for s in (insert, process, send, tick)} == {
            tick.context.trace_id
        }
        whole += 1
    assert whole > 0, "no batch came from a single send: nothing to follow as one trace"
