"""Core with ``--source kafka``: its store built from the topic, on a real broker.

Each test has a Tansu broker of its own (tests/_kafka.py) and produces the records
itself, as FT would: key the symbol, value the protobuf ``Quote``, ``acks="all"``
(Tansu refuses the idempotent producer). Core runs as a real process
(``quotopia core --source kafka ...``) and is asked over HTTP, except where a test
watches the store itself, in process, at every change.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio_asyncio
from _kafka import tansu_broker
from _procs import QuotopiaProcess, wait_until
from _services import DEADLINE, Service, feed, http_get, quotes, scrape
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from test_kafka_harness import create_topic

from quotopia.bus.topic import record_key
from quotopia.core.config import CoreConfig
from quotopia.core.kafka_feed import KafkaFeed, is_newer
from quotopia.core.probes import readiness
from quotopia.core.store import QuoteStore
from quotopia.quote_codec import DecodedQuote, encode_quote
from quotopia.telemetry.probes import Lifecycle

TOPIC = "quotes"
#: Core's start line with the Kafka source; groups: port, topic, bootstrap.
CORE_KAFKA_READY = (
    r"Core listening on http://127\.0\.0\.1:(\d+), feed from Kafka topic (\S+) at (\S+)"
)
RUN = 0x5EED_0001
#: Quote times: a fixed start, one millisecond per sequence number.
T0 = datetime(2025, 1, 11, 22, 30, 0, 123000, tzinfo=UTC)


@dataclass(frozen=True)
class Q:
    """One quote to produce."""

    symbol: str
    sequence: int
    run_id: int = RUN
    #: None: derived from the sequence (and the run, so a later run is later).
    time: datetime | None = None

    @property
    def price(self) -> float:
        return 100.0 + self.sequence + (self.run_id % 7) / 10

    @property
    def change_percent(self) -> float:
        return round(self.sequence / 1000, 4)

    @property
    def at(self) -> datetime:
        if self.time is not None:
            return self.time
        return T0 + timedelta(hours=self.run_id - RUN, milliseconds=self.sequence)

    def value(self) -> bytes:
        return encode_quote(
            self.symbol, self.price, self.at, self.change_percent, self.sequence, self.run_id
        )

    def body(self) -> dict[str, Any]:
        """What ``GET /quotes/{symbol}`` should answer, but for ``age_seconds``."""
        return {
            "symbol": self.symbol,
            "price": self.price,
            "time": self.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "change_percent": self.change_percent,
            "sequence": self.sequence,
        }


Record = Q | bytes


async def _produce(
    bootstrap: str, records: Sequence[Record], partition: int | None, last_alone: bool
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        # Inside the try: a start that fails still leaves a client to stop.
        await producer.start()
        pending = []
        body = records[:-1] if last_alone else records
        for record in body:
            key, value = _encoded(record)
            pending.append(await producer.send(TOPIC, value, key=key, partition=partition))
        await asyncio.gather(*pending)
        if last_alone and records:
            # A batch of its own: Tansu's end offset (the last batch's base + 1) is
            # then the true one.
            key, value = _encoded(records[-1])
            await producer.send_and_wait(TOPIC, value, key=key, partition=partition)
    finally:
        await producer.stop()


def _encoded(record: Record) -> tuple[bytes, bytes]:
    if isinstance(record, Q):
        return record_key(record.symbol), record.value()
    return b"GARBAGE", record


def produce(
    bootstrap: str,
    records: Sequence[Record],
    *,
    partition: int | None = None,
    last_alone: bool = False,
) -> None:
    """Send ``records`` (quotes, or raw values) to the topic, all acknowledged on return.

    They go out in batches of several records; with ``last_alone`` the last one is
    a batch of its own."""
    asyncio.run(_produce(bootstrap, records, partition, last_alone))


def make_topic(bootstrap: str, partitions: int = 4) -> None:
    asyncio.run(create_topic(bootstrap, TOPIC, partitions))


async def _offsets(bootstrap: str) -> dict[int, tuple[int, int | None]]:
    """Per partition: ListOffsets' end offset and a fetch's high-water mark."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
    try:
        await consumer.start()
        assigned = [TopicPartition(TOPIC, p) for p in consumer.partitions_for_topic(TOPIC)]
        consumer.assign(assigned)
        end = await consumer.end_offsets(assigned)
        for tp in assigned:
            consumer.seek(tp, 0)
        with_highwater: dict[int, tuple[int, int | None]] = {}
        while len(with_highwater) < len(assigned):
            await consumer.getmany(timeout_ms=20)
            for tp in assigned:
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    with_highwater[tp.partition] = (end[tp], highwater)
        return with_highwater
    finally:
        await consumer.stop()


