"""Core's task tree: the HTTP server and the feed consumer, side by side.

::

    quotopia core ── trio.run
      shutdown_on_signals ............ signal watcher: SIGTERM/SIGINT → shutdown_trigger returns
        serve()
          trio_asyncio.open_loop()     (grpclib and aiokafka need an asyncio loop)
            nursery
            ├─ hypercorn.trio.serve .. the quart-trio app behind PreparedQuotes (the two
            │                          hot GETs); returns on shutdown_trigger
            │    └─ one task per request; a push connection (SSE, WebSocket) reads
            │       the hub until it ends; a history request waits for its query in
            │       a worker thread (HistoryReader)
            ├─ supervise_feed ........ reconnect loop → one gRPC session (or, with
            │                          --source kafka, one Kafka session) → store
            ├─ hub.deliver ........... each tick, straight to every event stream that keeps up
            └─ hub.watch ............. once a second: SSE heartbeats, slow push clients

On shutdown, the push hub is closed first (event streams end, WebSockets get
1001), then hypercorn finishes in-flight requests; when it returns, the nursery is
cancelled, which stops the feed consumer and the hub's watcher. If either task crashes, the other is
cancelled and the error propagates: nothing runs unsupervised.

With ``--workers N``, each of N processes runs this same tree on a socket their
parent bound (see :mod:`quotopia.core.workers`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio
import trio_asyncio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework

from quotopia.core.app import PreparedQuotes, create_app
from quotopia.core.config import CoreConfig
from quotopia.core.feed import Session, feed_origin, grpc_session, supervise_feed
from quotopia.core.history import HistoryReader
from quotopia.core.http import (
    FinishResponses,
    abort_connections,
    cut_connection,
    json_protocol_errors,
    reason_phrases,
    track_connections,
    ws_keepalive,
)
from quotopia.core.metrics import CoreMetrics, MeasureRequests, RouteTemplates
from quotopia.core.probes import readiness
from quotopia.core.push.hub import PushHub
from quotopia.core.store import QuoteStore
from quotopia.core.system import Upstream
from quotopia.errors import StartupError, describe_os_error
from quotopia.telemetry.probes import Lifecycle

__all__ = ["serve"]

logger = logging.getLogger("quotopia.core")

#: The listening socket's backlog (Linux caps it at net.core.somaxconn, 4096 by default).
LISTEN_BACKLOG = 4096


async def serve(
    config: CoreConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    session: Session | None = None,
    listener: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run Core until ``shutdown_trigger`` returns or until cancelled.

    Listens on ``config.host:config.port``, or on ``listener`` if given: a bound,
    listening socket (one worker's share of ``quotopia core --workers``), which
    ``serve`` takes over. Calls ``task_status.started(port)`` once listening, with
    the real port. ``session`` replaces the feed's session (by default a gRPC
    session to FT, or with ``config.source == "kafka"`` a Kafka session).
    """
    store = QuoteStore()
    lifecycle = Lifecycle()
    hub = PushHub(store, config.push, cut=cut_connection)
    rejected = None
    upstream = Upstream(config.ft_addr)
    if session is None:
        session, rejected, upstream = _feed_session(config)
    metrics = CoreMetrics(
        store, ready=lambda: readiness(lifecycle, store).ok, hub=hub, rejected=rejected
    )
    origin = feed_origin(config)
    history = HistoryReader(config.database_url)
    quart_app = create_app(store, metrics, lifecycle, hub, upstream=upstream, history=history)
    app = MeasureRequests(
        FinishResponses(PreparedQuotes(quart_app, store)),
        metrics,
        RouteTemplates(quart_app.url_map),
    )
    json_protocol_errors()
    reason_phrases()
    track_connections()
    ws_keepalive(config.push.ws_ping_timeout)
    hypercorn_config = _hypercorn_config(config)
    if listener is not None:
        # hypercorn wraps the descriptor in a socket of its own, which then owns it.
        hypercorn_config.bind = [f"fd://{listener.detach()}"]
    # Leaving it closes the history database's pooled connections.
    with history:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            try:
                binds = await nursery.start(
                    _serve_http,
                    app,
                    hypercorn_config,
                    _draining_first(shutdown_trigger, lifecycle, config.shutdown_delay, hub),
                    nursery.cancel_scope,
                )
            except* OSError as group:
                raise StartupError(
                    f"cannot listen on {config.host}:{config.port}: {describe_os_error(group)}"
                ) from None
            port = int(binds[0].rsplit(":", 1)[1])
            if listener is None:
                logger.info(
                    "Core listening on http://%s:%d, feed from %s",
                    config.host,
                    port,
                    origin.where,
                )
            else:
                # The parent announces the port, once for all its workers.
                logger.info("serving port %d, feed from %s", port, origin.where)
            if history.configured:
                logger.info("history from %s (read only)", history.describe())
            else:
                logger.info("no history database: the history routes answer 503")
            nursery.start_soon(partial(supervise_feed, config, store, session=session))
            nursery.start_soon(hub.watch)
            nursery.start_soon(hub.deliver)
            lifecycle.serving()
            task_status.started(port)
    logger.info("Core stopped")


