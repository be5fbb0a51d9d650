"""FT's Kafka side: every quote also goes to a topic, and a broker never holds FT up.

::

    generator ── publish(tick) ──▶ buffer (bounded, drop-oldest) ──▶ sender task ──▶ broker
      (never waits)                 --kafka-buffer quotes             one producer per session

The generator calls :meth:`KafkaPublisher.publish` once per tick, as it calls the
broadcaster's: it appends the tick's ready-made bytes to a bounded buffer and
returns. A task of FT's own takes batches from the buffer and hands them to an
aiokafka producer, then waits for the broker's acknowledgement of the batch
before it takes the next, so at most one batch per session is in flight and the
buffer holds everything else.

``--kafka-buffer`` bounds everything FT holds for the broker: the buffer and the
batch in flight together. A batch takes at most half of it (and at most
BATCH_SIZE), so however long the broker takes to answer, the newest quotes
always have room.

The policy for a slow or absent broker (what a demanding operator needs to know):

- *Buffer, then drop the oldest.* While the broker is away, quotes wait in the
  buffer. Once FT holds ``--kafka-buffer`` quotes, each new quote pushes out the
  oldest one still in the buffer (a batch in the producer's hands cannot be
  recalled): when the broker comes back, the newest prices are the ones that
  reach it. Every dropped quote is counted (``quotopia_ft_kafka_quotes_dropped_total``);
  the recorder sees the hole as a gap in the sequence numbers. While a batch is
  in flight the quotes pushed out are the ones just after it, so a consumer may
  see a second, small gap there, besides the one at the start of the outage.
- *Retry the batch.* A batch the broker did not acknowledge goes back to the front
  of the buffer, in order, and the session starts over with backoff (0.1 s
  doubling to 5 s). aiokafka sends one batch per partition at a time, so order
  within a symbol holds. Without the idempotent producer a retried batch may be
  written twice; every consumer keys quotes by ``(symbol, run_id, sequence)``, so a
  duplicate is harmless.
- *Never block the tick.* Nothing on the tick's path awaits the broker; gRPC
  subscribers are served as before.

The producer: ``acks=all`` (the record is on every in-sync replica before it
counts as sent) and, unless ``--no-kafka-idempotence``, Kafka's idempotent
producer (the broker drops duplicates from retries). Tansu 0.6, the broker the
tests run, refuses aiokafka's idempotent handshake (``InitProducerId`` v0), so
there FT runs with idempotence off.

On shutdown FT stops ticking, then :meth:`KafkaPublisher.flush` gives the buffer
the drain deadline to reach the broker; what is left is counted as dropped and
logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

import anyio
from aiokafka import AIOKafkaProducer
from anyio.abc import TaskStatus
from opentelemetry.trace import SpanContext, SpanKind

from quotopia.backoff import Backoff
from quotopia.bus.admin import EXPECTED_FAILURES, describe_failure, ensure_topic
from quotopia.bus.topic import record_key
from quotopia.ft.config import FTConfig
from quotopia.ft.wire import EncodedQuote
from quotopia.telemetry import tracing
from quotopia.telemetry.metrics import FastHistogram

__all__ = ["KafkaPublisher"]

logger = logging.getLogger("quotopia.ft")

#: Quotes handed to the producer at once, at most: one send call each, then one
#: wait for all their acknowledgements.
BATCH_SIZE = 1000
#: How long the producer waits for the broker's answer to one request, in ms;
#: past it the batch fails and is retried. Short, so a dead broker is noticed
#: (and stopping the producer is bounded) in seconds, not aiokafka's 40.
REQUEST_TIMEOUT_MS = 5000
#: How long stopping a producer may take, in seconds (it waits for its batch).
_STOP_TIMEOUT = REQUEST_TIMEOUT_MS / 1000 + 1

_tracer = tracing.tracer("quotopia.ft")


class KafkaPublisher:
    """The buffer between FT's ticks and a Kafka producer, and the task that drains it.

    :meth:`publish` runs on FT's event loop, from the generator; :meth:`run` is a
    task in FT's task group. The numbers are plain attributes, collected by
    :class:`~quotopia.ft.metrics.FTMetrics` at scrape time.
    """

    def __init__(self, config: FTConfig) -> None:
        assert config.kafka is not None
        self.bootstrap = config.kafka
        self.topic = config.kafka_topic
        self._config = config
        # Each quote with the span context of the tick that made it (None while
        # tracing is off), so the batch that sends it can link to that tick.
        self._buffer: deque[tuple[EncodedQuote, SpanContext | None]] = deque()
        self.capacity = config.kafka_buffer
        #: Quotes handed to the producer at once: at most half the capacity, so a
        #: batch in flight leaves the other half to the newest quotes.
        self.batch_size = max(1, min(BATCH_SIZE, self.capacity // 2))
        self._wakeup = anyio.Event()
        self._flushed = anyio.Event()
        self._closed = False
        #: Quotes in the producer's hands, not yet acknowledged.
        self.in_flight = 0
        #: Whether a producer is connected now.
        self.connected = False
        #: Quotes the broker acknowledged.
        self.sent = 0
        #: Quotes dropped: pushed out of a full buffer, or left at shutdown.
        self.dropped = 0
        #: Sessions that ended in a failure (a batch not acknowledged, a lost broker).
        self.failures = 0
        #: Generation of a quote to the broker's acknowledgement.
        self.ack_latency = FastHistogram()

    @property
    def buffered(self) -> int:
        """Quotes waiting in the buffer (the batch in flight not included)."""
        return len(self._buffer)

    def publish(self, tick: Sequence[EncodedQuote], context: SpanContext | None = None) -> None:
        """Queue one tick's quotes for the broker; never waits. ``context`` is the
        tick's span (tracing on), which the batch that sends them links to.

        Past the capacity (the batch in flight counts), the oldest buffered quotes
        are dropped to make room (see the module's docstring).
        """
        if self._closed:
            return
        buffer = self._buffer
        buffer.extend([(quote, context) for quote in tick])
        # Never more than len(buffer): the batch in flight is at most half the capacity.
        excess = len(buffer) + self.in_flight - self.capacity
        if excess > 0:
            for _ in range(excess):
                buffer.popleft()
            self.dropped += excess
        self._wakeup.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send the buffer to the broker forever, reconnecting with backoff.

        Returns only by cancellation. Error handling: what a broker that is away
        or restarting raises (:data:`~quotopia.bus.admin.EXPECTED_FAILURES`) is one
        WARNING at the first failure of an outage (DEBUG for the retries that
        follow) and a retry; anything else is a bug and propagates.
        """
        backoff = Backoff(0.1, 5.0)
        task_status.started()
        where = f"Kafka topic {self.topic} at {self.bootstrap}"
        logger.info("publishing to %s", where, extra={"topic": self.topic})
        reported = False
        while True:
            sent = self.sent
            try:
                await self._session()
            except EXPECTED_FAILURES as exc:
                reason = describe_failure(exc)
            was_connected, self.connected = self.connected, False
            self.failures += 1
            if self.sent > sent:
                backoff.reset()
            delay = backoff.next_delay()
            fields = {"reason": reason, "delay": round(delay, 3), "topic": self.topic}
            if was_connected or not reported:
                # The first failure of an outage is news; the retries that follow are not.
                logger.warning(
                    "%s unavailable: %s; %d quotes buffered, retrying in %.2fs",
                    where,
                    reason,
                    self.buffered,
                    delay,
                    extra=fields,
                )
                reported = True
            else:
                logger.debug("%s still unavailable: %s", where, reason, extra=fields)
            await anyio.sleep(delay)

    async def _session(self) -> None:
        """One producer: create the topic if missing, then send batches until a failure."""
        config = self._config
        await ensure_topic(
            self.bootstrap,
            self.topic,
            partitions=config.kafka_partitions,
            replication=config.kafka_replication,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id="quotopia-ft",
            acks="all",
            enable_idempotence=config.kafka_idempotence,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        try:
            # Inside the try: a start that fails half-way still has connections to close.
            await producer.start()
            self.connected = True
            logger.info("connected to Kafka at %s", self.bootstrap)
            while True:
                await self._send_batch(producer)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_TIMEOUT):
                await producer.stop()

    async def _send_batch(self, producer: AIOKafkaProducer) -> None:
        """Wait for quotes, hand up to :attr:`batch_size` of them to ``producer``, and wait
        until the broker acknowledged them all; on a failure, put back what was not
        acknowledged, in order, and raise."""
        buffer = self._buffer
        while not buffer:
            if self._closed:
                self._flushed.set()
                await anyio.sleep_forever()
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        batch = [buffer.popleft() for _ in range(min(self.batch_size, len(buffer)))]
        self.in_flight = len(batch)
        acked = 0
        try:
            if tracing.enabled():
                links = tracing.links_to(context for _, context in batch)
                with _tracer.start_as_current_span(
                    f"send {self.topic}",
                    context=tracing.batch_parent(links),
                    kind=SpanKind.PRODUCER,
                    links=links,
                    attributes={
                        "messaging.system": "kafka",
                        "messaging.destination.name": self.topic,
                        "messaging.operation.type": "send",
                        "messaging.operation.name": "send",
                        "messaging.batch.message_count": len(batch),
                    },
                ):
                    futures = await self._send(producer, batch, tracing.kafka_headers())
            else:
                futures = await self._send(producer, batch, None)
            # Acknowledgements come in order within a partition; wait for them all,
            # and note where the first failure is.
            failed: BaseException | None = None
            for future in futures:
                try:
                    await future
                except EXPECTED_FAILURES as exc:
                    failed = failed or exc
                    continue
                if failed is None:
                    acked += 1
            if failed is not None:
                raise failed
        finally:
            self._account(batch, acked)

    async def _send(
        self,
        producer: AIOKafkaProducer,
        batch: list[tuple[EncodedQuote, SpanContext | None]],
        headers: list[tuple[str, bytes]] | None,
    ) -> list[asyncio.Future[object]]:
        """Hand ``batch`` to the producer, each record with ``headers`` (the send
        span's trace context); return the acknowledgements to wait for."""
        topic = self.topic
        return [
            await producer.send(topic, quote.payload, key=record_key(quote.symbol), headers=headers)
            for quote, _ in batch
        ]

    def _account(self, batch: list[tuple[EncodedQuote, SpanContext | None]], acked: int) -> None:
        """Count the first ``acked`` quotes of ``batch`` as sent; the rest go back to
        the front of the buffer (the oldest first), within its capacity."""
        self.in_flight = 0
        self.sent += acked
        now = time.monotonic()  # the clock of EncodedQuote.generated_at
        latency = self.ack_latency
        for quote, _ in batch[:acked]:
            latency.observe(now - quote.generated_at)
        unsent = batch[acked:]
        if not unsent:
            return
        room = self.capacity - len(self._buffer)
        keep = unsent[len(unsent) - room :] if room < len(unsent) else unsent
        self.dropped += len(unsent) - len(keep)
        self._buffer.extendleft(reversed(keep))

    def close(self) -> None:
        """Take no more quotes (FT is shutting down); :meth:`flush` waits for the rest."""
        self._closed = True
        if not self._buffer and not self.in_flight:
            self._flushed.set()
        self._wakeup.set()

    async def flush(self) -> None:
        """After :meth:`close`, wait until the buffer reached the broker.

        Bound it with a cancel scope (FT uses the drain deadline); cancelled, it
        counts the quotes left as dropped and logs how many.
        """
        try:
            await self._flushed.wait()
        finally:
            left = len(self._buffer) + self.in_flight
            if left:
                self.dropped += left
                logger.warning(
                    "%d quotes not published to Kafka before shutdown",
                    left,
                    extra={"quotes": left},
                )
