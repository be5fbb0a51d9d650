"""The recorder's Kafka source (a consumer group), in-process against a real broker.

Records are produced here with aiokafka, as FT does (key: the symbol; value: the
protobuf ``Quote``), so each test controls exactly what is in the topic. What is
checked is what a user could see: the rows, the recorder's /metrics and /readyz,
its log, and the group's committed offsets as the broker reports them.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from _kafka import TansuBroker, tansu_broker
from _services import DEADLINE, SampleKey, http_get
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
from quotopia.recorder import kafka_feed
from quotopia.recorder.config import RecorderConfig
from quotopia.recorder.offsets import OffsetLedger
from quotopia.recorder.service import serve as serve_recorder

pytestmark = pytest.mark.anyio

TOPIC = "quotes"
GROUP = "recorders"
RUN_ID = 77
#: One symbol per partition of a 4-partition topic (murmur2 of the key, as FT's
#: producer partitions): SBER 0, ETH 1, BTC 2, DOGE 3.
SYMBOLS = ("SBER", "ETH", "BTC", "DOGE")
PARTITIONS = range(4)


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


def payload(symbol: str, sequence: int, run_id: int = RUN_ID) -> bytes:
    moment = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp() + sequence
    return encode_quote(
        symbol,
        100.0 + sequence,
        datetime.fromtimestamp(moment, UTC),
        0.01,
        sequence,
        run_id,
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
        for partition in PARTITIONS:
            offset = await consumer.committed(TopicPartition(TOPIC, partition))
            if offset is not None:
                result[partition] = offset
        return result
    finally:
        await consumer.stop()


def kafka_config(database: str, bootstrap: str, **overrides: Any) -> RecorderConfig:
    # A session of 2 s: Tansu's rebalances take about half of it.
    return recorder_config(
        database,
        1,  # FT's address is not used with --source kafka
        source="kafka",
        kafka=bootstrap,
        kafka_group=GROUP,
        kafka_session_timeout=2.0,
        **overrides,
    )


@dataclass
class Member(Running):
    """A recorder of the group: :func:`drain` stops it, :meth:`crash` cancels it."""

    scope: anyio.CancelScope
    ended: anyio.Event

    async def crash(self) -> None:
        """Cancel it (no drain, no last commit) and wait until it has ended."""
        self.scope.cancel()
        with anyio.fail_after(DEADLINE):
            await self.ended.wait()


@asynccontextmanager
async def recorder(config: RecorderConfig) -> AsyncIterator[Member]:
    """The recorder in the test's task group, once ready; leaving cancels it."""
    stop, stopped, ended = anyio.Event(), anyio.Event(), anyio.Event()
    scope = anyio.CancelScope()

    async def run(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        try:
            with scope:
                await serve_recorder(config, shutdown_trigger=stop.wait, task_status=task_status)
                stopped.set()
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            port = await tg.start(run)
        await until(lambda: ready(port), "the recorder ready (schema in place)")
        yield Member(port, stop, stopped, scope, ended)
        tg.cancel_scope.cancel()


async def stored_count(database: str, count: int) -> bool:
    return await anyio.to_thread.run_sync(lambda: len(rows(database)) >= count)


async def topic_with_four_partitions(bootstrap: str) -> None:
    await ensure_topic(bootstrap, TOPIC, partitions=len(PARTITIONS))


def per_partition(samples: dict[SampleKey, float], name: str) -> dict[int, float]:
    """``name``'s samples by their ``partition`` label."""
    return {
        int(dict(labels)["partition"]): value
        for (sample, labels), value in samples.items()
        if sample == name
    }


def total(samples: dict[SampleKey, float], name: str) -> float:
    return sample_total(samples, f"quotopia_recorder_{name}")


async def _committed_at_least(bootstrap: str, offset: int) -> bool:
    offsets = await committed(bootstrap)
    return len(offsets) == 4 and min(offsets.values()) >= offset


def sqlite_database(tmp_path: Path) -> str:
    """A SQLite database with the schema in place."""
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    url = parse_database_url(database)
    assert url is not None
    upgrade(url)
    return database


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


def messages(caplog: pytest.LogCaptureFixture, start: str, level: int | None = None) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(start) and (level is None or r.levelno == level)
    ]


# --- the consumer group -------------------------------------------------------------