def _feed_session(config: CoreConfig) -> tuple[Session, Callable[[], int] | None, Upstream]:
    """The session ``config.source`` names, its count of rejected records (None:
    it has none), and where it reads from, for the system map."""
    if config.source != "kafka":
        return grpc_session, None, Upstream(config.ft_addr)
    # Imported here: a Core fed over gRPC never loads aiokafka.
    from quotopia.core.kafka_feed import KafkaFeed

    kafka = KafkaFeed()
    upstream = Upstream(
        config.ft_addr, config.kafka, config.kafka_topic, broker_answered=lambda: kafka.answered
    )
    return kafka, lambda: kafka.rejected, upstream


def _draining_first(
    trigger: Callable[[], Awaitable[None]] | None,
    lifecycle: Lifecycle,
    delay: float,
    hub: PushHub,
) -> Callable[[], Awaitable[None]]:
    """``trigger``, then /readyz says "draining" for ``delay`` seconds while Core
    still serves, so a load balancer stops sending before Core stops accepting;
    then the push connections end, so hypercorn's graceful stop has only short
    requests left to finish."""

    async def drain_then_stop() -> None:
        await (trigger or trio.sleep_forever)()
        lifecycle.draining()
        if delay > 0:
            logger.info("draining: /readyz answers 503; stopping in %gs", delay)
            await trio.sleep(delay)
        hub.close()

    return drain_then_stop


async def _serve_http(
    app: ASGIFramework,
    config: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    siblings: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Serve HTTP until the trigger fires, then stop the siblings (the feed).

    hypercorn's graceful timeout cannot end a write to a client that stopped
    reading; when it has passed, such connections are cut.
    """
    async with trio.open_nursery() as watchdog:

        async def trigger() -> None:
            await (shutdown_trigger or trio.sleep_forever)()
            watchdog.start_soon(_cut_stuck_connections, config.graceful_timeout)

        try:
            await hypercorn_serve(app, config, shutdown_trigger=trigger, task_status=task_status)
        finally:
            watchdog.cancel_scope.cancel()
            siblings.cancel()


async def _cut_stuck_connections(after: float) -> None:
    await trio.sleep(after)
    if aborted := abort_connections():
        logger.warning(
            "graceful timeout passed with %d connections stuck writing; cutting them", aborted
        )


def _hypercorn_config(config: CoreConfig) -> HypercornConfig:
    hc = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    # hypercorn's access log, in our format, when asked for: one line per request.
    hc.accesslog = logging.getLogger("hypercorn.access") if config.access_log else None
    hc.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s bytes %(L)ss'  # our lines carry the time
    # Hand hypercorn our logger, so its lines share our format.
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = config.graceful_timeout
    # Connections waiting to be accepted. hypercorn's default (100) overflows when
    # thousands of push clients connect at once (after a restart, say): the kernel
    # then drops their SYNs, and each retries a second or more later.
    hc.backlog = LISTEN_BACKLOG
    # WebSockets: pings (see ws_keepalive), and the size limit of a client's
    # message: over it, hypercorn closes the connection with 1009.
    hc.websocket_ping_interval = config.push.ws_ping_interval
    hc.websocket_max_message_size = config.push.ws_max_message
    return hc
