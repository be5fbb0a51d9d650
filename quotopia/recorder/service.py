"""The recorder's task tree: the feed, the batch writer, retention, the endpoint.

::

    quotopia recorder ── anyio.run(backend="asyncio")
      shutdown_on_signals ...... SIGTERM/SIGINT → shutdown_trigger returns
        serve() ── outer task group
          ├─ metrics endpoint .. /metrics, /livez, /readyz on --metrics-port (hypercorn)
          └─ task group
              ├─ stop watcher .. shutdown_trigger → ``stopping`` is set
              └─ _record()
                   start: migrate (or wait for the schema), seed the gap tracker;
                          retried with backoff, cut short by ``stopping``
                   ├─ writer ..... buffer → batches → one transaction each
                   ├─ retention .. (with --retention) small deletes, every minute
                   └─ feed ....... FT's stream → checks, gaps → buffer (bounded);
                                   or, with --source kafka, the consumer group
                                   (quotopia.recorder.kafka_feed), whose offsets
                                   are committed after the writer's commits

The buffer between the feed and the writer is a bounded memory stream. While the
database is slow or down the writer holds its batch and retries; the buffer
fills, the feed stops reading, HTTP/2 flow control stops FT's writes to this
stream, and FT's own policy takes over (conflation, then a slow-consumer
disconnect). Whatever that skips shows as a gap in the sequence numbers.

The drain on shutdown: /readyz answers "draining", the feed is cancelled, and the
writer commits what the buffer holds, for at most ``drain_timeout``. A batch the
deadline catches in the database finishes its transaction first (a worker
thread is not interrupted): it is committed or rolled back, never half-written.
The endpoint stops last.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import URL
from sqlalchemy.exc import InterfaceError, OperationalError

from quotopia._proto import StreamQuotesRequest
from quotopia.backoff import Backoff
from quotopia.contract import STREAM_QUOTES
from quotopia.grpc_feed import EXPECTED_FAILURES, FeedEnded, FeedStalled, describe_failure
from quotopia.history.database import (
    Database,
    current_revision,
    describe_url,
    head_revision,
    parse_database_url,
    upgrade,
)
from quotopia.history.queries import (
    StoredQuote,
    delete_before,
    insert_quotes,
    latest_per_symbol,
    symbols,
)
from quotopia.history.schema import SYMBOL_LENGTH
from quotopia.quote_codec import DecodedQuote, DecodeError, decode_quote
from quotopia.recorder.config import RecorderConfig
from quotopia.recorder.gaps import Gap, GapTracker
from quotopia.recorder.kafka_feed import KafkaFeed
from quotopia.recorder.metrics import RecorderMetrics
from quotopia.recorder.reconnect import follow
from quotopia.telemetry import tracing
from quotopia.telemetry.endpoint import TelemetryApp, serve_endpoint
from quotopia.telemetry.probes import Lifecycle, ProbeAnswer

__all__ = ["serve", "storable_row"]

logger = logging.getLogger("quotopia.recorder")

_tracer = tracing.tracer("quotopia.recorder")

#: What a database that is down or restarting raises: retried, logged without a traceback.
DATABASE_DOWN: tuple[type[Exception], ...] = (OperationalError, InterfaceError)

_MAX_INT64 = 2**63 - 1


class _NotMigrated(Exception):
    """The schema is not (yet) at the revision this recorder writes."""


#: Quotes taken off the feed between two checkpoints, at most.
_CHECKPOINT_EVERY = 256

#: What keeps the recorder from starting, for now: retried with backoff.
_NOT_READY: tuple[type[Exception], ...] = (*DATABASE_DOWN, _NotMigrated)


async def serve(
    config: RecorderConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Record FT's quotes until ``shutdown_trigger`` returns (then drain) or until cancelled.

    Calls ``task_status.started(port)`` once the metrics endpoint listens, with its
    real port; /readyz turns 200 once the schema is in place and recording began.
    Must run on AnyIO's asyncio backend: grpclib is asyncio-only.
    """
    url = parse_database_url(config.database)
    assert url is not None  # RecorderConfig checked it
    gaps = GapTracker()
    lifecycle = Lifecycle()
    send, receive = anyio.create_memory_object_stream[StoredQuote](config.buffer)
    metrics = RecorderMetrics(
        gaps,
        buffered=lambda: receive.statistics().current_buffer_used,
        buffer_capacity=config.buffer,
        ready=lambda: readiness().ok,
    )

    def readiness() -> ProbeAnswer:
        answer = lifecycle.readiness()
        if not answer.ok:
            return answer
        if not metrics.database_up:
            return ProbeAnswer(503, {"status": "database unavailable"})
        feed = "connected" if metrics.feed_connected else "disconnected"
        return ProbeAnswer(200, {"status": "ready", "feed": feed})

    endpoint = TelemetryApp(metrics.registry, readiness)
    stop_endpoint = anyio.Event()
    stopping = anyio.Event()

    async def stop_on_trigger() -> None:
        await (shutdown_trigger or anyio.sleep_forever)()
        stopping.set()

    async with anyio.create_task_group() as outer:
        port = await outer.start(
            partial(
                serve_endpoint,
                endpoint,
                config.host,
                config.metrics_port,
                shutdown_trigger=stop_endpoint.wait,
            )
        )
        logger.info(
            "recorder metrics on http://%s:%d/metrics",
            config.host,
            port,
            extra={"port": port},
        )
        task_status.started(port)
        try:
            with Database(url, pool_size=2) as db:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_on_trigger)
                    recorder = _Recorder(config, url, db, gaps, metrics, lifecycle, stopping)
                    await recorder.run(send, receive)
                    tg.cancel_scope.cancel()
        finally:
            stop_endpoint.set()
    logger.info(
        "recorder stopped (%d rows written, %d quotes missed)",
        metrics.written,
        sum(gaps.missed.values()),
        extra={
            "rows": metrics.written,
            "received": sum(metrics.received.values()),
            "missed": sum(gaps.missed.values()),
        },
    )


