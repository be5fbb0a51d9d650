"""FT's task tree: the generator, the gRPC server, the metrics endpoint, the shutdown.

::

    quotopia ft ── anyio.run(backend="asyncio")
      shutdown_on_signals ...... signal watcher: SIGTERM/SIGINT → shutdown_trigger returns
        serve() ── outer task group
          ├─ metrics endpoint .. /metrics, /livez, /readyz on --metrics-port (hypercorn)
          └─ task group
              ├─ grpclib server  QuoteService + grpc.health.v1 + reflection
              │    └─ one handler per stream (quotopia.ft.service)
              ├─ Kafka sender .. (with --kafka) buffer → producer → broker (quotopia.ft.kafka)
              └─ generator ..... every tick: market.step() → encode → broadcaster.publish()
                                 (and the Kafka buffer's publish())

The drain on shutdown: mark health NOT_SERVING and /readyz "draining", refuse new
streams, end every open stream with status OK, wait for subscribers to leave
(bounded by ``drain_timeout``), give the Kafka buffer what is left of that deadline
to reach the broker, then close the server. grpclib's
``Server.close()`` alone would cancel handlers mid-stream and leave connections
half-open. The metrics endpoint stops last, so the drain can be watched.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import UTC, datetime
from functools import partial

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from grpclib._typing import IServable
from grpclib.config import Configuration
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1 import health_pb2
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2
from grpclib.server import Handler, Server

from quotopia._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from quotopia.ft.broadcast import Broadcaster
from quotopia.ft.config import FTConfig
from quotopia.ft.h2fast import FastControlProtocol
from quotopia.ft.kafka import KafkaPublisher
from quotopia.ft.metrics import FTMetrics
from quotopia.ft.service import QuoteService
from quotopia.ft.wire import EncodedQuote, encode_quotes, new_run_id
from quotopia.market import Market, Quote
from quotopia.telemetry import tracing
from quotopia.telemetry.endpoint import TelemetryApp, listening_socket, serve_endpoint
from quotopia.telemetry.probes import Lifecycle

__all__ = ["serve"]

logger = logging.getLogger("quotopia.ft")

_tracer = tracing.tracer("quotopia.ft")

#: Connections the kernel may queue for accept(). grpclib's Server.start()
#: defaults to 100 and calls listen() again, so it must be passed there too.
BACKLOG = 1024


async def serve(
    config: FTConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run FT until ``shutdown_trigger`` returns (then drain) or until cancelled.

    Calls ``task_status.started(port)`` once listening, with the real port (useful
    with ``port=0``). Must run on AnyIO's asyncio backend: grpclib is asyncio-only.
    """
    _raise_open_file_limit()
    market = Market(config.instruments, config.seed)
    broadcaster: Broadcaster[EncodedQuote] = Broadcaster(
        config.subscriber_buffer, config.slow_consumer_timeout
    )
    # Names this run's quotes for good: sequence numbers restart with FT.
    run_id = new_run_id()
    lifecycle = Lifecycle()
    kafka = None if config.kafka is None else KafkaPublisher(config)
    metrics = FTMetrics(broadcaster, ready=lambda: lifecycle.readiness().ok, kafka=kafka)
    quotes = QuoteService(market.symbols, broadcaster, metrics)
    serving = ServiceStatus()
    health = Health({quotes: [serving]})
    server = _Server(
        ServerReflection.extend([quotes, health], pool=_descriptor_pool()),
        config=_keepalive(config.keepalive),
    )
    endpoint = TelemetryApp(metrics.registry, lifecycle.readiness)
    stop_endpoint = anyio.Event()

    # The metrics endpoint outlives the gRPC side, so /readyz says "draining" for
    # the whole drain and Prometheus sees the last figures.
    async with anyio.create_task_group() as outer:
        metrics_port = await outer.start(
            partial(
                serve_endpoint,
                endpoint,
                config.host,
                config.metrics_port,
                shutdown_trigger=stop_endpoint.wait,
            )
        )
        try:
            async with anyio.create_task_group() as tg:
                port = await tg.start(_run_server, server, config.host, config.port)
                if kafka is not None:
                    await tg.start(kafka.run)
                await tg.start(_generate, market, broadcaster, kafka, metrics, config, run_id)
                serving.set(True)
                lifecycle.serving()
                logger.info(
                    "FT listening on %s:%d (symbols %s, tick %gs, run id %d)",
                    config.host,
                    port,
                    ",".join(market.symbols),
                    config.tick_interval,
                    run_id,
                    extra={"port": port, "symbols": list(market.symbols), "run_id": run_id},
                )
                logger.info(
                    "FT metrics on http://%s:%d/metrics",
                    config.host,
                    metrics_port,
                    extra={"port": metrics_port},
                )
                task_status.started(port)

                await (shutdown_trigger or anyio.sleep_forever)()

                lifecycle.draining()
                serving.set(False)
                broadcaster.close()
                with anyio.move_on_after(config.drain_timeout) as drain:
                    await broadcaster.wait_empty()
                if drain.cancelled_caught:
                    logger.warning(
                        "drain deadline (%gs) passed with %d streams still open; cutting them",
                        config.drain_timeout,
                        broadcaster.subscriber_count,
                        extra={"subscribers": broadcaster.subscriber_count},
                    )
                if kafka is not None:
                    kafka.close()
                    with anyio.move_on_after(max(0.0, drain.deadline - anyio.current_time())):
                        await kafka.flush()
                tg.cancel_scope.cancel()
        finally:
            stop_endpoint.set()
    stopped = {"slow_consumers": broadcaster.slow_disconnects, "conflated": broadcaster.conflated}
    kafka_part = ""
    if kafka is not None:
        stopped |= {"kafka_sent": kafka.sent, "kafka_dropped": kafka.dropped}
        kafka_part = f"; Kafka: {kafka.sent} quotes sent, {kafka.dropped} dropped"
    logger.info(
        "FT stopped (%d slow consumers disconnected, %d quotes conflated%s)",
        broadcaster.slow_disconnects,
        broadcaster.conflated,
        kafka_part,
        extra=stopped,
    )