class Ticker:
    """A stand-in for FT: a quote of each symbol every ``interval`` seconds, from a
    thread, through broker outages (it reconnects); :meth:`pause` stops it between
    two ticks, with its producer closed.

    Resource handling: a context manager; leaving it stops and joins the thread.
    """

    def __init__(self, bootstrap: str, symbols: Sequence[str], interval: float = 0.05) -> None:
        self.bootstrap = bootstrap
        self.symbols = tuple(symbols)
        self.interval = interval
        #: The last sequence the broker acknowledged, for every symbol.
        self.sent = 0
        self._go = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Ticker:
        self._go.set()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive()

    def pause(self) -> None:
        self._go.clear()
        assert self._idle.wait(DEADLINE), "the ticker did not pause"

    def resume(self) -> None:
        self._idle.clear()
        self._go.set()

    async def _run(self) -> None:
        sequence = itertools.count(1)
        while not self._stop.is_set():
            if not self._go.is_set():
                self._idle.set()
                await asyncio.sleep(0.01)
                continue
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=1000
            )
            try:
                await producer.start()
                while self._go.is_set() and not self._stop.is_set():
                    n = next(sequence)
                    now = datetime.now(UTC)
                    sent = [
                        await producer.send(TOPIC, Q(s, n, time=now).value(), key=record_key(s))
                        for s in self.symbols
                    ]
                    await asyncio.gather(*sent)
                    self.sent = n
                    await asyncio.sleep(self.interval)
            except (KafkaError, OSError):
                await asyncio.sleep(0.05)  # the broker is away: try again
            finally:
                await producer.stop()


@contextmanager
def kafka_core(bootstrap: str, *flags: str, feed_timeout: float = 5.0) -> Iterator[Service]:
    """``quotopia core --source kafka`` on the broker, with short timings, once it
    listens."""
    with QuotopiaProcess(
        "core",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--source",
        "kafka",
        "--kafka",
        bootstrap,
        "--backoff-cap",
        "0.2",
        "--feed-timeout",
        str(feed_timeout),
        *flags,
    ) as process:
        ready, ready_at = process.wait_for_line_at(CORE_KAFKA_READY, DEADLINE)
        assert (ready[2], ready[3]) == (TOPIC, bootstrap), process.output()
        yield Service(process, int(ready[1]), ready_at)


def without_age(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict)
    assert isinstance(body.pop("age_seconds"), float)
    return body


def readyz(core: Service) -> tuple[int, str]:
    status, body = http_get(core.port, "/readyz")
    return status, body["status"]


def wait_ready(core: Service) -> None:
    wait_until(lambda: readyz(core) == (200, "ready"), DEADLINE, what="/readyz ready")


def wait_quotes(core: Service, expected: dict[str, float]) -> None:
    wait_until(lambda: quotes(core.port) == expected, DEADLINE, what=f"/quotes == {expected}")


def metric(core: Service, name: str, **labels: str) -> float:
    return scrape(core.port).get((name, tuple(sorted(labels.items()))), -1.0)


# --- the ordering rule, pure ---------------------------------------------------------


def decoded(q: Q) -> DecodedQuote:
    return DecodedQuote(q.symbol, q.price, int(q.at.timestamp() * 1e6), 0.0, q.sequence, q.run_id)


@pytest.mark.parametrize(
    ("quote", "held", "newer"),
    [
        (Q("BTC", 5), None, True),
        (Q("BTC", 6), Q("BTC", 5), True),
        (Q("BTC", 5), Q("BTC", 5), False),  # a duplicate (a producer's retry)
        (Q("BTC", 4), Q("BTC", 5), False),  # a replay, or a reordered retry
        # A later FT run starts again at 1, later in time.
        (Q("BTC", 1, run_id=RUN + 1), Q("BTC", 900), True),
        (Q("BTC", 900), Q("BTC", 1, run_id=RUN + 1), False),
        # The same time in two runs: the sequence decides.
        (Q("BTC", 2, run_id=RUN + 1, time=T0), Q("BTC", 1, time=T0), True),
    ],
)
def test_only_a_newer_quote_replaces_the_one_held(quote: Q, held: Q | None, newer: bool) -> None:
    assert is_newer(decoded(quote), None if held is None else decoded(held)) is newer


# --- Core over HTTP -------------------------------------------------------------------


