"""The feed consumer: one gRPC session, and the supervisor that keeps retrying it.

Core runs on Trio; grpclib is asyncio-only. trio-asyncio bridges the two: each
session (open channel, open stream, read until it ends) is one asyncio coroutine,
wrapped once with :func:`trio_asyncio.aio_as_trio`. Driving the channel piecewise
from Trio would leak it on cancellation.

The other source, the Kafka topic (``--source kafka``), is a session of the same
shape (:mod:`quotopia.core.kafka_feed`), kept by the same supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality
from opentelemetry.trace import SpanKind

from quotopia._proto import Quote, StreamQuotesRequest
from quotopia.backoff import Backoff
from quotopia.contract import STREAM_QUOTES
from quotopia.core.config import CoreConfig
from quotopia.core.store import QuoteStore
from quotopia.grpc_feed import (
    EXPECTED_FAILURES,
    FeedEnded,
    FeedStalled,
    describe_failure,
    snapshot_size,
)
from quotopia.telemetry import tracing

__all__ = [
    "FeedEnded",
    "FeedOrigin",
    "FeedStalled",
    "FeedUnavailable",
    "Session",
    "feed_origin",
    "grpc_session",
    "supervise_feed",
]

logger = logging.getLogger("quotopia.core")
_tracer = tracing.tracer("quotopia.core")

#: One feed session: connect, stream into the store, return when the stream ends.
Session = Callable[[CoreConfig, QuoteStore], Awaitable[None]]


class FeedUnavailable(Exception):
    """The source is there, but not what the feed reads from it (a Kafka topic not
    created yet): retried like an absent FT."""


@dataclass(frozen=True, slots=True)
class FeedOrigin:
    """Where the feed comes from, as :func:`supervise_feed` tells it."""

    #: The source in one word: ``FT``, ``Kafka``.
    name: str
    #: ``FT at HOST:PORT``, ``Kafka topic quotes at HOST:PORT``.
    where: str
    #: The same, as log fields.
    fields: Mapping[str, str]
    #: What the source raises in normal life (absent, restarting, unreachable).
    expected: tuple[type[Exception], ...]
    #: Why one of those happened, in a few words.
    describe: Callable[[Exception], str]
    #: The feed session's span name, while tracing.
    span_name: str


def feed_origin(config: CoreConfig) -> FeedOrigin:
    """Where ``config`` has Core's feed come from."""
    if config.source == "kafka":
        # Imported here: a Core fed over gRPC never loads aiokafka.
        from quotopia.bus import admin

        return FeedOrigin(
            "Kafka",
            f"Kafka topic {config.kafka_topic} at {config.kafka}",
            {"kafka": str(config.kafka), "topic": config.kafka_topic},
            admin.EXPECTED_FAILURES,
            admin.describe_failure,
            f"receive {config.kafka_topic}",
        )
    return FeedOrigin(
        "FT",
        f"FT at {config.ft_addr}",
        {"ft_addr": config.ft_addr},
        EXPECTED_FAILURES,
        describe_failure,
        STREAM_QUOTES.lstrip("/"),
    )


async def _aio_session(config: CoreConfig, store: QuoteStore) -> None:
    """One gRPC session, entirely on the asyncio side.

    A staleness deadline covers the whole session: connecting, the response
    headers, and then every gap between two quotes. A frozen FT (``kill -STOP``)
    keeps its TCP connection open but sends nothing, and this is how Core notices.
    """
    host, port = config.ft_host_port
    loop = asyncio.get_running_loop()
    channel = Channel(host, port)
    try:
        async with asyncio.timeout(config.feed_timeout) as deadline:
            async with channel.request(
                STREAM_QUOTES, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote
            ) as stream:
                await stream.send_message(StreamQuotesRequest(), end=True)
                await stream.recv_initial_metadata()
                store.feed_up(snapshot_size(stream.initial_metadata))
                logger.info(
                    "connected to FT at %s", config.ft_addr, extra={"ft_addr": config.ft_addr}
                )
                async for quote in stream:
                    deadline.reschedule(loop.time() + config.feed_timeout)
                    store.apply(
                        quote.symbol, quote.price, quote.time, quote.change_percent, quote.sequence
                    )
            raise FeedEnded("FT ended the stream")
    except TimeoutError:
        raise FeedStalled(f"no data from FT for {config.feed_timeout:g}s") from None
    finally:
        channel.close()


async def grpc_session(config: CoreConfig, store: QuoteStore) -> None:
    """Run one gRPC session from Trio (requires a running trio-asyncio loop)."""
    await trio_asyncio.aio_as_trio(_aio_session)(config, store)


async def supervise_feed(
    config: CoreConfig,
    store: QuoteStore,
    *,
    session: Session = grpc_session,
    rng: random.Random | None = None,
) -> None:
    """Keep a session to the feed's source (FT, or the Kafka topic: see
    :func:`feed_origin`) open forever, reconnecting with backoff after each loss.

    Returns only by cancellation. The delay resets after a session that delivered data.

    Error handling: expected failures (the source's :attr:`FeedOrigin.expected`)
    are logged as one line, WARNING if the feed was up, else INFO; anything else is
    a bug, logged at ERROR with its traceback, and retried all the same so one bad
    message cannot take the feed down for good.
    """
    origin = feed_origin(config)
    backoff = Backoff(config.backoff_initial, config.backoff_cap, rng=rng)
    logger.info("connecting to %s", origin.where, extra=dict(origin.fields))
    while True:
        received = store.updates
        try:
            if tracing.enabled():
                # One span per session, from connecting to its loss.
                with _tracer.start_as_current_span(
                    origin.span_name, kind=SpanKind.CLIENT, attributes=dict(origin.fields)
                ):
                    await session(config, store)
            else:
                await session(config, store)
            reason = "stream ended"
        except (FeedEnded, FeedStalled, FeedUnavailable) as exc:
            reason = str(exc)
        except origin.expected as exc:
            reason = origin.describe(exc)
        except Exception as exc:
            logger.error("feed session failed unexpectedly", exc_info=exc)
            reason = f"unexpected {type(exc).__name__}"
        was_connected = store.connected
        store.feed_down()
        if store.updates > received:
            backoff.reset()
        delay = backoff.next_delay()
        fields = {"reason": reason, "delay": round(delay, 3), **origin.fields}
        if was_connected:
            logger.warning("feed lost: %s; retrying in %.2fs", reason, delay, extra=fields)
        else:
            logger.info(
                "%s unavailable: %s; retrying in %.2fs", origin.name, reason, delay, extra=fields
            )
        await trio.sleep(delay)
