"""What the recorder stored and counted, read as a test checks it: the table's keys,
the holes in their sequence numbers, and a metric's total.

The invariant the recorder tests rest on (see :mod:`quotopia.recorder.gaps`): for a
recorder that started on an empty database, the quotes it counts as missed equal
:func:`holes` of what it stored.
"""

from __future__ import annotations

from sqlalchemy import create_engine, text

from quotopia.history.database import parse_database_url

__all__ = ["Key", "by_key", "holes", "rows", "sample_total"]

#: A stored quote's name: ``(symbol, run_id, sequence)``.
Key = tuple[str, int, int]


def rows(database: str) -> list[Key]:
    """Every stored ``(symbol, run_id, sequence)``."""
    url = parse_database_url(database)
    assert url is not None
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            result = connection.execute(text("SELECT symbol, run_id, sequence FROM quotes"))
            return [(r[0], int(r[1]), int(r[2])) for r in result]
    finally:
        engine.dispose()


def by_key(stored: list[Key]) -> dict[tuple[str, int], list[int]]:
    """The stored sequences of each ``(symbol, run_id)``."""
    grouped: dict[tuple[str, int], list[int]] = {}
    for symbol, run_id, sequence in stored:
        grouped.setdefault((symbol, run_id), []).append(sequence)
    return grouped


def holes(stored: list[Key], *, from_first: bool = False) -> int:
    """Sequences absent below each (run, symbol)'s highest: counted from 1, or with
    ``from_first``, from its lowest stored."""
    return sum(max(s) - (min(s) - 1 if from_first else 0) - len(s) for s in by_key(stored).values())


def sample_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    """The sum of every sample of ``name``, whatever its labels."""
    return sum(value for (sample, _), value in samples.items() if sample == name)
