"""FT's one frozen, validated configuration object."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quotopia.bus.topic import DEFAULT_PARTITIONS, DEFAULT_TOPIC, check_topic, parse_bootstrap
from quotopia.market import DEFAULT_SYMBOLS, Instrument, parse_symbols

__all__ = ["FTConfig"]


@dataclass(frozen=True, slots=True)
class FTConfig:
    """Everything FT needs to run. Invalid values raise :class:`ValueError`."""

    host: str = "0.0.0.0"
    #: 0 asks the OS for a free port; :func:`quotopia.ft.serve` reports the real one.
    port: int = 50051
    #: HTTP port of /metrics, /livez and /readyz (0: a free one, logged). 8081 sits
    #: beside Core's 8080 and clear of Prometheus's own components (9090-9094,
    #: exporters from 9100 up) and Grafana (3000).
    metrics_port: int = 8081
    #: Seconds between two price updates.
    tick_interval: float = 1.0
    #: Seed of the random walk; None seeds from the OS (a different path every run).
    seed: int | None = None
    instruments: tuple[Instrument, ...] = field(
        default_factory=lambda: parse_symbols(DEFAULT_SYMBOLS)
    )
    #: How long a SIGTERM waits for open streams to end before cutting them.
    drain_timeout: float = 5.0
    #: Seconds of quiet after which FT pings a connection (HTTP/2 PING), and then
    #: waits as long again for the answer before closing it: frees connections whose
    #: client froze, vanished without a FIN, or never completed the handshake.
    keepalive: float = 30.0
    #: Ticks buffered per subscriber; past that, its quotes are conflated.
    subscriber_buffer: int = 16
    #: Seconds a subscriber may stay behind (conflated) before it is disconnected
    #: with RESOURCE_EXHAUSTED as a slow consumer.
    slow_consumer_timeout: float = 10.0
    #: Kafka bootstrap servers (``HOST:PORT[,...]``) FT also publishes every quote
    #: to; None: gRPC only.
    kafka: str | None = None
    #: The topic, created when missing with ``kafka_partitions`` partitions and
    #: ``kafka_replication`` replicas.
    kafka_topic: str = DEFAULT_TOPIC
    kafka_partitions: int = DEFAULT_PARTITIONS
    kafka_replication: int = 1
    #: Quotes held for a slow or absent broker; past that the oldest are dropped
    #: (and counted), so the newest prices are the ones that reach Kafka.
    kafka_buffer: int = 10_000
    #: Use Kafka's idempotent producer (no duplicates from retries). Brokers that
    #: lack it (Tansu 0.6) need False: then ``acks=all`` without idempotence.
    kafka_idempotence: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be 0..65535, got {self.metrics_port}")
        if self.metrics_port == self.port != 0:
            raise ValueError(f"metrics port and gRPC port are both {self.port}")
        if not (math.isfinite(self.tick_interval) and self.tick_interval > 0):
            raise ValueError(
                f"tick interval must be a positive number of seconds, got {self.tick_interval}"
            )
        if not (math.isfinite(self.drain_timeout) and self.drain_timeout >= 0):
            raise ValueError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout}")
        if not (math.isfinite(self.slow_consumer_timeout) and self.slow_consumer_timeout >= 0):
            raise ValueError(
                f"slow consumer timeout must be >= 0 seconds, got {self.slow_consumer_timeout}"
            )
        if not (math.isfinite(self.keepalive) and self.keepalive > 0):
            raise ValueError(
                f"keepalive must be a positive number of seconds, got {self.keepalive}"
            )
        if self.subscriber_buffer < 1:
            raise ValueError(f"subscriber buffer must be at least 1, got {self.subscriber_buffer}")
        if self.seed is not None and self.seed < 0:
            # random.Random ignores the sign: -5 and 5 would give the same path.
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.instruments:
            raise ValueError("at least one symbol is needed")
        if self.kafka is not None:
            parse_bootstrap(self.kafka)
        check_topic(self.kafka_topic)
        if self.kafka_partitions < 1:
            raise ValueError(f"Kafka partitions must be at least 1, got {self.kafka_partitions}")
        if self.kafka_replication < 1:
            raise ValueError(f"Kafka replication must be at least 1, got {self.kafka_replication}")
        if self.kafka_buffer < 1:
            raise ValueError(f"Kafka buffer must be at least 1, got {self.kafka_buffer}")
