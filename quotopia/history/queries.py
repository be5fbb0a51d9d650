"""Every statement on the history database, as SQLAlchemy Core: one text for both engines.

Each function takes a :class:`~sqlalchemy.engine.Connection` inside the caller's
transaction and blocks; :meth:`quotopia.history.database.Database.run` calls
them in a worker thread. The one dialect-specific construct is the idempotent
insert (``INSERT ... ON CONFLICT DO NOTHING``): SQLite and PostgreSQL spell it
the same, but SQLAlchemy keeps it in each dialect's module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Select,
    bindparam,
    case,
    delete,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement

from quotopia.history.cursor import Cursor
from quotopia.history.request import CandleQuery, HistoryQuery
from quotopia.history.schema import quotes

__all__ = [
    "Candle",
    "StoredQuote",
    "candles",
    "candles_statement",
    "delete_before",
    "has_symbol",
    "history_page",
    "history_statement",
    "insert_quotes",
    "latest_per_symbol",
    "symbols",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StoredQuote:
    """One row of the quotes table."""

    symbol: str
    run_id: int
    sequence: int
    time_us: int
    price: float
    change_percent: float

    @property
    def time(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.time_us)

    def as_row(self) -> dict[str, object]:
        return {
            "symbol": self.symbol,
            "run_id": self.run_id,
            "sequence": self.sequence,
            "time_us": self.time_us,
            "price": self.price,
            "change_percent": self.change_percent,
        }


@dataclass(frozen=True, slots=True)
class Candle:
    """Open, high, low and close of one bucket, and how many quotes it holds."""

    start_us: int
    open: float
    high: float
    low: float
    close: float
    count: int


def insert_quotes(connection: Connection, batch: Sequence[StoredQuote]) -> int:
    """Insert ``batch``, skipping quotes already stored; return how many were new.

    Idempotent: the key ``(symbol, run_id, sequence)`` turns a second write of a
    quote into nothing, so a replay (Kafka's at-least-once, a reconnect's
    snapshot) leaves one row.
    """
    if not batch:
        return 0
    if connection.dialect.name == "postgresql":
        return _insert_unnested(connection, batch)
    statement = (
        sqlite.insert(quotes)
        .on_conflict_do_nothing(index_elements=_KEY)
        # RETURNING lists only the rows actually inserted: the count of new ones.
        .returning(quotes.c.sequence)
    )
    result = connection.execute(statement, [q.as_row() for q in batch])
    return len(result.all())


_KEY = ["symbol", "run_id", "sequence"]
_COLUMNS = [f.name for f in fields(StoredQuote)]


def _insert_unnested(connection: Connection, batch: Sequence[StoredQuote]) -> int:
    """PostgreSQL: the batch as six arrays, ``INSERT ... SELECT FROM unnest(...)``.

    One statement of the same text whatever the batch's size, where a
    multi-row ``VALUES`` differs with every size and is too long for psycopg's
    statement cache: parsing it again for every batch took a quarter of the
    recorder's CPU.
    """
    types = {c.name: c.type for c in quotes.columns}
    arrays = [
        bindparam(name, [getattr(q, name) for q in batch], type_=postgresql.ARRAY(types[name]))
        for name in _COLUMNS
    ]
    rows = func.unnest(*arrays).table_valued(*_COLUMNS).render_derived(name="batch")
    statement = (
        postgresql.insert(quotes)
        .from_select(_COLUMNS, select(*(rows.c[name] for name in _COLUMNS)))
        .on_conflict_do_nothing(index_elements=_KEY)
        .returning(quotes.c.sequence)
    )
    return len(connection.execute(statement).all())


def _select_stored() -> Select[*tuple[Any, ...]]:
    """A SELECT of the columns of :class:`StoredQuote`, in its fields' order, so a
    row unpacks into one: ``StoredQuote(*row)``."""
    return select(*(quotes.c[f.name] for f in fields(StoredQuote)))


def _order_key(descending: bool) -> list[ColumnElement[Any]]:
    columns = (quotes.c.time_us, quotes.c.run_id, quotes.c.sequence)
    return [c.desc() for c in columns] if descending else list(columns)


def history_page(
    connection: Connection, query: HistoryQuery
) -> tuple[list[StoredQuote], Cursor | None]:
    """One page of a symbol's quotes in ``query.order``, and the cursor of the next.

    The next cursor is ``None`` when this page is the last. Reads ``limit + 1``
    rows to know that without a second query.
    """
    rows = [StoredQuote(*row) for row in connection.execute(history_statement(query))]
    if len(rows) <= query.limit:
        return rows, None
    rows = rows[: query.limit]
    last = rows[-1]
    return rows, Cursor(query.symbol, query.order, last.time_us, last.run_id, last.sequence)


def history_statement(query: HistoryQuery) -> Select[*tuple[Any, ...]]:
    """The SELECT behind :func:`history_page`: ``limit + 1`` rows in page order."""
    descending = query.order == "desc"
    statement = _select_stored().where(quotes.c.symbol == query.symbol)
    if query.from_us is not None:
        statement = statement.where(quotes.c.time_us >= query.from_us)
    if query.to_us is not None:
        statement = statement.where(quotes.c.time_us < query.to_us)
    if query.after is not None:
        key = tuple_(quotes.c.time_us, quotes.c.run_id, quotes.c.sequence)
        # Typed as BIGINT: a plain Python int would be bound as INTEGER on
        # PostgreSQL, which no 63-bit run id fits.
        position = tuple_(
            *(
                literal(value, BigInteger)
                for value in (query.after.time_us, query.after.run_id, query.after.sequence)
            )
        )
        statement = statement.where(key < position if descending else key > position)
    return statement.order_by(*_order_key(descending)).limit(query.limit + 1)


def candles(connection: Connection, query: CandleQuery) -> list[Candle]:
    """The candles of ``query``'s window, oldest first; empty buckets are left out.

    Computed in SQL, the same text on both engines: each row's bucket is
    ``time_us - time_us % width``; ``row_number()`` over the bucket, in time
    order and in reverse, marks the first and the last quote, whose prices are
    the open and the close. Ties in time are broken by ``(run_id, sequence)``, so
    both engines pick the same rows.
    """
    return [Candle(*row) for row in connection.execute(candles_statement(query))]


def candles_statement(query: CandleQuery) -> Select[*tuple[Any, ...]]:
    """The SELECT behind :func:`candles`."""
    bucket = (quotes.c.time_us - quotes.c.time_us % query.width_us).label("bucket")
    ranked = (
        select(
            bucket,
            quotes.c.price,
            func.row_number()
            .over(partition_by=bucket, order_by=_order_key(descending=False))
            .label("first"),
            func.row_number()
            .over(partition_by=bucket, order_by=_order_key(descending=True))
            .label("last"),
        )
        .where(
            quotes.c.symbol == query.symbol,
            quotes.c.time_us >= query.from_us,
            quotes.c.time_us < query.to_us,
        )
        .subquery("ranked")
    )
    return (
        select(
            ranked.c.bucket,
            func.max(case((ranked.c.first == 1, ranked.c.price))),
            func.max(ranked.c.price),
            func.min(ranked.c.price),
            func.max(case((ranked.c.last == 1, ranked.c.price))),
            func.count(),
        )
        .group_by(ranked.c.bucket)
        .order_by(ranked.c.bucket)
    )


def has_symbol(connection: Connection, symbol: str) -> bool:
    """Does any row hold ``symbol``? (One probe of the index.)"""
    found = connection.execute(
        select(quotes.c.symbol).where(quotes.c.symbol == symbol).limit(1)
    ).first()
    return found is not None


def symbols(connection: Connection) -> list[str]:
    """Every symbol with rows, in order."""
    return list(
        connection.execute(select(quotes.c.symbol).distinct().order_by(quotes.c.symbol)).scalars()
    )


def latest_per_symbol(connection: Connection, names: Iterable[str]) -> dict[str, StoredQuote]:
    """The newest stored quote of each of ``names`` that has any."""
    latest: dict[str, StoredQuote] = {}
    for name in names:
        row = connection.execute(
            _select_stored()
            .where(quotes.c.symbol == name)
            .order_by(*_order_key(descending=True))
            .limit(1)
        ).first()
        if row is not None:
            latest[name] = StoredQuote(*row)
    return latest


def delete_before(connection: Connection, symbol: str, cutoff_us: int, limit: int) -> int:
    """Delete up to ``limit`` of ``symbol``'s oldest rows older than ``cutoff_us``.

    Returns how many went. Small batches in short transactions: retention never
    holds a lock long enough to stall the writer.
    """
    oldest = (
        select(quotes.c.symbol, quotes.c.run_id, quotes.c.sequence)
        .where(quotes.c.symbol == symbol, quotes.c.time_us < cutoff_us)
        .order_by(quotes.c.time_us)
        .limit(limit)
    )
    statement = delete(quotes).where(
        tuple_(quotes.c.symbol, quotes.c.run_id, quotes.c.sequence).in_(oldest)
    )
    return connection.execute(statement).rowcount