def test_core_serves_the_topic_in_the_api_shapes_and_follows_it() -> None:
    with tansu_broker() as broker:
        make_topic(broker.bootstrap)
        first = [Q("BTC", 1), Q("ETH", 1), Q("SBER", 1), Q("BTC", 2)]
        produce(broker.bootstrap, first)
        with kafka_core(broker.bootstrap) as core:
            wait_ready(core)
            assert quotes(core.port) == {
                "BTC": Q("BTC", 2).price,
                "ETH": Q("ETH", 1).price,
                "SBER": Q("SBER", 1).price,
            }
            status, body = http_get(core.port, "/quotes/btc")
            assert status == 200
            assert without_age(body) == Q("BTC", 2).body()
            status, body = http_get(core.port, "/quotes/DOGE")
            assert status == 404

            # Live: generated now, so its delay to the store is measured.
            live = Q("BTC", 3, time=datetime.now(UTC))
            produce(broker.bootstrap, [live])
            wait_until(
                lambda: without_age(http_get(core.port, "/quotes/BTC")[1]) == live.body(),
                DEADLINE,
                what="the new BTC quote",
            )
            assert quotes(core.port)["BTC"] == live.price
            found = scrape(core.port)
            assert found[("quotopia_core_feed_connected", ())] == 1
            assert found[("quotopia_core_feed_reconnects_total", ())] == 0
            assert found[("quotopia_core_feed_rejected_total", ())] == 0
            # The start applied the newest quote per symbol, then the live one.
            assert found[("quotopia_core_quotes_received_total", (("symbol", "BTC"),))] == 2
            assert found[("quotopia_core_quotes_received_total", (("symbol", "ETH"),))] == 1
            assert ("quotopia_core_quote_age_seconds", (("symbol", "SBER"),)) in found
            # Only the live quote: the start's are as old as the topic.
            assert found[("quotopia_core_feed_latency_seconds_count", ())] == 1
            assert 0 <= found[("quotopia_core_feed_latency_seconds_sum", ())] < DEADLINE
            assert feed(core.port)["connected"] is True
            assert (
                "connecting to Kafka topic quotes at " + broker.bootstrap in core.process.output()
            )


def long_topic(bootstrap: str) -> dict[str, Q]:
    """A topic with history, replayed 100 records per partition; the newest quote
    of each symbol that Core should find.

    - partition 0: FAR (beyond the replay), 50 of A, NEAR, 98 more of A (NEAR is
      99 records from the end: within), the last record in a batch of its own;
    - partition 1: 300 of B in batches, the last ones a big batch (Tansu's end
      offset is then too low), then an older B (a reordered retry), and C of an
      old FT run followed by C of a new run;
    - partition 2: nothing.
    """
    a = itertools.count(1)
    zero: list[Record] = [Q("FAR", 1), *(Q("A", next(a)) for _ in range(50)), Q("NEAR", 7)]
    zero += [Q("A", next(a)) for _ in range(98)]
    produce(bootstrap, zero, partition=0, last_alone=True)
    produce(bootstrap, [Q("B", n) for n in range(1, 201)], partition=1)
    old_c = [Q("C", n) for n in range(1, 40)]
    new_c = [Q("C", n, run_id=RUN + 1) for n in range(1, 4)]
    tail = [*(Q("B", n) for n in range(201, 301)), Q("B", 299), *old_c, *new_c]
    produce(bootstrap, tail, partition=1)
    return {
        "A": Q("A", 148),
        "NEAR": Q("NEAR", 7),
        "B": Q("B", 300),
        "C": Q("C", 3, run_id=RUN + 1),
    }


def test_a_start_from_a_long_topic_finds_the_newest_quote_of_each_symbol() -> None:
    with tansu_broker() as broker:
        make_topic(broker.bootstrap, partitions=3)
        newest = long_topic(broker.bootstrap)
        offsets = asyncio.run(_offsets(broker.bootstrap))
        assert offsets[0] == (150, 150)  # the last batch alone: the end offset is right
        assert offsets[1][1] == 300 + 1 + 39 + 3
        with kafka_core(broker.bootstrap, "--kafka-replay", "100") as core:
            wait_ready(core)
            assert quotes(core.port) == {s: q.price for s, q in newest.items()}
            for symbol, q in newest.items():
                status, body = http_get(core.port, f"/quotes/{symbol}")
                assert (status, without_age(body)) == (200, q.body())
            # FAR's one quote is 150 records back, beyond the replay: Core does not
            # know it until FAR's next quote.
            assert http_get(core.port, "/quotes/FAR")[0] == 404
            produce(broker.bootstrap, [Q("FAR", 2)], partition=0)
            wait_until(lambda: http_get(core.port, "/quotes/FAR")[0] == 200, DEADLINE, what="FAR")
            assert without_age(http_get(core.port, "/quotes/FAR")[1]) == Q("FAR", 2).body()


