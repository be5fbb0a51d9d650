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
  Refused and undecodable records are committed with the quotes before them.
- **A new group starts from the earliest record** the topic still holds: history
  wants everything that is there.
- **Rebalances**: before its partitions move, a member waits (at most half the
  session timeout, so that the group's rebalance is not held up) for the writer
  to commit what it buffered, then commits those offsets; its successor starts
  there. A commit the group refuses because it is rebalancing (``CommitFailedError``)
  is expected: it is counted, and the new owner re-reads from the last commit.
  Refused again and again (a broker restarted under the member: its generation
  is gone), the session starts over with a new consumer.
- **Backpressure as with gRPC**: a full buffer stops the reading. The member
  keeps its partitions all the same: while it waits for room it pauses them and
  goes on polling (and committing what the writer commits), so Kafka never counts
  it as stuck (``max_poll_interval_ms``), however long the database is down.
- **Silence is not a failure**: a partition may carry no symbol at all (four
  partitions, three symbols), and FT may be quiet. After ``--feed-timeout``
  without records the session asks the broker for its metadata; a broker that
  does not answer within as long ends the session, and it is retried with
  backoff, as an absent FT is. /readyz says "connected" meanwhile.
- **Drain**: on SIGTERM the reading stops, the writer commits what is buffered,
  then :meth:`KafkaFeed.finish` commits the last offsets and stops the consumer,
  which leaves the group so its partitions move at once. (Not on Tansu 0.6: its
  groups stay at generation 0, for which aiokafka sends no LeaveGroup, so they
  move after the session timeout.)
- **A new session reads again from the group's commit**: nothing read by an
  earlier session is committed by a later one (its partitions may have moved,
  or, on a broker that lost its data, be another topic's by now).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial

import anyio
import anyio.lowlevel
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError
from anyio.streams.memory import MemoryObjectSendStream
from opentelemetry.trace import SpanContext

from quotopia.bus.admin import EXPECTED_FAILURES, describe_failure, stop_consumer
from quotopia.grpc_feed import FeedStalled
from quotopia.history.queries import StoredQuote
from quotopia.quote_codec import DecodedQuote, DecodeError, decode_quote
from quotopia.recorder.config import RecorderConfig
from quotopia.recorder.metrics import RecorderMetrics
from quotopia.recorder.offsets import OffsetLedger
from quotopia.recorder.reconnect import follow
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
#: Kafka counts a member that has not polled for this long as stuck. It always
#: polls (see the backpressure note above), so this only catches a real hang.
_MAX_POLL_INTERVAL_MS = 300_000
#: How long the drain's last commit and the consumer's stop may take, in seconds.
_FINISH_TIMEOUT = 5.0
#: Commits refused in a row, as by a rebalance, before the session starts over.
_REFUSED_COMMITS = 3
#: What a commit outside the session (a rebalance's, the drain's) may raise: logged.
_COMMIT_FAILURES: tuple[type[Exception], ...] = (FeedStalled, *EXPECTED_FAILURES)


class KafkaFeed:
    """The Kafka source of one recorder: :meth:`follow` is the feed task,
    :meth:`finish` ends it once the writer is done.

    ``accept`` turns a decoded quote into its row (checked, seen by the gap
    tracker) or None if refused; the writer reports each committed batch to
    :meth:`wrote`.
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
        #: How long this member may hold up a rebalance (waiting for the writer,
        #: asking where its new partitions start): the group waits for it meanwhile.
        self._rebalance_wait = min(config.drain_timeout, session_timeout_ms / 2000)
        #: The current session's consumer; kept after a cancellation for :meth:`finish`.
        self._consumer: AIOKafkaConsumer | None = None
        #: With tracing on: (quotes buffered, the producer's span context), one entry
        #: per change of context, for the writer's batch span to link to.
        self._contexts: deque[tuple[int, SpanContext]] = deque()
        #: Offsets safe to commit and not committed yet (a refused commit keeps them).
        self._uncommitted: dict[TopicPartition, int] = {}
        self._refused_in_a_row = 0
        #: Set (and replaced) at each batch the writer commits.
        self._progress = anyio.Event()
        self._undecodable_logged = False
        self._refused_logged = False

    def wrote(self, quotes: int) -> None:
        """The writer committed a batch of ``quotes`` quotes, the oldest buffered."""
        self.ledger.wrote(quotes)
        self._progress.set()
        self._progress = anyio.Event()

    async def follow(self, send: MemoryObjectSendStream[StoredQuote]) -> None:
        """Keep a consumer in the group, reconnecting with backoff; ends by cancellation."""
        await follow(
            partial(self._session, send),
            metrics=self.metrics,
            source="Kafka",
            where=self.where,
            expected=EXPECTED_FAILURES,
            describe=describe_failure,
            backoff_cap=self.config.backoff_cap,
            fields={"topic": self.config.kafka_topic},
            after=self._drop_consumer,
        )

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
        self._forget_offsets()
        await consumer.start()
        consumer.subscribe([config.kafka_topic], listener=_Rebalances(self, consumer))
        self.metrics.feed_connected = True
        self.metrics.feed_sessions += 1
        logger.info("connected to %s", self.where)
        quiet_since = anyio.current_time()
        while True:
            batches = await self._poll(consumer, _POLL_MS)
            await self.commit(consumer)
            self._note_highwater(consumer)
            now = anyio.current_time()
            if batches:
                quiet_since = now
            elif now - quiet_since >= config.feed_timeout:
                await self._probe(consumer)
                quiet_since = now
            for partition, records in batches.items():
                for record in records:
                    await self._take(send, consumer, partition, record.offset, record.value)
                    if tracing.enabled():
                        self._note_context(record.headers)
            # getmany returns what it prefetched without yielding: let the writer run.
            await anyio.lowlevel.checkpoint()

    async def _poll(
        self, consumer: AIOKafkaConsumer, timeout_ms: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """``getmany``, bounded: a rebalance holds it, and one that cannot finish
        (the broker gone) would hold it for good."""
        with anyio.move_on_after(self.config.feed_timeout):
            batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=_POLL_RECORDS)
            return batches
        return {}

    def _forget_offsets(self) -> None:
        """Commit nothing a previous session read: its partitions may be another
        member's by now, or (a broker that lost its data) another topic's. Those
        records are read again, from the group's commit."""
        ledger: OffsetLedger[TopicPartition] = OffsetLedger()
        ledger.buffered, ledger.written = self.ledger.buffered, self.ledger.written
        self.ledger = ledger
        self._uncommitted.clear()
        self._refused_in_a_row = 0

    async def _take(
        self,
        send: MemoryObjectSendStream[StoredQuote],
        consumer: AIOKafkaConsumer,
        partition: TopicPartition,
        offset: int,
        value: bytes | None,
    ) -> None:
        """One record: decoded, checked, buffered (waiting for room), noted in the ledger."""
        try:
            quote = decode_quote(value or b"")
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
            await self._wait_for_room(send, consumer, row)
        self.ledger.read(partition, offset, buffered=True)
        received = self.metrics.received
        received[row.symbol] = received.get(row.symbol, 0) + 1

    async def _wait_for_room(
        self,
        send: MemoryObjectSendStream[StoredQuote],
        consumer: AIOKafkaConsumer,
        row: StoredQuote,
    ) -> None:
        """Buffer ``row`` once the writer has made room, polling meanwhile with every
        partition paused: the member stays in the group, and commits keep up."""
        try:
            while True:
                # Re-paused at each poll: a rebalance may have assigned new ones.
                consumer.pause(*consumer.assignment())
                for tp, records in (await self._poll(consumer, 0)).items():
                    # A partition assigned while the poll waited on a rebalance:
                    # its records are read once there is room.
                    consumer.seek(tp, records[0].offset)
                await self.commit(consumer)
                self._note_highwater(consumer)
                # Woken by the writer's next commit. send() itself is not given a
                # deadline: cut short, it could have handed the row over anyway.
                with anyio.move_on_after(_POLL_MS / 1000):
                    await self._progress.wait()
                try:
                    send.send_nowait(row)
                    return
                except anyio.WouldBlock:
                    pass
        finally:
            consumer.resume(*consumer.paused())

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
        logger.debug("no records for %gs; the broker answers: idle partitions", timeout)

    async def commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets whose quotes the writer has committed, for the
        partitions this member still holds (a revoked one's new owner re-reads
        from the last commit).

        A commit refused as by a rebalance keeps its offsets for the next try;
        refused :data:`_REFUSED_COMMITS` times in a row, it raises. Any other
        failure raises too: the session starts over.
        """
        self._uncommitted.update(self.ledger.committable())
        assigned = consumer.assignment()
        offsets = {tp: offset for tp, offset in self._uncommitted.items() if tp in assigned}
        self._uncommitted = dict(offsets)
        if not offsets:
            return
        metrics = self.metrics
        timeout = self.config.feed_timeout
        try:
            # Bounded: aiokafka retries a commit until the broker answers.
            with anyio.move_on_after(timeout) as attempt:
                await consumer.commit(offsets)
        except CommitFailedError:
            metrics.kafka_commit_failures += 1
            self._refused_in_a_row += 1
            if self._refused_in_a_row >= _REFUSED_COMMITS:
                raise
            log = logger.debug if self._refused_logged else logger.info
            log("offsets not committed: the group is rebalancing; its records may be read again")
            self._refused_logged = True
            return
        except EXPECTED_FAILURES:
            metrics.kafka_commit_failures += 1
            raise
        if attempt.cancelled_caught:
            metrics.kafka_commit_failures += 1
            raise FeedStalled(f"no answer from Kafka to an offset commit for {timeout:g}s")
        self._refused_in_a_row = 0
        metrics.kafka_commits += 1
        for tp, offset in offsets.items():
            if self._uncommitted.get(tp) == offset:
                del self._uncommitted[tp]
            metrics.kafka_committed[tp.partition] = offset

    async def _written(self, quotes: int) -> None:
        """Return once the writer has committed ``quotes`` quotes in all."""
        while self.ledger.written < quotes:
            await self._progress.wait()

    def _note_highwater(self, consumer: AIOKafkaConsumer) -> None:
        # The high-water mark of the last fetch: Tansu's end_offsets() is too low.
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is not None:
                self.metrics.kafka_highwater[tp.partition] = end

    async def _assigned(
        self, consumer: AIOKafkaConsumer, assigned: Iterable[TopicPartition]
    ) -> None:
        """Note ``assigned`` and where each starts (for the lag): the group's
        commit, or, in a group that has none, the partition's first offset."""
        partitions = sorted(assigned, key=lambda tp: tp.partition)
        metrics = self.metrics
        metrics.kafka_partitions = {tp.partition for tp in partitions}
        shown = ",".join(str(tp.partition) for tp in partitions)
        logger.info(
            "assigned partitions %s of %s",
            shown or "none",
            self.where,
            extra={"partitions": [tp.partition for tp in partitions]},
        )
        start: dict[TopicPartition, int] = {}
        with anyio.move_on_after(self._rebalance_wait):
            for tp in partitions:
                offset = await consumer.committed(tp)
                if offset is not None:
                    start[tp] = offset
            if new := [tp for tp in partitions if tp not in start]:
                start.update(await consumer.beginning_offsets(new))
        for tp, offset in start.items():
            metrics.kafka_committed.setdefault(tp.partition, offset)

    async def _revoked(self, consumer: AIOKafkaConsumer, revoked: Iterable[TopicPartition]) -> None:
        """Before ``revoked`` move: let the writer commit what is buffered (bounded),
        then commit its offsets."""
        if self.ledger.pending:
            with anyio.move_on_after(self._rebalance_wait):
                await self._written(self.ledger.buffered)
        await self.commit(consumer)
        metrics = self.metrics
        for tp in revoked:
            metrics.kafka_partitions.discard(tp.partition)
            metrics.kafka_committed.pop(tp.partition, None)
            metrics.kafka_highwater.pop(tp.partition, None)

    async def close(self) -> None:
        """Stop the consumer, if there is one, without committing (bounded, shielded)."""
        await self._drop_consumer()

    async def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        self.metrics.kafka_partitions.clear()
        self.metrics.kafka_committed.clear()
        self.metrics.kafka_highwater.clear()
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
            except _COMMIT_FAILURES as exc:
                logger.warning(
                    "last offsets not committed (%s): the group will read them again",
                    describe_failure(exc),
                )
        await self._drop_consumer()


class _Rebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    """What the member does as its partitions move (aiokafka awaits these from its
    coordinator's task, while the rebalance waits)."""

    def __init__(self, feed: KafkaFeed, consumer: AIOKafkaConsumer) -> None:
        self._feed = feed
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            await self._feed._revoked(self._consumer, revoked)
        except _COMMIT_FAILURES as exc:
            logger.info("offsets not committed at a rebalance: %s", describe_failure(exc))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self._feed._assigned(self._consumer, assigned)
        except EXPECTED_FAILURES as exc:
            logger.debug("no committed offsets for the lag: %s", describe_failure(exc))
