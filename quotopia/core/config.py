"""Core's one frozen, validated configuration object."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quotopia.addresses import parse_address
from quotopia.bus.topic import DEFAULT_TOPIC, SOURCES, check_source

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = ["SOURCES", "CoreConfig", "PushLimits", "parse_address"]


@dataclass(frozen=True, slots=True)
class PushLimits:
    """The push protocols' timings and bounds. Invalid values raise ValueError."""

    #: Seconds between SSE heartbeats (a comment line) on an idle stream.
    heartbeat: float = 15.0
    #: Seconds a connection's oldest pending event may wait before it is closed.
    lag_limit: float = 10.0
    #: Seconds between WebSocket pings (protocol-level, answered by every client).
    ws_ping_interval: float = 20.0
    #: Seconds without a pong (or anything) from a WebSocket client before it is
    #: counted as dead and dropped.
    ws_ping_timeout: float = 20.0
    #: Symbols one WebSocket may subscribe to; one more closes it with 1008.
    ws_max_subscriptions: int = 100
    #: Bytes in one WebSocket message from a client; more closes it with 1009.
    ws_max_message: int = 4096

    def __post_init__(self) -> None:
        for name in ("heartbeat", "lag_limit", "ws_ping_interval", "ws_ping_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', ' ')} must be positive seconds, got {value}")
        if self.ws_max_subscriptions < 1:
            raise ValueError(
                f"ws max subscriptions must be at least 1, got {self.ws_max_subscriptions}"
            )
        if self.ws_max_message < 64:
            raise ValueError(f"ws max message must be at least 64 bytes, got {self.ws_max_message}")


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Everything Core needs to run. Invalid values raise :class:`ValueError`."""

    host: str = "0.0.0.0"
    #: 0 asks the OS for a free port; :func:`quotopia.core.serve` reports the real one.
    port: int = 8080
    #: Where FT listens, as HOST:PORT.
    ft_addr: str = "127.0.0.1:50051"
    #: First reconnect delay, in seconds; it doubles after every failure.
    backoff_initial: float = 0.1
    #: Longest reconnect delay, in seconds.
    backoff_cap: float = 5.0
    #: Seconds without any data from FT (while connecting, or between two quotes)
    #: after which the feed counts as lost and is reconnected. Keep it above FT's
    #: tick interval.
    feed_timeout: float = 5.0
    #: Seconds in-flight HTTP requests get to finish on shutdown.
    graceful_timeout: float = 1.0
    #: Processes serving HTTP on the one port, each a whole Core with its own feed.
    workers: int = 1
    #: Seconds Core keeps serving after SIGTERM with /readyz answering 503 before it
    #: stops accepting, so a load balancer (a Kubernetes Service) takes it out first.
    shutdown_delay: float = 0.0
    #: Log one line per HTTP request (hypercorn's access log).
    access_log: bool = False
    #: The push protocols' timings and bounds (SSE and WebSocket).
    push: PushLimits = field(default_factory=PushLimits)
    #: The history database Core reads (``sqlite:///PATH``, ``postgresql://...``);
    #: None (or ``"none"``): no history, the history routes answer 503. Core only
    #: reads it: it never migrates it, nor creates a SQLite file.
    database: str | None = None
    #: ``"grpc"`` (FT's stream at :attr:`ft_addr`) or ``"kafka"`` (the topic).
    source: str = "grpc"
    #: Kafka bootstrap servers (``HOST:PORT[,...]``); needed with ``source="kafka"``.
    kafka: str | None = None
    kafka_topic: str = DEFAULT_TOPIC
    #: At start, records read back from the end of each partition to find each
    #: symbol's latest quote.
    kafka_replay: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        check_source(self.source, self.kafka, self.kafka_topic)
        if self.kafka_replay < 1:
            raise ValueError(f"Kafka replay must be at least 1 record, got {self.kafka_replay}")
        parse_address(self.ft_addr)
        if not (math.isfinite(self.backoff_initial) and self.backoff_initial > 0):
            raise ValueError(f"backoff initial delay must be positive, got {self.backoff_initial}")
        if not (math.isfinite(self.backoff_cap) and self.backoff_cap >= self.backoff_initial):
            raise ValueError(
                f"backoff cap must be at least the initial delay ({self.backoff_initial}), "
                f"got {self.backoff_cap}"
            )
        if not (math.isfinite(self.feed_timeout) and self.feed_timeout > 0):
            raise ValueError(f"feed timeout must be positive, got {self.feed_timeout}")
        if not (math.isfinite(self.graceful_timeout) and self.graceful_timeout >= 0):
            raise ValueError(f"graceful timeout must be >= 0, got {self.graceful_timeout}")
        if not (math.isfinite(self.shutdown_delay) and self.shutdown_delay >= 0):
            raise ValueError(f"shutdown delay must be >= 0 seconds, got {self.shutdown_delay}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.database is not None:
            from quotopia.history.database import parse_database_url

            parse_database_url(self.database)  # ValueError: a one-line message

    @property
    def database_url(self) -> URL | None:
        """:attr:`database`, parsed (None: no history)."""
        if self.database is None:
            return None
        from quotopia.history.database import parse_database_url

        return parse_database_url(self.database)

    @property
    def ft_host_port(self) -> tuple[str, int]:
        return parse_address(self.ft_addr)