class _Recorder:
    """One recorder's pipeline, in the order of the task tree above."""

    def __init__(
        self,
        config: RecorderConfig,
        url: URL,
        db: Database,
        gaps: GapTracker,
        metrics: RecorderMetrics,
        lifecycle: Lifecycle,
        stopping: anyio.Event,
    ) -> None:
        self.config = config
        self.url = url
        self.db = db
        self.gaps = gaps
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.stopping = stopping
        #: Symbols with rows: what retention sweeps.
        self.known_symbols: set[str] = set()
        #: Quotes handed to the database and not yet committed.
        self.in_flight = 0
        self._rejected_logged = False
        #: With --source kafka, the consumer-group feed (else FT's gRPC stream).
        self.kafka: KafkaFeed | None = None
        if config.source == "kafka":
            session_ms = round(config.kafka_session_timeout * 1000)
            self.kafka = KafkaFeed(
                config,
                metrics,
                self._accept,
                session_timeout_ms=session_ms,
                heartbeat_interval_ms=max(100, min(3000, session_ms // 3)),
            )

    async def run(
        self,
        send: MemoryObjectSendStream[StoredQuote],
        receive: MemoryObjectReceiveStream[StoredQuote],
    ) -> None:
        # Both ends are closed however this ends: the writer and the feed close
        # theirs when they run, and the start may end before either does.
        with send, receive:
            try:
                await self._run(send, receive)
            finally:
                if self.kafka is not None:
                    # Cancelled without a drain (or a drain cut short): the
                    # consumer's connections are closed all the same.
                    await self.kafka.close()

    async def _run(
        self,
        send: MemoryObjectSendStream[StoredQuote],
        receive: MemoryObjectReceiveStream[StoredQuote],
    ) -> None:
        if not await _unless_set(self.stopping, self._prepare):
            logger.info("stopped before recording began")
            return
        written = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write, receive, written)
            if self.config.retention is not None:
                tg.start_soon(self._retain, self.config.retention)
            async with send, anyio.create_task_group() as feed:
                if self.kafka is None:
                    feed.start_soon(self._follow_feed, send)
                    source = f"FT at {self.config.ft_addr}"
                else:
                    feed.start_soon(self.kafka.follow, send)
                    source = self.kafka.where
                self.lifecycle.serving()
                logger.info(
                    "recording quotes from %s into %s",
                    source,
                    describe_url(self.url),
                    extra={"source": self.config.source},
                )
                await self.stopping.wait()
                self.lifecycle.draining()
                feed.cancel_scope.cancel()
            # The buffer is closed: the writer commits what it holds, then ends.
            with anyio.move_on_after(self.config.drain_timeout):
                await written.wait()
            if not written.is_set():
                left = receive.statistics().current_buffer_used + self.in_flight
                logger.warning(
                    "drain deadline (%gs) passed with %d quotes not yet written",
                    self.config.drain_timeout,
                    left,
                    extra={"quotes": left},
                )
            if self.kafka is not None:
                # Once the writer is done: the last offsets, then leave the group.
                await self.kafka.finish()
            tg.cancel_scope.cancel()

    # -- start ---------------------------------------------------------------

    async def _prepare(self) -> None:
        """Put the schema in place (or wait for it), then seed the gap tracker."""
        backoff = Backoff(0.1, self.config.backoff_cap)
        where = describe_url(self.url)
        reported = False
        while True:
            try:
                if self.config.migrate:
                    before, after = await anyio.to_thread.run_sync(upgrade, self.url)
                    if before != after:
                        logger.info(
                            "%s upgraded from %s to revision %s",
                            where,
                            before or "an empty database",
                            after,
                        )
                else:
                    found = await anyio.to_thread.run_sync(current_revision, self.url)
                    if found != head_revision():
                        raise _NotMigrated(f"schema at {found or 'none'}, need {head_revision()}")
                latest = await self.db.run(lambda c: latest_per_symbol(c, symbols(c)))
                break
            except _NOT_READY as exc:
                delay = backoff.next_delay()
                reason = _reason(exc)
                if isinstance(exc, _NotMigrated):
                    reason += "; run `quotopia db upgrade`"
                log = logger.debug if reported else logger.warning
                log("database %s not ready: %s; retrying in %.2fs", where, reason, delay)
                reported = True
                await anyio.sleep(delay)
        self.gaps.seed((q.symbol, q.run_id, q.sequence) for q in latest.values())
        self.known_symbols.update(latest)
        self.metrics.database_up = True
        if reported:
            logger.info("database %s ready", where)

    # -- the feed ------------------------------------------------------------

    async def _follow_feed(self, send: MemoryObjectSendStream[StoredQuote]) -> None:
        """Keep a session to FT open, reconnecting with backoff; ends by cancellation."""
        config = self.config

        def describe(exc: Exception) -> str:
            if isinstance(exc, DecodeError):
                return f"FT sent a malformed quote ({exc})"
            return describe_failure(exc)

        await follow(
            partial(self._session, send),
            metrics=self.metrics,
            source="FT",
            where=f"FT at {config.ft_addr}",
            expected=(*EXPECTED_FAILURES, DecodeError),
            describe=describe,
            backoff_cap=config.backoff_cap,
            fields={"ft_addr": config.ft_addr},
        )

    async def _session(self, send: MemoryObjectSendStream[StoredQuote]) -> None:
        """One gRPC session: every quote checked, tracked and buffered.

        The staleness deadline covers connecting and each wait for a quote, not the
        wait for room in the buffer: a full buffer is the database's delay, not FT's.
        """
        config = self.config
        host, port = config.ft_host_port
        channel = Channel(host, port, codec=_QuoteCodec())
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + config.feed_timeout) as quiet:
                async with channel.request(
                    STREAM_QUOTES, Cardinality.UNARY_STREAM, StreamQuotesRequest, DecodedQuote
                ) as stream:
                    await stream.send_message(StreamQuotesRequest(), end=True)
                    await stream.recv_initial_metadata()
                    self.metrics.feed_connected = True
                    self.metrics.feed_sessions += 1
                    logger.info("connected to FT at %s", config.ft_addr)
                    timeout = config.feed_timeout
                    since_checkpoint = 0
                    while True:
                        quote = await stream.recv_message()
                        if quote is None:
                            break
                        # The deadline moves at most ten times a timeout: a timer
                        # rescheduled per quote cost more than decoding it. A
                        # silent FT is noticed after 0.9 to 1 times the timeout.
                        now = anyio.current_time()
                        if now + timeout - quiet.deadline > timeout / 10:
                            quiet.deadline = now + timeout
                        row = self._accept(quote)
                        if row is None:
                            continue
                        try:
                            send.send_nowait(row)
                        except anyio.WouldBlock:
                            quiet.deadline = math.inf
                            await send.send(row)
                            quiet.deadline = anyio.current_time() + timeout
                            since_checkpoint = 0
                        # Counted once buffered: a quote cut off by a shutdown
                        # was never received.
                        received = self.metrics.received
                        received[row.symbol] = received.get(row.symbol, 0) + 1
                        # grpclib returns buffered messages without yielding:
                        # let the writer and the endpoint run now and then.
                        since_checkpoint += 1
                        if since_checkpoint >= _CHECKPOINT_EVERY:
                            since_checkpoint = 0
                            await anyio.lowlevel.checkpoint()
            if quiet.cancelled_caught:
                raise FeedStalled(f"no data from FT for {config.feed_timeout:g}s")
            raise FeedEnded("FT ended the stream")
        finally:
            channel.close()

    def _accept(self, quote: DecodedQuote) -> StoredQuote | None:
        """``quote``'s row, checked and seen by the gap tracker; None if refused."""
        row = storable_row(quote)
        if row is None:
            self.metrics.rejected += 1
            log = logger.debug if self._rejected_logged else logger.warning
            log("refused an unstorable quote: %r", quote)
            self._rejected_logged = True
            return None
        if gap := self.gaps.observe(row.symbol, row.run_id, row.sequence):
            _log_gap(gap)
        self.known_symbols.add(row.symbol)
        return row

    # -- the writer ------------------------------------------------------------

    async def _write(
        self, receive: MemoryObjectReceiveStream[StoredQuote], done: anyio.Event
    ) -> None:
        """Batches from the buffer, one transaction each, until the buffer closes."""
        backoff = Backoff(0.1, self.config.backoff_cap)
        async with receive:
            while batch := await _next_batch(
                receive, self.config.batch_size, self.config.flush_interval
            ):
                self.in_flight = len(batch)
                if tracing.enabled():
                    await self._commit_traced(batch, backoff)
                else:
                    await self._commit(batch, backoff)
                self.in_flight = 0
                if self.kafka is not None:
                    self.kafka.wrote(len(batch))
        done.set()

    async def _commit_traced(self, batch: Sequence[StoredQuote], backoff: Backoff) -> None:
        """:meth:`_commit` in a span: ``process TOPIC`` (CONSUMER), the child of the
        producer's ``send`` span when the batch came from one (so one trace runs
        from FT's tick to the insert), linked to each otherwise; ``record quotes``
        with the gRPC source. Each insert is a child span (see :meth:`_insert`)."""
        attributes: dict[str, str | int] = {"quotopia.quotes": len(batch)}
        if self.kafka is None:
            name, kind, links = "record quotes", SpanKind.INTERNAL, []
        else:
            ledger = self.kafka.ledger
            links = tracing.links_to(self.kafka.contexts_until(ledger.written + len(batch)))
            name, kind = f"process {self.config.kafka_topic}", SpanKind.CONSUMER
            attributes |= {
                "messaging.system": "kafka",
                "messaging.destination.name": self.config.kafka_topic,
                "messaging.consumer.group.name": self.config.kafka_group,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.batch.message_count": len(batch),
            }
        with _tracer.start_as_current_span(
            name,
            context=tracing.batch_parent(links),
            kind=kind,
            links=links,
            attributes=attributes,
        ):
            await self._commit(batch, backoff)

    async def _insert(self, batch: Sequence[StoredQuote]) -> int:
        """One insert transaction; a CLIENT span ``INSERT quotes`` while tracing."""
        if not tracing.enabled():
            return await self.db.run(lambda c: insert_quotes(c, batch))
        with _tracer.start_as_current_span(
            "INSERT quotes",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": self.url.get_backend_name(),
                "db.operation.name": "INSERT",
                "db.collection.name": "quotes",
                "db.query.summary": "INSERT quotes",
                "quotopia.quotes": len(batch),
            },
        ):
            return await self.db.run(lambda c: insert_quotes(c, batch))

    async def _commit(self, batch: Sequence[StoredQuote], backoff: Backoff) -> None:
        """Write ``batch`` in one transaction; retry with backoff while the database is down."""
        metrics = self.metrics
        while True:
            started = time.perf_counter()
            try:
                new = await self._insert(batch)
            except DATABASE_DOWN as exc:
                metrics.batch_failures += 1
                delay = backoff.next_delay()
                if metrics.database_up:
                    logger.warning(
                        "database unavailable: %s; holding %d quotes, retrying in %.2fs",
                        _reason(exc),
                        len(batch),
                        delay,
                        extra={"quotes": len(batch), "delay": round(delay, 3)},
                    )
                metrics.database_up = False
                await anyio.sleep(delay)
                continue
            break
        committed_at = time.time()
        metrics.batch_duration.observe(time.perf_counter() - started)
        if not metrics.database_up:
            logger.info("database available again; writing resumed")
            metrics.database_up = True
        backoff.reset()
        metrics.batches += 1
        metrics.written += new
        metrics.duplicates += len(batch) - new
        latency = metrics.write_latency
        newest = 0
        for quote in batch:
            latency.observe(committed_at - quote.time_us / 1e6)
            newest = max(newest, quote.time_us)
        metrics.newest_committed = max(metrics.newest_committed, newest / 1e6)

    # -- retention -------------------------------------------------------------

    async def _retain(self, retention: float) -> None:
        """Every ``retention_interval``, delete rows older than ``retention`` seconds,
        ``retention_batch`` rows per transaction, so the writer never waits long."""
        config = self.config
        while True:
            cutoff_us = int((time.time() - retention) * 1e6)
            deleted = 0
            try:
                for symbol in sorted(self.known_symbols):
                    while True:
                        count = await self.db.run(
                            partial(
                                delete_before,
                                symbol=symbol,
                                cutoff_us=cutoff_us,
                                limit=config.retention_batch,
                            )
                        )
                        deleted += count
                        self.metrics.retention_deleted += count
                        if count < config.retention_batch:
                            break
            except DATABASE_DOWN as exc:
                logger.warning(
                    "retention sweep failed: %s; next in %gs",
                    _reason(exc),
                    config.retention_interval,
                )
            if deleted:
                logger.info(
                    "retention: deleted %d quotes older than %s",
                    deleted,
                    _format_cutoff(cutoff_us),
                    extra={"rows": deleted},
                )
            await anyio.sleep(config.retention_interval)


