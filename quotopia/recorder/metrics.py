"""The recorder's metrics: plain numbers kept by their owners, turned into metric
families when Prometheus scrapes (as FT does; see :mod:`quotopia.telemetry.metrics`).

Labels stay bounded: ``symbol`` (the symbols FT publishes) and fixed words. A run
id is never a label: every FT restart would add a series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quotopia.recorder.gaps import GapTracker
from quotopia.telemetry.metrics import FastHistogram, new_registry

__all__ = ["BATCH_BUCKETS", "RecorderMetrics"]

#: Seconds one batch takes to commit: from 1 ms to 10 s.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds from a quote's generation at FT to its commit: from 5 ms to 30 s, finest
#: around the flush interval (0.2 s), where most quotes land.
WRITE_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class RecorderMetrics(Collector):
    """The recorder's registry and the numbers behind it. One event loop owns it."""

    def __init__(
        self,
        gaps: GapTracker,
        buffered: Callable[[], int],
        buffer_capacity: int,
        ready: Callable[[], bool],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._gaps = gaps
        self._buffered = buffered
        self._capacity = buffer_capacity
        self._ready = ready
        self._wall_clock = wall_clock
        #: Quotes taken off the feed, per symbol.
        self.received: dict[str, int] = {}
        #: Quotes refused as unstorable (no run id, no time, a bad symbol...).
        self.rejected = 0
        #: Rows the database gained, and quotes it already held.
        self.written = 0
        self.duplicates = 0
        #: Batches committed, and attempts that failed (and were retried).
        self.batches = 0
        self.batch_failures = 0
        self.batch_duration = FastHistogram(BATCH_BUCKETS)
        #: A quote's generation at FT (its timestamp) to its commit.
        self.write_latency = FastHistogram(WRITE_BUCKETS)
        #: The newest quote time committed, seconds since the epoch (0: none yet).
        self.newest_committed = 0.0
        self.feed_connected = False
        self.feed_sessions = 0
        #: With --source kafka: offset commits and failed ones; the partitions this
        #: member holds and, per partition, the next offset to commit (the group's
        #: commit) and the high-water mark of the last fetch.
        self.kafka: bool = False
        self.kafka_commits = 0
        self.kafka_commit_failures = 0
        self.kafka_partitions: set[int] = set()
        self.kafka_committed: dict[int, int] = {}
        self.kafka_highwater: dict[int, int] = {}
        self.database_up = False
        self.retention_deleted = 0
        self.registry: CollectorRegistry = new_registry("recorder")
        self.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        yield _per_symbol(
            "quotopia_recorder_quotes_received", "Quotes taken off the feed.", self.received
        )
        yield _per_symbol(
            "quotopia_recorder_missed_quotes",
            "Quotes never received, found by gaps in sequence numbers.",
            self._gaps.missed,
            self.received,
        )
        yield _per_symbol(
            "quotopia_recorder_gaps",
            "Gaps in sequence numbers (each of one or more quotes).",
            self._gaps.gaps,
            self.received,
        )
        yield _per_symbol(
            "quotopia_recorder_replayed_quotes",
            "Quotes received again (a reconnect's snapshot, a redelivery).",
            self._gaps.replays,
            self.received,
        )
        yield CounterMetricFamily(
            "quotopia_recorder_ft_runs",
            "FT runs (processes) seen in the feed.",
            value=self._gaps.runs,
        )
        yield CounterMetricFamily(
            "quotopia_recorder_quotes_rejected",
            "Quotes refused as unstorable (no run id or time, a bad symbol or price).",
            value=self.rejected,
        )
        yield CounterMetricFamily(
            "quotopia_recorder_rows_written", "Rows added to the database.", value=self.written
        )
        yield CounterMetricFamily(
            "quotopia_recorder_duplicate_quotes",
            "Quotes written that the database already held (idempotent: no new row).",
            value=self.duplicates,
        )
        batches = CounterMetricFamily(
            "quotopia_recorder_batches", "Batch transactions, by outcome.", labels=["outcome"]
        )
        batches.add_metric(["committed"], self.batches)
        batches.add_metric(["failed"], self.batch_failures)
        yield batches
        yield self.batch_duration.family(
            "quotopia_recorder_batch_duration_seconds", "Time to write and commit one batch."
        )
        yield self.write_latency.family(
            "quotopia_recorder_write_latency_seconds",
            "From a quote's generation at FT to its commit in the database.",
        )
        newest = self.newest_committed
        yield GaugeMetricFamily(
            "quotopia_recorder_lag_seconds",
            "Age of the newest committed quote (grows while writes stall or the feed is down).",
            value=max(0.0, self._wall_clock() - newest) if newest else 0.0,
        )
        yield GaugeMetricFamily(
            "quotopia_recorder_buffer_quotes",
            "Quotes received and not yet handed to the database.",
            value=self._buffered(),
        )
        yield GaugeMetricFamily(
            "quotopia_recorder_buffer_capacity_quotes",
            "Quotes the buffer holds at most (--buffer).",
            value=self._capacity,
        )
        yield GaugeMetricFamily(
            "quotopia_recorder_feed_connected",
            "1 while a feed session is open.",
            value=int(self.feed_connected),
        )
        yield CounterMetricFamily(
            "quotopia_recorder_feed_sessions", "Feed sessions opened.", value=self.feed_sessions
        )
        if self.kafka:
            yield from self._kafka_families()
        yield GaugeMetricFamily(
            "quotopia_recorder_database_up",
            "1 while the last database call succeeded.",
            value=int(self.database_up),
        )
        yield CounterMetricFamily(
            "quotopia_recorder_retention_deleted_rows",
            "Rows deleted by --retention.",
            value=self.retention_deleted,
        )
        yield GaugeMetricFamily(
            "quotopia_recorder_ready", "1 while /readyz answers 200.", value=int(self._ready())
        )

    def _kafka_families(self) -> Iterable[Metric]:
        """The consumer group's figures; ``partition`` is bounded by the topic."""
        yield CounterMetricFamily(
            "quotopia_recorder_kafka_commits",
            "Offset commits to the consumer group, each after a database commit.",
            value=self.kafka_commits,
        )
        yield CounterMetricFamily(
            "quotopia_recorder_kafka_commit_failures",
            "Offset commits refused (a rebalance) or failed (the broker); retried.",
            value=self.kafka_commit_failures,
        )
        yield GaugeMetricFamily(
            "quotopia_recorder_kafka_assigned_partitions",
            "Partitions of the topic this member of the group holds.",
            value=len(self.kafka_partitions),
        )
        committed = GaugeMetricFamily(
            "quotopia_recorder_kafka_committed_offset",
            "The group's committed offset of each partition this member holds "
            "(the next record to read after a restart).",
            labels=["partition"],
        )
        lag = GaugeMetricFamily(
            "quotopia_recorder_kafka_lag_records",
            "Records of each partition this member holds not yet committed "
            "(high-water mark minus committed offset): the consumer lag.",
            labels=["partition"],
        )
        for partition in sorted(self.kafka_partitions):
            offset = self.kafka_committed.get(partition)
            if offset is None:
                continue
            committed.add_metric([str(partition)], offset)
            end = self.kafka_highwater.get(partition)
            if end is not None:
                lag.add_metric([str(partition)], max(0, end - offset))
        yield committed
        yield lag


def _per_symbol(
    name: str, documentation: str, counts: dict[str, int], symbols: Iterable[str] = ()
) -> CounterMetricFamily:
    """A counter per symbol; every one of ``symbols`` appears, at 0 until it counts,
    so that ``increase()`` sees its first event."""
    family = CounterMetricFamily(name, documentation, labels=["symbol"])
    for symbol in sorted({*counts, *symbols}):
        family.add_metric([symbol], counts.get(symbol, 0))
    return family
