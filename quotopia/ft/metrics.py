"""FT's metrics: what a tick, a subscriber and a write cost, as Prometheus sees it.

Everything on the per-tick, per-subscriber path is a plain number kept by its
owner (the broadcaster counts conflated quotes, the handler counts disconnects by
reason, :class:`~quotopia.telemetry.metrics.FastHistogram` keeps the write
latencies); :class:`FTMetrics` turns them into metric families only when
Prometheus scrapes. So a scrape costs FT one pass over its subscribers, and a tick
costs it no more than a few additions per subscriber. The catalogue, with the
panel or alert that uses each metric, is in docs/observability.md.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quotopia.ft.broadcast import Broadcaster
from quotopia.ft.wire import EncodedQuote
from quotopia.telemetry.metrics import FastHistogram, new_registry

if TYPE_CHECKING:
    from quotopia.ft.kafka import KafkaPublisher

__all__ = ["Disconnect", "FTMetrics"]


class Disconnect(enum.Enum):
    """Why a subscriber's stream ended: the ``reason`` label of the disconnects."""

    #: The client went away (cancelled its call or closed its connection).
    NORMAL = "normal"
    #: FT dropped it for staying behind past ``--slow-consumer-timeout``.
    SLOW_CONSUMER = "slow_consumer"
    #: FT ended it while shutting down.
    DRAIN = "drain"
    #: Anything else: a bug, or a transport failure grpclib reported as an error.
    ERROR = "error"


class FTMetrics(Collector):
    """FT's registry and the numbers behind it. Runs on FT's one event loop."""

    def __init__(
        self,
        broadcaster: Broadcaster[EncodedQuote],
        ready: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        kafka: KafkaPublisher | None = None,
    ) -> None:
        self._broadcaster = broadcaster
        self._ready = ready
        self._kafka = kafka
        self._clock = clock
        #: Ticks generated since start.
        self.ticks = 0
        #: Quotes published per symbol since start.
        self.published: dict[str, int] = {}
        #: Streams subscribed since start.
        self.connects = 0
        #: Streams ended since start, by reason.
        self.disconnects = dict.fromkeys(Disconnect, 0)
        #: Generation of a quote to its write to a client's socket, per write.
        self.delivery_latency = FastHistogram()
        self.registry: CollectorRegistry = new_registry("ft")
        self.registry.register(self)

    def tick(self, quotes: Iterable[EncodedQuote]) -> None:
        """Count one generated tick and its quotes."""
        self.ticks += 1
        published = self.published
        for quote in quotes:
            published[quote.symbol] = published.get(quote.symbol, 0) + 1

    def collect(self) -> Iterable[Metric]:
        b = self._broadcaster
        yield CounterMetricFamily("quotopia_ft_ticks", "Ticks generated.", value=self.ticks)
        published = CounterMetricFamily(
            "quotopia_ft_quotes_published", "Quotes published to subscribers.", labels=["symbol"]
        )
        price = GaugeMetricFamily("quotopia_ft_price", "Latest price.", labels=["symbol"])
        for symbol, quote in b.latest.items():
            published.add_metric([symbol], self.published.get(symbol, 0))
            price.add_metric([symbol], quote.price)
        yield published
        yield price
        yield GaugeMetricFamily(
            "quotopia_ft_subscribers", "Open StreamQuotes streams.", value=b.subscriber_count
        )
        yield CounterMetricFamily(
            "quotopia_ft_subscriber_connects", "Streams subscribed.", value=self.connects
        )
        disconnects = CounterMetricFamily(
            "quotopia_ft_subscriber_disconnects", "Streams ended, by reason.", labels=["reason"]
        )
        for reason, count in self.disconnects.items():
            disconnects.add_metric([reason.value], count)
        yield disconnects
        yield CounterMetricFamily(
            "quotopia_ft_quotes_conflated",
            "Quotes a lagging subscriber never got: a newer quote of the symbol replaced them.",
            value=b.conflated,
        )
        lag = b.lag(self._clock())
        yield GaugeMetricFamily(
            "quotopia_ft_subscribers_behind",
            "Subscribers whose buffer is full, so their quotes are being conflated.",
            value=lag.behind,
        )
        yield GaugeMetricFamily(
            "quotopia_ft_subscriber_backlog_max_ticks",
            "Ticks waiting for the most backlogged subscriber.",
            value=lag.max_backlog,
        )
        yield GaugeMetricFamily(
            "quotopia_ft_subscriber_behind_max_seconds",
            "How long the longest-lagging subscriber has been behind; it is disconnected "
            "past --slow-consumer-timeout.",
            value=lag.max_behind_seconds,
        )
        yield self.delivery_latency.family(
            "quotopia_ft_delivery_latency_seconds",
            "From a quote's generation to its write to a client's socket.",
        )
        yield GaugeMetricFamily(
            "quotopia_ft_ready", "1 when /readyz answers 200.", value=int(self._ready())
        )
        if self._kafka is not None:
            yield from _kafka_families(self._kafka)


def _kafka_families(kafka: KafkaPublisher) -> Iterable[Metric]:
    """The Kafka publisher's figures (only when FT runs with --kafka)."""
    yield GaugeMetricFamily(
        "quotopia_ft_kafka_connected",
        "1 while a producer is connected to the Kafka broker.",
        value=int(kafka.connected),
    )
    yield CounterMetricFamily(
        "quotopia_ft_kafka_quotes_sent",
        "Quotes the Kafka broker acknowledged.",
        value=kafka.sent,
    )
    yield CounterMetricFamily(
        "quotopia_ft_kafka_quotes_dropped",
        "Quotes never sent to Kafka: pushed out of a full buffer, or left at shutdown.",
        value=kafka.dropped,
    )
    yield CounterMetricFamily(
        "quotopia_ft_kafka_failures",
        "Kafka sessions that failed: the broker unreachable, or a batch not acknowledged.",
        value=kafka.failures,
    )
    yield GaugeMetricFamily(
        "quotopia_ft_kafka_buffer_quotes",
        "Quotes waiting for the Kafka broker, in the buffer or in flight.",
        value=kafka.buffered + kafka.in_flight,
    )
    yield GaugeMetricFamily(
        "quotopia_ft_kafka_buffer_capacity_quotes",
        "Quotes FT holds for Kafka (in flight too) before dropping the oldest (--kafka-buffer).",
        value=kafka.capacity,
    )
    yield kafka.ack_latency.family(
        "quotopia_ft_kafka_ack_latency_seconds",
        "From a quote's generation to the Kafka broker's acknowledgement.",
    )