def test_readiness_waits_for_the_high_water_mark_of_every_partition() -> None:
    """In process: at every change of the store, readiness and what it holds.

    Ready must never come before the store holds the newest quote of each symbol:
    the replay takes several polls, and the newest records are in a big last
    batch (Tansu's end offset then points at the batch's first record)."""
    with tansu_broker() as broker:
        make_topic(broker.bootstrap, partitions=3)
        produce(broker.bootstrap, [Q("A", n) for n in range(1, 1501)], partition=0)
        produce(broker.bootstrap, [Q("B", n) for n in range(1, 701)], partition=1)
        tail = [*(Q("C", n) for n in range(1, 40)), *(Q("C", n, run_id=RUN + 1) for n in (1, 2))]
        produce(broker.bootstrap, tail, partition=1)
        end, highwater = asyncio.run(_offsets(broker.bootstrap))[1]
        assert highwater == 741
        assert end <= highwater
        expected = {"A": Q("A", 1500).price, "B": Q("B", 700).price}
        expected["C"] = Q("C", 2, run_id=RUN + 1).price
        config = CoreConfig(source="kafka", kafka=broker.bootstrap, kafka_replay=1000)
        seen: list[tuple[bool, dict[str, float]]] = []

        async def main() -> None:
            store = QuoteStore()
            lifecycle = Lifecycle()
            lifecycle.serving()
            ready = trio.Event()

            def watch() -> None:
                held = {q.symbol: q.price for q in store.latest}
                ok = readiness(lifecycle, store).ok
                seen.append((ok, held))
                if ok:
                    ready.set()

            store.on_change(watch)
            source = KafkaFeed()
            with trio.fail_after(DEADLINE):
                async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                    nursery.start_soon(source, config, store)
                    await ready.wait()
                    nursery.cancel_scope.cancel()

        trio.run(main)
        assert seen[0] == (False, {})  # the feed is up, the snapshot still to come
        ready = [held for ok, held in seen if ok]
        assert ready, seen
        assert all(held == expected for held in ready), seen
        assert seen[-1] == (True, expected)


def test_every_replica_sees_every_quote() -> None:
    with tansu_broker() as broker:
        make_topic(broker.bootstrap)
        symbols = ("BTC", "ETH", "SBER", "AAPL", "GAZP")
        rounds = 20
        with (
            kafka_core(broker.bootstrap, feed_timeout=10) as one,
            kafka_core(broker.bootstrap, feed_timeout=10) as two,
        ):
            # An empty topic: nothing to serve yet.
            assert readyz(one)[0] == readyz(two)[0] == 503
            produce(broker.bootstrap, [Q(s, 1) for s in symbols])
            for core in (one, two):
                wait_ready(core)
            # Both follow the topic now: each record reaches each of them.
            produce(broker.bootstrap, [Q(s, n) for n in range(2, rounds + 1) for s in symbols])
            expected = {s: Q(s, rounds).price for s in symbols}
            for core in (one, two):
                wait_quotes(core, expected)
                for s in symbols:
                    body = http_get(core.port, f"/quotes/{s}")[1]
                    assert without_age(body)["sequence"] == rounds
                    # Every update, not only the last.
                    received = metric(core, "quotopia_core_quotes_received_total", symbol=s)
                    assert received == rounds


def test_core_started_before_the_topic_retries_until_it_appears() -> None:
    with tansu_broker() as broker, kafka_core(broker.bootstrap) as core:
        no_topic = r"Kafka unavailable: no topic quotes; retrying in"
        core.process.wait_for_line(no_topic, DEADLINE)
        first = core.process.stderr_lines.index(
            next(line for line in core.process.stderr_lines if re.search(no_topic, line))
        )
        core.process.wait_for_line(no_topic, DEADLINE, start=first + 1)
        assert readyz(core) == (503, "starting")
        assert feed(core.port)["connected"] is False
        make_topic(broker.bootstrap)
        produce(broker.bootstrap, [Q("BTC", 1)])
        wait_ready(core)
        assert quotes(core.port) == {"BTC": Q("BTC", 1).price}
        # Quietly: retries at INFO, no traceback.
        assert not [line for line in core.process.stderr_lines if "WARNING" in line]
        assert "Traceback" not in core.process.output()


