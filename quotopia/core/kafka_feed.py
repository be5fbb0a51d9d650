"""Core's feed from the Kafka topic (``--source kafka``): one session, like gRPC's.

Every Core replica reads *every* quote, as from FT's stream: a broadcast, not a
queue. So the consumer has no group (nothing is committed, no broker-side state
per replica, no rebalancing) and assigns itself every partition of the topic. A
topic that does not exist yet is :class:`~quotopia.core.feed.FeedUnavailable`,
retried with the same backoff as an absent FT.

**How Core finds the latest quotes at start.** A record is one quote, keyed by
symbol, so each symbol's quotes are in one partition, in order. For each
partition the session asks for the first and the end offset and starts reading at
``max(first, end - kafka_replay)``; it reads forward, keeping only the newest
quote per symbol, until it reaches, on every partition, the high-water mark the
first fetch reported. Then it puts those quotes into the store at once, as the
snapshot of a gRPC stream would be (so they count for readiness, not for the
delivery latency), and follows the topic from there.

- *Readiness* comes with that snapshot: until every partition has been read up to
  its high-water mark, ``/readyz`` says ``starting``. An empty topic (or one with
  nothing newer than what Core holds) has no snapshot: the first new quote is it.
- *The end offset may be low.* Tansu 0.6 answers ListOffsets(latest) with the
  base offset of the partition's last batch plus one. Starting early only replays
  a few more records, so the end offset is used only for where to start; where to
  stop is the high-water mark of a fetch, which is right.
- *The cost* is at most ``kafka_replay`` records per partition per session,
  whatever the topic's length, taken 500 at a time: about 10 µs a record here
  (5,000 records, consumer start included, in 40 ms). A symbol whose last quote
  is further back than that in its partition is not found: Core serves it from
  its next quote on. FT publishes every symbol every tick, so with
  ``kafka_replay`` above the symbols per partition only a symbol FT no longer
  publishes is missed.
- *Nothing older overwrites something newer.* A quote is applied only if it is
  newer than the one Core holds for its symbol (:func:`is_newer`): within one FT
  run (``run_id``) a higher ``sequence``; across runs, a later ``time``. So a
  reconnect's replay, or a duplicate or reordered record from a producer's
  retry, is skipped.

**Reconnects.** Every session starts as above: nothing is resumed from an
offset, so a topic made anew (a broker with memory storage restarted: the topic
is gone until FT creates it again, its offsets start again from 0) needs nothing
special. What a session replays that Core already has is skipped; what was
published meanwhile is applied as the snapshot. The feed counts as connected
(``quotopia_core_feed_connected``, ``/health``) from that snapshot, or, if there
is nothing new, from the first new record: a broker that answers, with an FT
that publishes nothing, is no feed.

**Freshness.** ``fetch_max_wait_ms`` is 10 (see :data:`FETCH_MAX_WAIT_MS`).

**Staleness.** As with gRPC, a deadline of ``feed_timeout`` seconds covers the
whole session, connecting included, and every gap between two records: a broker
that is gone (aiokafka retries it quietly, forever) or an FT that stopped
publishing is :class:`~quotopia.grpc_feed.FeedStalled`, and the feed is down.

Undecodable records are skipped and counted (:attr:`KafkaFeed.rejected`); the
first is logged at WARNING, the rest at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import trio_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition

from quotopia.bus.admin import stop_consumer
from quotopia.core.config import CoreConfig
from quotopia.core.feed import FeedUnavailable, feed_origin
from quotopia.core.store import QuoteStore
from quotopia.grpc_feed import FeedStalled
from quotopia.quote_codec import DecodedQuote, DecodeError, decode_quote, time_of

__all__ = ["FETCH_MAX_WAIT_MS", "KafkaFeed", "is_newer"]

logger = logging.getLogger("quotopia.core")

#: How long the broker may hold a fetch that finds too little data, in ms. Tansu
#: answers such a fetch only when this has passed, so it bounds the delay of
#: every quote: aiokafka's default (500) would make quotes half a second late;
#: 10 measured a p99 of about 8.5 ms from produce to Core, for one fetch request
#: per 10 ms while the topic is idle.
FETCH_MAX_WAIT_MS = 10
#: How long one poll waits for records while catching up, in ms: short, since a
#: partition with nothing to read reports its high-water mark with no records.
_CATCH_UP_POLL_MS = 20
#: Records taken per poll, at most: however long the replay, the work between two
#: polls, and the records held at once, stay bounded.
_POLL_RECORDS = 500
#: How long one poll waits for records once caught up, in ms. Records end the wait
#: as they come; this only bounds how long a poll may hold the loop's attention.
_FOLLOW_POLL_MS = 1000
_CLIENT_ID = "quotopia-core"


def is_newer(quote: DecodedQuote, held: DecodedQuote | None) -> bool:
    """Whether ``quote`` should replace ``held``, the quote held for its symbol.

    One FT run numbers its quotes: within a run, the higher ``sequence`` is newer.
    Across runs (or without a run id) the later ``time`` is, the sequence breaking
    a tie. Without a time to compare, the later record wins.
    """
    if held is None:
        return True
    if quote.run_id != 0 and quote.run_id == held.run_id:
        return quote.sequence > held.sequence
    if quote.time_us is None or held.time_us is None:
        return True
    return (quote.time_us, quote.sequence) > (held.time_us, held.sequence)


class KafkaFeed:
    """The Kafka source: a :data:`~quotopia.core.feed.Session` for
    :func:`~quotopia.core.feed.supervise_feed`, called once per session.

    It keeps, across sessions, the newest quote it applied per symbol (to skip
    what a reconnect replays) and the count of undecodable records, so use one
    per :class:`~quotopia.core.store.QuoteStore`. Each call needs a running
    trio-asyncio loop.

    Resource handling: each session starts its own consumer and stops it before
    it returns, whatever ends it (cancellation included).

    Error handling: a broker that refuses or is unreachable raises one of
    :data:`quotopia.bus.admin.EXPECTED_FAILURES`; an absent topic
    :class:`~quotopia.core.feed.FeedUnavailable`; no record for ``feed_timeout``
    seconds :class:`~quotopia.grpc_feed.FeedStalled`.
    """

    def __init__(self) -> None:
        #: Records skipped because their value is no ``Quote``.
        self.rejected = 0
        #: Whether the broker answered the latest session's start (its metadata
        #: and offsets): what tells a lost broker from a topic with no news,
        #: since both end a session as FeedStalled.
        self.answered = False
        self._held: dict[str, DecodedQuote] = {}

    async def __call__(self, config: CoreConfig, store: QuoteStore) -> None:
        """Run one session from Trio (requires a running trio-asyncio loop)."""
        await trio_asyncio.aio_as_trio(self._session)(config, store)

    async def _session(self, config: CoreConfig, store: QuoteStore) -> None:
        """One session, entirely on the asyncio side (aiokafka is asyncio-only)."""
        topic = config.kafka_topic
        loop = asyncio.get_running_loop()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=config.kafka,
            client_id=_CLIENT_ID,
            group_id=None,
            enable_auto_commit=False,
            # Out of range: the records we were at were deleted (retention), or
            # the topic was made anew. Either way, read what is there.
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        deadline = asyncio.timeout(config.feed_timeout)

        def fed() -> None:
            deadline.reschedule(loop.time() + config.feed_timeout)

        try:
            async with deadline:
                try:
                    # Bootstrapping fetches every topic's metadata.
                    await consumer.start()
                    partitions = consumer.partitions_for_topic(topic)
                    if not partitions:
                        raise FeedUnavailable(f"no topic {topic}")
                    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
                    consumer.assign(assigned)
                    first = await consumer.beginning_offsets(assigned)
                    end = await consumer.end_offsets(assigned)
                except FeedUnavailable:
                    self.answered = True  # it answered: there is no such topic
                    raise
                except BaseException:
                    # Refused, unreachable, or silent until the deadline (which
                    # cancels: hence BaseException; it is raised again).
                    self.answered = False
                    raise
                self.answered = True
                for tp in assigned:
                    consumer.seek(tp, max(first[tp], end[tp] - config.kafka_replay))
                snapshot = await self._catch_up(consumer, assigned, fed)
                up = False
                if snapshot:
                    self._feed_up(config, store, len(assigned), len(snapshot))
                    up = True
                    for quote, time in snapshot:
                        self._apply(store, quote, time)
                while True:
                    batches = await consumer.getmany(
                        timeout_ms=_FOLLOW_POLL_MS, max_records=_POLL_RECORDS
                    )
                    for records in batches.values():
                        fed()
                        for quote, time in self._decode_all(records):
                            if not is_newer(quote, self._held.get(quote.symbol.upper())):
                                continue
                            if not up:
                                self._feed_up(config, store, len(assigned), None)
                                up = True
                            self._apply(store, quote, time)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise FeedStalled(
                f"no record from Kafka topic {topic} for {config.feed_timeout:g}s"
            ) from None
        finally:
            await stop_consumer(consumer)

    async def _catch_up(
        self,
        consumer: AIOKafkaConsumer,
        assigned: list[TopicPartition],
        fed: Callable[[], None],
    ) -> list[tuple[DecodedQuote, datetime | None]]:
        """Read every partition up to the high-water mark its first fetch reported;
        return the quotes newer than what is held, the newest per symbol."""
        targets: dict[TopicPartition, int] = {}
        pending = set(assigned)
        newest: dict[str, tuple[DecodedQuote, datetime | None]] = {}
        while pending:
            batches = await consumer.getmany(
                *pending, timeout_ms=_CATCH_UP_POLL_MS, max_records=_POLL_RECORDS
            )
            for records in batches.values():
                fed()
                for quote, time in self._decode_all(records):
                    key = quote.symbol.upper()
                    found = newest.get(key)
                    if is_newer(quote, found[0] if found else self._held.get(key)):
                        newest[key] = (quote, time)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue  # not fetched yet
                target = targets.setdefault(tp, highwater)
                if await consumer.position(tp) >= target:
                    pending.discard(tp)
        return [newest[key] for key in sorted(newest)]

    def _feed_up(
        self, config: CoreConfig, store: QuoteStore, partitions: int, snapshot: int | None
    ) -> None:
        store.feed_up(snapshot)
        origin = feed_origin(config)
        fields = {**origin.fields, "partitions": partitions}
        if snapshot is None:
            logger.info("reading %s (partitions: %d)", origin.where, partitions, extra=fields)
        else:
            logger.info(
                "reading %s (partitions: %d), caught up (symbols: %d)",
                origin.where,
                partitions,
                snapshot,
                extra={**fields, "symbols": snapshot},
            )

    def _apply(self, store: QuoteStore, quote: DecodedQuote, time: datetime | None) -> None:
        self._held[quote.symbol.upper()] = quote
        store.apply(quote.symbol, quote.price, time, quote.change_percent, quote.sequence)

    def _decode_all(self, records: Iterable[Any]) -> Iterable[tuple[DecodedQuote, datetime | None]]:
        """The quotes of ``records``, in order; undecodable ones counted and skipped."""
        for record in records:
            try:
                if record.value is None:
                    raise DecodeError("no value")
                quote = decode_quote(record.value)
                if not quote.symbol:
                    raise DecodeError("no symbol")
                time = None if quote.time_us is None else time_of(quote.time_us)
            except (DecodeError, OverflowError) as exc:
                self._reject(record, exc)
                continue
            yield quote, time

    def _reject(self, record: Any, exc: Exception) -> None:
        self.rejected += 1
        level = logging.WARNING if self.rejected == 1 else logging.DEBUG
        logger.log(
            level,
            "skipping a record that is no quote (partition %d, offset %d): %s%s",
            record.partition,
            record.offset,
            exc,
            "; further ones are logged at DEBUG" if level == logging.WARNING else "",
            extra={"partition": record.partition, "offset": record.offset},
        )
