"""Gap detection by sequence number. Pure: no I/O, no clock.

FT numbers each symbol's quotes 1, 2, 3... within a run (its opening price is
1), and a new FT process starts a new run with a new random ``run_id``, so a
quote's name ``(symbol, run_id, sequence)`` is unique for good. Per
``(run_id, symbol)`` the tracker remembers the highest sequence seen:

- the next number: nothing missed;
- a jump from ``last`` to ``n``: ``n - last - 1`` quotes missed (the recorder fell
  behind and FT conflated or dropped it, or the feed was down);
- the first quote of a run it has not seen, numbered ``n``: the ``n - 1`` before
  it were missed (the recorder started, or reconnected, after the run began);
- ``n <= last``: a replay (a reconnect's snapshot repeats the latest quote; Kafka
  redelivers after a rebalance). Not a gap; the database keeps one row.

So, for a recorder that started on an empty database, the number of quotes it
counts as missed is exactly, summed over every ``(run, symbol)``, the highest
stored sequence minus the number of stored rows. The tests check that.

Seeded with the newest stored quote per symbol, the tracker also counts what a
recorder missed while it was down, if FT kept the same run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Gap", "GapTracker"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Quotes ``first..last`` (inclusive) of ``symbol`` in run ``run_id`` never arrived."""

    symbol: str
    run_id: int
    first: int
    last: int

    @property
    def missed(self) -> int:
        return self.last - self.first + 1


class GapTracker:
    """The highest sequence seen per ``(run_id, symbol)``, and what it tells.

    Bounded: per symbol it remembers the :data:`RUNS_KEPT` most recent runs, enough
    for any replay that crosses an FT restart.
    """

    __slots__ = ("_last", "_recent_runs", "gaps", "missed", "replays", "runs")

    #: Runs remembered per symbol (and in all, for counting new ones).
    RUNS_KEPT = 16

    def __init__(self) -> None:
        self._last: dict[str, dict[int, int]] = {}
        self._recent_runs: dict[int, None] = {}
        #: Quotes missed, per symbol.
        self.missed: dict[str, int] = {}
        #: Gaps (events, each of one or more quotes), per symbol.
        self.gaps: dict[str, int] = {}
        #: Quotes that arrived again, per symbol.
        self.replays: dict[str, int] = {}
        #: FT runs seen in the feed.
        self.runs = 0

    def seed(self, stored: Iterable[tuple[str, int, int]]) -> None:
        """Start from what the database already holds: ``(symbol, run_id, sequence)``."""
        for symbol, run_id, sequence in stored:
            runs = self._last.setdefault(symbol, {})
            runs[run_id] = max(sequence, runs.get(run_id, 0))
            self._recent_runs[run_id] = None

    def observe(self, symbol: str, run_id: int, sequence: int) -> Gap | None:
        """Note one quote; return the gap it reveals, if any."""
        runs = self._last.get(symbol)
        if runs is None:
            runs = self._last[symbol] = {}
        last = runs.get(run_id)
        if last is None:
            self._new_run(run_id)
            if len(runs) >= self.RUNS_KEPT:
                del runs[next(iter(runs))]
            last = 0
        elif sequence <= last:
            self.replays[symbol] = self.replays.get(symbol, 0) + 1
            return None
        runs[run_id] = sequence
        if sequence == last + 1:
            return None
        gap = Gap(symbol, run_id, last + 1, sequence - 1)
        self.missed[symbol] = self.missed.get(symbol, 0) + gap.missed
        self.gaps[symbol] = self.gaps.get(symbol, 0) + 1
        return gap

    def _new_run(self, run_id: int) -> None:
        if run_id in self._recent_runs:
            return
        self.runs += 1
        self._recent_runs[run_id] = None
        if len(self._recent_runs) > self.RUNS_KEPT:
            del self._recent_runs[next(iter(self._recent_runs))]