def storable_row(quote: DecodedQuote) -> StoredQuote | None:
    """``quote`` as a row, or ``None`` if it cannot be stored under its own name.

    A quote without a run id (an FT older than the field) would collide with the
    same sequence numbers of every other run, and one without a time cannot be
    placed in history: neither is written.
    """
    symbol = quote.symbol
    if not symbol or len(symbol) > SYMBOL_LENGTH or "\x00" in symbol:
        return None
    if not (0 < quote.run_id <= _MAX_INT64 and 0 < quote.sequence <= _MAX_INT64):
        return None
    if quote.time_us is None or not (
        math.isfinite(quote.price) and math.isfinite(quote.change_percent)
    ):
        return None
    return StoredQuote(
        symbol, quote.run_id, quote.sequence, quote.time_us, quote.price, quote.change_percent
    )


class _QuoteCodec(CodecBase):
    """grpclib's protobuf codec, but a ``Quote`` is decoded by
    :func:`quotopia.quote_codec.decode_quote` (about 5 µs, not betterproto2's 31)
    straight into the fields the recorder stores."""

    __content_subtype__ = "proto"

    def __init__(self) -> None:
        self._proto = ProtoCodec()

    def encode(self, message: Any, message_type: Any) -> bytes:
        return self._proto.encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type is DecodedQuote:
            return decode_quote(data)
        return self._proto.decode(data, message_type)


