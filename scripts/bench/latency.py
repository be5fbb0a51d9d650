"""A latency histogram that load processes fill and the bench merges.

Fixed 10 µs buckets, stored sparsely: cheap to fill on a hot path, exact to merge
across processes (unlike averaging per-process percentiles), small as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["RESOLUTION", "Histogram", "percentile"]

#: Width of one bucket, in seconds.
RESOLUTION = 1e-5


class Histogram:
    """Counts of latencies (seconds), in :data:`RESOLUTION`-wide buckets.

    A negative latency (the clock stepped back) is counted in bucket 0 and in
    :attr:`negative`, so it stays visible without skewing the percentiles.
    """

    def __init__(self, counts: Mapping[int, int] | None = None, negative: int = 0) -> None:
        self.counts: dict[int, int] = dict(counts or {})
        self.negative = negative

    def add(self, seconds: float) -> None:
        if seconds < 0:
            self.negative += 1
            bucket = 0
        else:
            bucket = int(seconds / RESOLUTION)
        counts = self.counts
        counts[bucket] = counts.get(bucket, 0) + 1

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.add(value)

    def merge(self, other: Histogram) -> None:
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.negative += other.negative

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1), as the upper edge of its bucket; None if empty."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return (bucket + 1) * RESOLUTION
        raise AssertionError("unreachable: rank <= total")

    def max(self) -> float | None:
        return (max(self.counts) + 1) * RESOLUTION if self.counts else None

    def to_json(self) -> dict[str, object]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "negative": self.negative}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Histogram:
        counts = data.get("counts", {})
        negative = data.get("negative", 0)
        assert isinstance(counts, dict)
        assert isinstance(negative, int)
        return cls({int(k): int(v) for k, v in counts.items()}, negative)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