async def test_every_record_is_stored_once_and_the_offsets_follow(
    broker: TansuBroker, database_url: str
) -> None:
    await topic_with_four_partitions(broker.bootstrap)
    await produce(broker.bootstrap, quotes(1, 50))
    async with recorder(kafka_config(database_url, broker.bootstrap)) as running:
        await until(lambda: stored_count(database_url, 200), "200 rows")
        await produce(broker.bootstrap, quotes(51, 60))

        async def caught_up() -> dict[SampleKey, float] | None:
            samples = await metrics(running.port)
            offsets = per_partition(samples, "quotopia_recorder_kafka_committed_offset")
            return samples if offsets == dict.fromkeys(PARTITIONS, 60) else None

        samples = await until(caught_up, "every offset committed")
        readiness = await anyio.to_thread.run_sync(http_get, running.port, "/readyz")
        await drain(running)
    stored = rows(database_url)
    assert len(stored) == len(set(stored)) == 240
    assert readiness == (200, {"status": "ready", "feed": "connected"})
    assert per_partition(samples, "quotopia_recorder_kafka_lag_records") == dict.fromkeys(
        PARTITIONS, 0
    )
    assert total(samples, "kafka_assigned_partitions") == 4
    assert total(samples, "missed_quotes_total") == 0
    assert total(samples, "duplicate_quotes_total") == 0
    assert total(samples, "kafka_commits_total") > 0
    assert total(samples, "kafka_commit_failures_total") == 0
    # After the drain the group has committed every record: 60 per partition.
    assert await committed(broker.bootstrap) == dict.fromkeys(PARTITIONS, 60)


async def test_offsets_are_committed_only_after_the_database_commit(
    broker: TansuBroker, tmp_path: Path
) -> None:
    database = sqlite_database(tmp_path)
    await topic_with_four_partitions(broker.bootstrap)
    async with recorder(kafka_config(database, broker.bootstrap)) as running:
        await produce(broker.bootstrap, quotes(1, 5))
        await until(lambda: stored_count(database, 20), "the first 20 rows")
        await until(lambda: _committed_at_least(broker.bootstrap, 5), "the first offsets committed")
        with locked(database):
            await produce(broker.bootstrap, quotes(6, 15))

            async def read_not_written() -> dict[SampleKey, float] | None:
                samples = await metrics(running.port)
                lag = per_partition(samples, "quotopia_recorder_kafka_lag_records")
                if total(samples, "quotes_received_total") < 60:
                    return None
                return samples if lag == dict.fromkeys(PARTITIONS, 10) else None

            # Read into the buffer; the writer waits for the lock (SQLite's busy
            # timeout), while the session polls, and would commit, every 0.2 s.
            samples = await until(read_not_written, "the records read, not written")
            await anyio.sleep(1.0)  # several poll-and-commit rounds
            assert await committed(broker.bootstrap) == dict.fromkeys(PARTITIONS, 5)
            assert per_partition(
                samples, "quotopia_recorder_kafka_committed_offset"
            ) == dict.fromkeys(PARTITIONS, 5)
        await until(lambda: stored_count(database, 60), "60 rows once the lock is gone")
        await until(
            lambda: _committed_at_least(broker.bootstrap, 15), "the offsets after the write"
        )
        await drain(running)
    assert len(set(rows(database))) == 60


