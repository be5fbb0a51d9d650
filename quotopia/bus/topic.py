"""The Kafka settings every service shares, checked. Pure: no I/O.

A bootstrap list is ``HOST:PORT[,HOST:PORT...]``; a topic name follows Kafka's
own rule (1 to 249 of ``[a-zA-Z0-9._-]``, not ``.`` or ``..``), so a typo is a
one-line error at start, not a broker's error code later.
"""

from __future__ import annotations

import re

from quotopia.addresses import parse_address

__all__ = [
    "BOOTSTRAP_ENV",
    "DEFAULT_PARTITIONS",
    "DEFAULT_TOPIC",
    "SOURCES",
    "TOPIC_ENV",
    "check_source",
    "check_topic",
    "parse_bootstrap",
    "record_key",
]

#: The environment variable every service reads its bootstrap servers from.
BOOTSTRAP_ENV = "QUOTOPIA_KAFKA"
#: The environment variable naming the topic, for every service.
TOPIC_ENV = "QUOTOPIA_KAFKA_TOPIC"
DEFAULT_TOPIC = "quotes"
#: Partitions of a topic FT creates. Four, because Kafka's default partitioner
#: (murmur2 of the key) spreads the default symbols over them one each (SBER 0,
#: ETH 1, BTC 2); with three, all three would hash to partition 1, and two
#: recorders in one group could not share the work.
DEFAULT_PARTITIONS = 4

#: Where Core and the recorder read quotes from: FT's gRPC stream, or the topic.
SOURCES = ("grpc", "kafka")

_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def parse_bootstrap(text: str) -> str:
    """``text`` checked as a bootstrap list and normalised (no blanks).

    Raises ValueError naming the bad entry.
    """
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"bad Kafka bootstrap {text!r}: expected HOST:PORT[,HOST:PORT...]")
    for entry in entries:
        parse_address(entry)
    return ",".join(entries)


def check_topic(name: str) -> str:
    """``name`` if Kafka accepts it as a topic name; otherwise a ValueError."""
    if not _TOPIC.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"bad Kafka topic {name!r}: 1 to 249 of the characters a-z A-Z 0-9 . _ -")
    return name


def record_key(symbol: str) -> bytes:
    """The record key of ``symbol``'s quotes."""
    return symbol.encode()


def check_source(source: str, kafka: str | None, topic: str) -> None:
    """Check a consumer's ``--source``, ``--kafka`` and ``--kafka-topic`` together;
    a ValueError names what is wrong."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if kafka is not None:
        parse_bootstrap(kafka)
    elif source == "kafka":
        raise ValueError("source kafka needs the bootstrap servers: --kafka HOST:PORT")
    check_topic(topic)
