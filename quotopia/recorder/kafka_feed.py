"""The recorder's feed from the Kafka topic (``--source kafka``): a work queue.

Recorders in one consumer group (``--kafka-group``, ``quotopia-recorder``) share
the topic's partitions: Kafka's group coordinator gives each member some of
them and moves them when a member comes or goes, so each quote is written by one
recorder. (Core reads the same topic as a broadcast: see docs/kafka.md.)

::

    broker ── getmany ──▶ decode, check, gaps ──▶ buffer ──▶ writer ──▶ database
                 ▲                                   │ ledger: n quotes buffered ...
                 └──── commit offsets ◀──────────────┘ ... n quotes written

- **Offsets are committed after the database commit** (:mod:`.offsets`): at
  least once, and exactly once in effect, since the insert keeps one row per
  ``(symbol, run_id, sequence)``. A crash, a rebalance or a failed commit means
  some records are read again, counted as duplicates, never stored twice.
- **A new group starts from the earliest record** the topic still holds: history
  wants everything that is there.
- **Backpressure as with gRPC**: a full buffer stops the reading. The consumer
  keeps its heartbeats (aiokafka sends them from a task of its own); past
  ``max_poll_interval_ms`` (10 minutes here) without a read, Kafka counts the
  member as stuck and hands its partitions to the others, and it rejoins when it
  reads again.
- **Silence is not a failure**: a partition may carry no symbol at all (four
  partitions, three symbols), and FT may be quiet. After ``--feed-timeout``
  without records the session asks the broker for its metadata; a broker that
  does not answer within as long ends the session, and it is retried with
  backoff, as an absent FT is.
- **Drain**: on SIGTERM the reading stops, the writer commits what is buffered,
  then :meth:`KafkaFeed.finish` commits the last offsets and stops the consumer,
  which leaves the group so its partitions move at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import anyio
import anyio.lowlevel
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry.trace import SpanContext

from quotopia.backoff import Backoff
from quotopia.bus.admin import EXPECTED_FAILURES, describe_failure, stop_consumer
from quotopia.grpc_feed import FeedStalled
from quotopia.history.queries import StoredQuote
from quotopia.quote_codec import DecodedQuote, DecodeError, decode_quote
from quotopia.recorder.config import RecorderConfig
from quotopia.recorder.metrics import RecorderMetrics
from quotopia.recorder.offsets import OffsetLedger
from quotopia.telemetry import tracing

__all__ = ["KafkaFeed"]

logger = logging.getLogger("quotopia.recorder")

#: How long the broker may hold a fetch that finds too little data, in ms (Tansu
#: always waits this long then): history is written in 0.2 s batches anyway.
FETCH_MAX_WAIT_MS = 100
#: Records taken per poll, at most.
_POLL_RECORDS = 500
#: How long one poll waits for records, in ms; between polls, offsets are committed.
_POLL_MS = 200
#: A member that has not read for this long is counted as stuck by Kafka.
_MAX_POLL_INTERVAL_MS = 600_000
#: How long the drain's last commit and the consumer's stop may take, in seconds.
_FINISH_TIMEOUT = 5.0


class KafkaFeed:
    """The Kafka source of one recorder: :meth:`follow` is the feed task,
    :meth:`finish` ends it once the writer is done.

    ``accept`` turns a decoded quote into its row (checked, seen by the gap
    tracker) or None if refused; the writer reports each committed batch to
    :attr:`ledger`.
    """

    def __init__(
        self,
        config: RecorderConfig,
        metrics: RecorderMetrics,
        accept: Callable[[DecodedQuote], StoredQuote | None],
        *,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
    ) -> None:
        assert config.kafka is not None
        self.config = config
        self.metrics = metrics
        metrics.kafka = True
        self.accept = accept
        self.ledger: OffsetLedger[TopicPartition] = OffsetLedger()
        self.where = (
            f"Kafka topic {config.kafka_topic} at {config.kafka}, group {config.kafka_group}"
        )
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        #: The current session's consumer; kept after a cancellation for :meth:`finish`.
        self._consumer: AIOKafkaConsumer | None = None
        #: With tracing on: (quotes buffered, the producer's span context), one entry
        #: per change of context, for the writer's batch span to link to.
        self._contexts: deque[tuple[int, SpanContext]] = deque()
        #: Per partition, the next offset to read (for the lag).
        self._next: dict[TopicPartition, int] = {}
        self._undecodable_logged = False

    async def follow(self, send: MemoryObjectSendStream[StoredQuote]) -> None:
        """Keep a consumer in the group, reconnecting with backoff; ends by cancellation."""
        backoff = Backoff(0.1, self.config.backoff_cap)
        logger.info("connecting to %s", self.where)
        while True:
            before = sum(self.metrics.received.values())
            try:
                await self._session(send)
            except FeedStalled as exc:
                reason = str(exc)
            except EXPECTED_FAILURES as exc:
                reason = describe_failure(exc)
            await self._drop_consumer()
            was_connected, self.metrics.feed_connected = self.metrics.feed_connected, False
            if sum(self.metrics.received.values()) > before:
                backoff.reset()
            delay = backoff.next_delay()
            fields = {"reason": reason, "delay": round(delay, 3)}
            if was_connected:
                logger.warning("feed lost: %s; retrying in %.2fs", reason, delay, extra=fields)
            else:
                logger.info("Kafka unavailable: %s; retrying in %.2fs", reason, delay, extra=fields)
            await anyio.sleep(delay)

    async def _session(self, send: MemoryObjectSendStream[StoredQuote]) -> None:
        config = self.config
        consumer = AIOKafkaConsumer(
            bootstrap_servers=config.kafka,
            client_id="quotopia-recorder",
            group_id=config.kafka_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            max_poll_interval_ms=_MAX_POLL_INTERVAL_MS,
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
        )
        self._consumer = consumer
        await consumer.start()
        consumer.subscribe([config.kafka_topic], listener=_CommitOnRevoke(self, consumer))
        self.metrics.feed_connected = True
        self.metrics.feed_sessions += 1
        logger.info("connected to %s", self.where)
        quiet_since = anyio.current_time()
        while True:
            batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_POLL_RECORDS)
            await self.commit(consumer)
            now = anyio.current_time()
            if not batches:
                if now - quiet_since >= config.feed_timeout:
                    await self._probe(consumer)
                    quiet_since = now
                continue
            quiet_since = now
            for partition, records in batches.items():
                for record in records:
                    await self._take(send, partition, record.offset, record.value or b"")
                    if tracing.enabled():
                        self._note_context(record.headers)
                self._next[partition] = records[-1].offset + 1
            self._update_lag(consumer)
            # getmany returns what it prefetched without yielding: let the writer run.
            await anyio.lowlevel.checkpoint()

    async def _take(
        self,
        send: MemoryObjectSendStream[StoredQuote],
        partition: TopicPartition,
        offset: int,
        value: bytes,
    ) -> None:
        """One record: decoded, checked, buffered (waiting for room), noted in the ledger."""
        try:
            quote = decode_quote(value)
        except DecodeError as exc:
            self.metrics.rejected += 1
            log = logger.debug if self._undecodable_logged else logger.warning
            log("skipped an undecodable record at %s offset %d: %s", partition, offset, exc)
            self._undecodable_logged = True
            self.ledger.read(partition, offset, buffered=False)
            return
        row = self.accept(quote)
        if row is None:
            self.ledger.read(partition, offset, buffered=False)
            return
        try:
            send.send_nowait(row)
        except anyio.WouldBlock:
            await send.send(row)
        self.ledger.read(partition, offset, buffered=True)
        received = self.metrics.received
        received[row.symbol] = received.get(row.symbol, 0) + 1

    def _note_context(self, headers: tracing.KafkaHeaders | None) -> None:
        context = tracing.context_from_kafka_headers(headers)
        if context is None:
            return
        contexts = self._contexts
        if contexts and contexts[-1][1] == context:
            return  # the records of one producer batch share its span
        contexts.append((self.ledger.buffered, context))

    def contexts_until(self, buffered: int) -> list[SpanContext]:
        """The producer span contexts of the quotes buffered up to ``buffered``,
        forgotten once returned: the writer's batch links to them."""
        found: list[SpanContext] = []
        contexts = self._contexts
        while contexts and contexts[0][0] <= buffered:
            found.append(contexts.popleft()[1])
        return found

    async def _probe(self, consumer: AIOKafkaConsumer) -> None:
        """After a quiet spell: raise FeedStalled unless the broker answers."""
        timeout = self.config.feed_timeout
        with anyio.move_on_after(timeout) as probe:
            await consumer.topics()
        if probe.cancelled_caught:
            raise FeedStalled(f"no answer from Kafka for {timeout:g}s")

    async def commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets whose quotes the writer has committed (those of the
        partitions this member still has)."""
        ready = self.ledger.committable()
        if not ready:
            return
        assigned = consumer.assignment()
        mine = {partition: offset for partition, offset in ready.items() if partition in assigned}
        if mine:
            await consumer.commit(mine)
            self.metrics.kafka_commits += 1

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        lag = 0
        for partition in consumer.assignment():
            end, position = consumer.highwater(partition), self._next.get(partition)
            if end is not None and position is not None:
                lag += max(0, end - position)
        self.metrics.kafka_lag = lag

    async def close(self) -> None:
        """Stop the consumer, if there is one, without committing (bounded, shielded)."""
        await self._drop_consumer()

    async def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
                await stop_consumer(consumer)

    async def finish(self) -> None:
        """After the writer's drain: commit the last offsets, then stop the consumer
        (it leaves the group). Bounded in time; a failed commit is logged, the next
        member re-reads those records."""
        consumer = self._consumer
        if consumer is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
            try:
                await self.commit(consumer)
            except EXPECTED_FAILURES as exc:
                logger.warning(
                    "last offsets not committed (%s): the group will read them again",
                    describe_failure(exc),
                )
        await self._drop_consumer()


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commit what is committable before partitions move to another member, so it
    re-reads as little as possible."""

    def __init__(self, feed: KafkaFeed, consumer: AIOKafkaConsumer) -> None:
        self._feed = feed
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            await self._feed.commit(self._consumer)
        except EXPECTED_FAILURES as exc:
            logger.info("offsets not committed at a rebalance: %s", describe_failure(exc))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        shown = ",".join(str(p.partition) for p in sorted(assigned, key=lambda p: p.partition))
        logger.info("assigned partitions %s of %s", shown or "none", self._feed.where)