class _Server(Server):
    """grpclib's Server, which can also close the connections it accepted, and
    answers its clients' PINGs and window updates on a fast path.

    ``Server.close()`` stops listening and cancels handlers, but leaves accepted
    connections open: a client that was cut off at the drain deadline would hang,
    and ``python -X dev`` reports the transports as unclosed. grpclib offers no
    public hook for this, hence the override of its protocol factory.
    """

    def __init__(self, handlers: Collection[IServable], *, config: Configuration) -> None:
        super().__init__(handlers, config=config)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own factory, building FT's protocol (quotopia.ft.h2fast) instead.
        self.__gc_step__()
        handler = Handler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        protocol = FastControlProtocol(handler, self._config, self._h2_config)
        self._protocols.add(protocol)
        return protocol

    def close_connections(self) -> None:
        """Close every accepted connection that is still open (after ``close()``)."""
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()


def _keepalive(seconds: float) -> Configuration:
    """grpclib settings that ping every connection after ``seconds`` of quiet.

    grpclib's keepalive options are marked experimental, and their defaults do
    little: a server pings after 2 hours, sends at most 2 pings without data in
    between, and at most one per 5 minutes. These make the ping regular, with or
    without open streams, so a frozen or half-open client is closed after about
    ``2 * seconds``, including one that sent garbage h2 keeps waiting on.
    """
    return Configuration(
        _keepalive_time=seconds,
        _keepalive_timeout=seconds,
        _keepalive_permit_without_calls=True,
        _http2_max_pings_without_data=0,
        _http2_min_sent_ping_interval_without_data=seconds,
    )


async def _run_server(
    server: _Server, host: str, port: int, *, task_status: TaskStatus[int]
) -> None:
    """Own the grpclib server: listen, report the port, close it when cancelled."""
    with listening_socket(host, port, BACKLOG) as sock:
        await server.start(sock=sock, backlog=BACKLOG)
        try:
            task_status.started(sock.getsockname()[1])
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                server.close()
                await server.wait_closed()
                server.close_connections()
                # Let the transports finish closing before the event loop does.
                await anyio.lowlevel.checkpoint()


def _raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: one descriptor per client.

    The usual soft default (1024, under systemd and Docker) would cap FT at about
    a thousand clients; asyncio then logs every failed accept() at ERROR with a
    traceback and stops accepting for a second at a time.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # e.g. an infinite hard limit on macOS
        logger.warning("cannot raise the open-file limit from %d: %s", soft, exc)


async def _generate(
    market: Market,
    broadcaster: Broadcaster[EncodedQuote],
    kafka: KafkaPublisher | None,
    metrics: FTMetrics,
    config: FTConfig,
    run_id: int,
    *,
    task_status: TaskStatus[None],
) -> None:
    """Publish the opening prices, then one step of the walk every tick interval.

    Each quote is encoded into its gRPC message here, once, for every subscriber
    and for Kafka.

    Ticks follow a fixed schedule (no drift); if the process falls more than a tick
    behind, the schedule restarts from now instead of firing a burst of catch-up ticks.
    """
    opening = market.open(_now())
    encoded = encode_quotes(opening, time.monotonic(), run_id)
    broadcaster.publish(encoded)
    if kafka is not None:
        kafka.publish(encoded)
    task_status.started()
    interval = config.tick_interval
    decimals = {i.symbol: i.decimals for i in config.instruments}
    previous = {q.symbol: q.price for q in opening}
    next_tick = anyio.current_time() + interval
    while True:
        await anyio.sleep_until(next_tick)
        # Tracing off, the span is a nullcontext and the tick pays one flag test.
        span_of_tick = (
            _tracer.start_as_current_span("ft.tick", attributes={"quotopia.run_id": str(run_id)})
            if tracing.enabled()
            else contextlib.nullcontext()
        )
        with span_of_tick as span:
            step = market.step(_now())
            tick = encode_quotes(step, time.monotonic(), run_id)
            broadcaster.publish(tick)
            if kafka is not None:
                kafka.publish(tick, tracing.current_span_context())
            if span is not None:
                span.set_attribute("quotopia.quotes", len(tick))
                span.set_attribute("quotopia.subscribers", broadcaster.subscriber_count)
        metrics.tick(tick)
        _log_moves(step, previous, decimals)
        next_tick += interval
        now = anyio.current_time()
        if next_tick < now - interval:
            next_tick = now + interval


def _log_moves(
    quotes: Iterable[Quote], previous: dict[str, float], decimals: dict[str, int]
) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    for q in quotes:
        old = previous.get(q.symbol, q.price)
        previous[q.symbol] = q.price
        digits = decimals[q.symbol]
        logger.info(
            "%s: %.*f → %.*f (%+.2f%%)", q.symbol, digits, old, digits, q.price, q.change_percent
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _descriptor_pool() -> object:
    """betterproto2's descriptor pool, plus grpclib's health and reflection files.

    Reflection must see every service it lists, so all three live in one pool.
    """
    pool = default_google_proto_descriptor_pool
    for file in (
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
        reflection_v1alpha_pb2.DESCRIPTOR,
    ):
        try:
            pool.FindFileByName(file.name)
        except KeyError:
            pool.AddSerializedFile(file.serialized_pb)
    return pool