async def test_a_full_buffer_pauses_the_partitions_and_keeps_them(
    broker: TansuBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the database is down the buffer fills and the reading stops; the member
    goes on polling (every partition paused), so the group keeps it however long
    that lasts: here three times the poll interval Kafka would allow."""
    caplog.set_level(logging.INFO, "quotopia.recorder")
    monkeypatch.setattr(kafka_feed, "_MAX_POLL_INTERVAL_MS", 1000)
    database = sqlite_database(tmp_path)
    await topic_with_four_partitions(broker.bootstrap)
    config = kafka_config(database, broker.bootstrap, buffer=8, batch_size=4)
    async with recorder(config) as running:
        await produce(broker.bootstrap, quotes(1, 1))
        await until(lambda: stored_count(database, 4), "the first rows")
        with locked(database):
            await produce(broker.bootstrap, quotes(2, 11))

            async def full() -> bool:
                samples = await metrics(running.port)
                return total(samples, "buffer_quotes") == 8

            await until(full, "the buffer full")
            await anyio.sleep(3.0)  # what is checked is what did not happen: a rejoin
        await until(lambda: stored_count(database, 44), "every row once the lock is gone")
        await until(lambda: _committed_at_least(broker.bootstrap, 11), "every offset committed")
        samples = await metrics(running.port)
        await drain(running)
    assert len(set(rows(database))) == 44
    # Never out of the group: every commit accepted, one assignment, nothing
    # read twice (a member that rejoins reads again from the last commit).
    assert total(samples, "kafka_commit_failures_total") == 0
    assert len(messages(caplog, "assigned partitions")) == 1
    assert total(samples, "duplicate_quotes_total") == 0
    assert total(samples, "feed_sessions_total") == 1


async def assigned(member: Member, count: int) -> bool:
    samples = await metrics(member.port)
    return total(samples, "kafka_assigned_partitions") == count


@pytest.mark.parametrize("leaving", ["drained", "crashed"])
async def test_two_replicas_share_the_partitions_and_one_takes_over(
    broker: TansuBroker, tmp_path: Path, leaving: str
) -> None:
    """A work queue: two recorders in one group each get partitions and write their
    share; when one leaves (drained, or cancelled with no last commit) the other
    takes its partitions over; together, every quote once."""
    database = sqlite_database(tmp_path)
    await topic_with_four_partitions(broker.bootstrap)
    config = kafka_config(database, broker.bootstrap, migrate=False)
    async with recorder(config) as first, recorder(config) as second:

        async def shared() -> bool:
            return await assigned(first, 2) and await assigned(second, 2)

        await until(shared, "two partitions each")
        await produce(broker.bootstrap, quotes(1, 10))
        await until(lambda: stored_count(database, 40), "the first 40 rows")
        shares = [total(await metrics(m.port), "quotes_received_total") for m in (first, second)]
        if leaving == "drained":
            await drain(first)
        else:
            await first.crash()
        await until(lambda: assigned(second, 4), "the second with every partition")
        await produce(broker.bootstrap, quotes(11, 30))
        await until(lambda: stored_count(database, 120), "every quote stored")
        samples = await metrics(second.port)
        await drain(second)
    stored = rows(database)
    assert len(stored) == len(set(stored)) == 120
    assert all(share > 0 for share in shares), shares
    assert sum(shares) == 40  # each quote read by one of them
    received = total(samples, "quotes_received_total")
    written = total(samples, "rows_written_total")
    duplicates = total(samples, "duplicate_quotes_total")
    assert received == written + duplicates
    if leaving == "drained":
        # The first committed all it wrote before it left: nothing is read twice.
        assert duplicates == 0


async def test_a_member_losing_partitions_commits_its_batch_in_flight_first(
    broker: TansuBroker, tmp_path: Path
) -> None:
    """Quotes flow while a second member joins; the writer holds each batch open
    for 0.6 s, so when the first member's partitions are revoked, a batch is in
    flight. The first waits for it and commits its offsets before they move: the
    new owner starts after it, and nothing is read twice."""
    database = sqlite_database(tmp_path)
    await topic_with_four_partitions(broker.bootstrap)
    config = kafka_config(database, broker.bootstrap, migrate=False, flush_interval=0.6)
    produced = 0
    async with recorder(config) as first:
        await until(lambda: assigned(first, 4), "the first with every partition")
        stop_producing = anyio.Event()

        async def tick() -> None:
            nonlocal produced
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
            await producer.start()
            try:
                while not stop_producing.is_set():
                    produced += 1
                    for symbol, value in quotes(produced, produced):
                        await producer.send_and_wait(TOPIC, value, key=record_key(symbol))
                    await anyio.sleep(0.1)
            finally:
                await producer.stop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            async with recorder(config) as second:

                async def second_reads() -> bool:
                    samples = await metrics(second.port)
                    return await assigned(first, 2) and total(samples, "quotes_received_total") > 0

                await until(second_reads, "the second member reading its share")
                stop_producing.set()
                await until(lambda: stored_count(database, produced * 4), "every quote stored")
                samples = [await metrics(m.port) for m in (first, second)]
                await drain(second)
        await drain(first)
    stored = rows(database)
    assert len(stored) == len(set(stored)) == produced * 4
    assert [total(s, "duplicate_quotes_total") for s in samples] == [0, 0]


async def test_a_crashed_recorder_is_resumed_from_the_committed_offsets(
    broker: TansuBroker, database_url: str
) -> None:
    """Cancelled mid-stream (no drain, no last commit), then a new recorder in the
    group: it re-reads from the last commit, what the first wrote after it is
    counted as duplicates, and every quote is stored once."""
    await topic_with_four_partitions(broker.bootstrap)
    async with recorder(kafka_config(database_url, broker.bootstrap)) as first:
        await produce(broker.bootstrap, quotes(1, 100))
        await until(lambda: stored_count(database_url, 40), "some rows")
        await first.crash()
    before = len(rows(database_url))
    done = sum((await committed(broker.bootstrap)).values())
    assert done <= before  # never an offset ahead of the database
    await produce(broker.bootstrap, quotes(101, 120))
    async with recorder(kafka_config(database_url, broker.bootstrap)) as second:
        await until(lambda: stored_count(database_url, 480), "every quote")
        samples = await metrics(second.port)
        await drain(second)
    stored = rows(database_url)
    assert len(stored) == len(set(stored)) == 480
    # One symbol per partition, written in order: what the first wrote past its
    # last commit is exactly what the second read again.
    assert total(samples, "quotes_received_total") == 480 - done
    assert total(samples, "duplicate_quotes_total") == before - done
    assert total(samples, "missed_quotes_total") == 0


async def test_refused_records_are_skipped_counted_and_committed(
    broker: TansuBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Undecodable bytes and a quote that cannot be stored (no run id) are skipped,
    counted and logged (a warning, then debug lines), and their offsets are
    committed: even the last record of a partition, with nothing after it."""
    caplog.set_level(logging.DEBUG, "quotopia.recorder")
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    await topic_with_four_partitions(broker.bootstrap)
    garbage = b"\xff\xff not a quote"
    records = [
        *quotes(1, 2),
        ("BTC", garbage),
        ("BTC", payload("BTC", 3, run_id=0)),
        ("BTC", garbage),
        *quotes(3, 3),
        ("ETH", garbage),
    ]
    await produce(broker.bootstrap, records)
    # SBER 0, ETH 1, BTC 2, DOGE 3: records per partition.
    every = {0: 3, 1: 4, 2: 6, 3: 3}
    async with recorder(kafka_config(database, broker.bootstrap)) as running:

        async def all_committed() -> dict[SampleKey, float] | None:
            samples = await metrics(running.port)
            offsets = per_partition(samples, "quotopia_recorder_kafka_committed_offset")
            return samples if offsets == every else None

        samples = await until(all_committed, "every offset committed")
        await drain(running)
    assert len(set(rows(database))) == 12
    assert total(samples, "quotes_rejected_total") == 4
    assert total(samples, "missed_quotes_total") == 0
    assert await committed(broker.bootstrap) == every
    undecodable = [
        r.levelno for r in caplog.records if r.getMessage().startswith("skipped an undecodable")
    ]
    assert undecodable == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert messages(caplog, "refused an unstorable quote", logging.WARNING)


async def test_a_broker_restart_is_a_lost_feed_then_a_new_session(
    broker: TansuBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker killed: one warning, /readyz ready with the feed disconnected
    (the database is fine), retries. Restarted, it has lost everything (memory
    storage): a new session joins the group anew and records the new topic."""
    caplog.set_level(logging.INFO, "quotopia.recorder")
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    await topic_with_four_partitions(broker.bootstrap)
    async with recorder(kafka_config(database, broker.bootstrap)) as running:
        await produce(broker.bootstrap, quotes(1, 5))
        await until(lambda: stored_count(database, 20), "the first rows")
        broker.kill()

        async def disconnected() -> tuple[int, Any] | None:
            status, body = await anyio.to_thread.run_sync(http_get, running.port, "/readyz")
            return (status, body) if body.get("feed") == "disconnected" else None

        readiness = await until(disconnected, "the feed reported lost")
        down = await metrics(running.port)
        await anyio.to_thread.run_sync(broker.restart)
        # As FT would: the topic made again (a consumer's metadata request may
        # have made it already), then quotes.
        await topic_with_four_partitions(broker.bootstrap)
        await produce(broker.bootstrap, quotes(6, 10))
        await until(lambda: stored_count(database, 40), "the rows after the restart")
        await until(lambda: _committed_at_least(broker.bootstrap, 5), "offsets in the new topic")
        up = await metrics(running.port)
        await drain(running)
    assert readiness == (200, {"status": "ready", "feed": "disconnected"})
    assert total(down, "feed_connected") == 0
    assert total(up, "feed_connected") == 1
    assert total(up, "feed_sessions_total") >= 2
    assert len(set(rows(database))) == 40
    assert len(messages(caplog, "feed lost", logging.WARNING)) == 1


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
