"""The recorder's one frozen, validated configuration object, and ``--retention``'s syntax."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from quotopia.addresses import parse_address
from quotopia.bus.topic import DEFAULT_TOPIC, SOURCES, check_source

__all__ = ["DEFAULT_GROUP", "SOURCES", "RecorderConfig", "parse_duration"]

#: The consumer group recorders share (so replicas split the partitions).
DEFAULT_GROUP = "quotopia-recorder"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"`` (or ``"1d12h"``) in seconds; ``"none"``
    (or empty) is ``None``: keep everything. Raises :class:`ValueError` otherwise."""
    spelled = text.strip().lower()
    if spelled in ("", "none", "off", "forever"):
        return None
    position, seconds = 0, 0.0
    for match in _DURATION.finditer(spelled):
        if match.start() != position:
            break
        seconds += float(match[1]) * _UNIT_SECONDS[match[2]]
        position = match.end()
    if position != len(spelled) or position == 0:
        raise ValueError(f"bad duration {text!r}: expected e.g. 7d, 12h, 30m, 90s or none")
    if seconds <= 0:
        raise ValueError(f"a retention of {text!r} would delete every quote as it arrives")
    return seconds


@dataclass(frozen=True, slots=True)
class RecorderConfig:
    """Everything the recorder needs to run. Invalid values raise :class:`ValueError`."""

    #: The history database's URL (``sqlite:///PATH`` or ``postgresql://...``).
    database: str
    #: FT's gRPC address.
    ft_addr: str = "127.0.0.1:50051"
    #: Address of /metrics, /livez and /readyz.
    host: str = "0.0.0.0"
    #: Their port (0: a free one, logged). 8082 follows FT's 8081 and Core's 8080.
    metrics_port: int = 8082
    #: Quotes written in one transaction, at most.
    batch_size: int = 2000
    #: Seconds a batch may wait to fill before it is written anyway.
    flush_interval: float = 0.2
    #: Quotes held between the feed and the database. When it is full the
    #: recorder stops reading the feed, and FT's own slow-consumer policy applies
    #: (conflation, then a disconnect); what that skips is counted as a gap.
    buffer: int = 10_000
    #: Seconds a quote is kept; None keeps every quote.
    retention: float | None = None
    #: Seconds between two retention sweeps.
    retention_interval: float = 60.0
    #: Rows one retention statement deletes at most (one short transaction each).
    retention_batch: int = 1000
    #: Apply the schema's migrations at start (else wait until someone has).
    migrate: bool = True
    #: Longest wait, in seconds, between attempts (FT, the database).
    backoff_cap: float = 5.0
    #: Seconds without data from FT before the feed counts as lost.
    feed_timeout: float = 5.0
    #: On shutdown, seconds the buffered quotes get to reach the database.
    drain_timeout: float = 5.0
    #: ``"grpc"`` (FT's stream at :attr:`ft_addr`) or ``"kafka"`` (the topic).
    source: str = "grpc"
    #: Kafka bootstrap servers (``HOST:PORT[,...]``); needed with ``source="kafka"``.
    kafka: str | None = None
    kafka_topic: str = DEFAULT_TOPIC
    #: The consumer group: recorders in one group share the topic's partitions.
    kafka_group: str = DEFAULT_GROUP
    #: Seconds a group member may stay silent before Kafka counts it gone and moves
    #: its partitions to the others (heartbeats go at a third of it, 3 s at most).
    kafka_session_timeout: float = 10.0

    def __post_init__(self) -> None:
        from quotopia.history.database import parse_database_url

        check_source(self.source, self.kafka, self.kafka_topic)
        if not self.kafka_group.strip():
            raise ValueError("the Kafka consumer group needs a name")
        if not (math.isfinite(self.kafka_session_timeout) and self.kafka_session_timeout >= 0.5):
            raise ValueError(
                f"Kafka session timeout must be at least 0.5 s, got {self.kafka_session_timeout}"
            )

        if parse_database_url(self.database) is None:
            raise ValueError(
                "the recorder needs a database: --db sqlite:///PATH or postgresql://..."
            )
        parse_address(self.ft_addr)
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be 0..65535, got {self.metrics_port}")
        for name in ("batch_size", "buffer", "retention_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        if self.buffer < self.batch_size:
            raise ValueError(
                f"buffer ({self.buffer}) must hold at least one batch ({self.batch_size})"
            )
        for name in ("flush_interval", "backoff_cap", "feed_timeout", "retention_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', ' ')} must be a positive number of seconds")
        if not (math.isfinite(self.drain_timeout) and self.drain_timeout >= 0):
            raise ValueError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout}")
        if self.retention is not None and not (
            math.isfinite(self.retention) and self.retention > 0
        ):
            raise ValueError(
                f"retention must be a positive number of seconds, got {self.retention}"
            )

    @property
    def ft_host_port(self) -> tuple[str, int]:
        return parse_address(self.ft_addr)