def test_an_undecodable_record_is_counted_and_skipped() -> None:
    with tansu_broker() as broker:
        make_topic(broker.bootstrap, partitions=1)
        produce(broker.bootstrap, [Q("BTC", 1), b"\xff\xff\xff", Q("ETH", 1)])
        with kafka_core(broker.bootstrap) as core:
            wait_ready(core)
            assert quotes(core.port) == {"BTC": Q("BTC", 1).price, "ETH": Q("ETH", 1).price}
            assert metric(core, "quotopia_core_feed_rejected_total") == 1
            produce(broker.bootstrap, [b"\x0a\x05BT", b"", Q("BTC", 2)])
            wait_quotes(core, {"BTC": Q("BTC", 2).price, "ETH": Q("ETH", 1).price})
            # b"" decodes (every field at its default) but has no symbol.
            assert metric(core, "quotopia_core_feed_rejected_total") == 3
            skipped = [line for line in core.process.stderr_lines if "skipping a record" in line]
            assert len(skipped) == 1, core.process.output()  # then at DEBUG
            assert "WARNING" in skipped[0]
            assert "Traceback" not in core.process.output()
            assert readyz(core) == (200, "ready")


def test_a_broker_restart_takes_the_feed_down_and_core_recovers() -> None:
    symbols = ("BTC", "ETH")
    with tansu_broker() as broker:
        make_topic(broker.bootstrap)
        with (
            Ticker(broker.bootstrap, symbols) as ft,
            kafka_core(broker.bootstrap, feed_timeout=1.5) as core,
        ):
            wait_ready(core)
            ticked = ft.sent
            wait_until(lambda: ft.sent > ticked + 20, DEADLINE, what="a second of ticks")
            # Fed all along: not one reconnect, not one stall.
            assert feed(core.port) | {"last_update_age_seconds": 0} == {
                "connected": True,
                "last_update_age_seconds": 0,
                "reconnects": 0,
            }
            assert "feed lost" not in core.process.output()

            broker.kill()
            wait_until(lambda: not feed(core.port)["connected"], DEADLINE, what="feed down")
            assert metric(core, "quotopia_core_feed_connected") == 0
            # Degraded: the last prices are still served, with their age.
            assert readyz(core) == (200, "degraded")
            assert set(quotes(core.port)) == set(symbols)
            core.process.wait_for_line(r"WARNING.*feed lost: no record from Kafka", DEADLINE)
            core.process.wait_for_line(r"INFO.*Kafka unavailable: KafkaConnectionError", DEADLINE)

            # Memory storage: the broker comes back without the topic.
            ft.pause()
            broker.restart()
            core.process.wait_for_line(r"Kafka unavailable: no topic quotes", DEADLINE)
            assert readyz(core) == (200, "degraded")
            make_topic(broker.bootstrap)
            before = ft.sent
            ft.resume()
            wait_until(lambda: feed(core.port)["connected"], DEADLINE, what="feed up")
            wait_until(
                lambda: all(
                    without_age(http_get(core.port, f"/quotes/{s}")[1])["sequence"] > before
                    for s in symbols
                ),
                DEADLINE,
                what="quotes from after the restart",
            )
            assert readyz(core) == (200, "ready")
            assert metric(core, "quotopia_core_feed_connected") == 1
            assert metric(core, "quotopia_core_feed_reconnects_total") == 1
            assert feed(core.port)["reconnects"] == 1
            assert "Traceback" not in core.process.output()


@pytest.mark.parametrize("broker_gone", [False, True], ids=["following", "broker gone"])
def test_a_cancelled_session_stops_its_consumer_and_stays_cancelled(broker_gone: bool) -> None:
    """In process: cancellation reaches the caller, whether the session is reading
    or its consumer is retrying a broker that went away (where aiokafka's stop()
    lets a CancelledError of its own out)."""
    with tansu_broker() as broker:
        make_topic(broker.bootstrap, partitions=1)
        produce(broker.bootstrap, [Q("BTC", 1)])
        config = CoreConfig(source="kafka", kafka=broker.bootstrap, feed_timeout=DEADLINE)
        after_the_session: list[str] = []

        async def main() -> None:
            store = QuoteStore()
            fed = trio.Event()
            store.on_change(lambda: fed.set() if store.has_snapshot else None)
            with trio.fail_after(DEADLINE):
                async with trio_asyncio.open_loop():
                    with trio.CancelScope() as scope:

                        async def cancel_when_fed() -> None:
                            await fed.wait()
                            if broker_gone:
                                broker.kill()
                                # Long enough for fetches to fail and be retried.
                                await trio.sleep(0.5)
                            scope.cancel()

                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(cancel_when_fed)
                            await KafkaFeed()(config, store)
                            after_the_session.append("returned")
                    assert scope.cancelled_caught
                    assert store.connected  # feed_down is the supervisor's job

        trio.run(main)
        assert after_the_session == []
