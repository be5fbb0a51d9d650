"""The bench's output: one table on stdout, every figure in bench-results/bench.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Part", "Row", "mib", "ms", "pct", "rate", "save", "table"]


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure of Quotopia's, and what it is measured against."""

    part: str
    metric: str
    quotopia: str
    baseline: str = ""
    notes: str = ""


@dataclass
class Part:
    """One part's rows for the table and its raw figures for the JSON."""

    name: str
    rows: list[Row]
    data: dict[str, object]


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds, with sensible precision; '-' for missing."""
    if seconds is None:
        return "-"
    value = seconds * 1000
    if value < 10:
        return f"{value:.2f} ms"
    if value < 100:
        return f"{value:.1f} ms"
    return f"{value:,.0f} ms"


def rate(per_s: float | None, unit: str = "/s") -> str:
    if per_s is None:
        return "-"
    return f"{per_s:,.0f}{unit}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def mib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**20:,.1f} MiB"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    header = ("part", "metric", "Quotopia", "baseline / compared with", "notes")
    cells = [header, *((r.part, r.metric, r.quotopia, r.baseline, r.notes) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in cells[1:])])


def save(path: Path, meta: dict[str, object], parts: Sequence[Part]) -> None:
    """Write the run's metadata, every row and every raw figure as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "rows": [asdict(row) for part in parts for row in part.rows],
        "parts": {part.name: part.data for part in parts},
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