async def _next_batch(
    receive: MemoryObjectReceiveStream[StoredQuote], size: int, wait: float
) -> list[StoredQuote]:
    """Up to ``size`` quotes: the first whenever it comes, then whatever arrives
    within ``wait`` seconds of it. Empty once the stream is closed and drained."""
    batch: list[StoredQuote] = []
    try:
        batch.append(await receive.receive())
        with anyio.move_on_after(wait):
            while len(batch) < size:
                try:
                    batch.append(receive.receive_nowait())
                except anyio.WouldBlock:
                    batch.append(await receive.receive())
    except anyio.EndOfStream:
        pass
    return batch


async def _unless_set(event: anyio.Event, work: Callable[[], Awaitable[None]]) -> bool:
    """Run ``work()``; if ``event`` is set first, cancel it and return False."""
    finished = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await work()
        finished = True
        tg.cancel_scope.cancel()
    return finished


def _log_gap(gap: Gap) -> None:
    fields = {
        "symbol": gap.symbol,
        "run_id": gap.run_id,
        "first": gap.first,
        "last": gap.last,
        "missed": gap.missed,
    }
    if gap.first == 1:
        # Joining a run late (a start, a new FT) is expected; say it, don't alarm.
        logger.info(
            "joined FT run %d of %s at sequence %d: %d earlier quotes not recorded",
            gap.run_id,
            gap.symbol,
            gap.last + 1,
            gap.missed,
            extra=fields,
        )
    else:
        logger.warning(
            "gap in %s (FT run %d): %d quotes missed, sequence %d to %d",
            gap.symbol,
            gap.run_id,
            gap.missed,
            gap.first,
            gap.last,
            extra=fields,
        )


def _reason(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _format_cutoff(cutoff_us: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff_us / 1e6))
