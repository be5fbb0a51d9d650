"""The history database's one table, as SQLAlchemy Core sees it.

One row per quote FT generated. The key is ``(symbol, run_id, sequence)``: FT's
sequence numbers restart with FT (and a seeded FT replays the same prices), but
each FT run draws a new ``run_id``, so the key names one quote for good, and
writing the same quote twice (a replay from Kafka, a reconnect's snapshot) hits
the key and leaves one row.

Times are whole microseconds since the Unix epoch, UTC, in a 64-bit integer:
the precision of FT's clock and of PostgreSQL's timestamps, exact, and bucketed
into candles by the same integer arithmetic on every engine (``time_us -
time_us % width``), where native timestamp types would need one function per
dialect. ``to_timestamp(time_us / 1e6)`` in psql, ``datetime(time_us / 1e6,
'unixepoch', 'subsec')`` in sqlite3 show them as dates.

The migrations in ``quotopia/history/migrations`` create exactly this; a test
compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

__all__ = ["SYMBOL_LENGTH", "metadata", "quotes"]

#: The longest symbol a row holds. FT's symbols are short ASCII words.
SYMBOL_LENGTH = 32

metadata = MetaData()

quotes = Table(
    "quotes",
    metadata,
    Column("symbol", String(SYMBOL_LENGTH), nullable=False),
    Column("run_id", BigInteger, nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("price", Double, nullable=False),
    Column("change_percent", Double, nullable=False),
    PrimaryKeyConstraint("symbol", "run_id", "sequence", name="pk_quotes"),
    # History pages and candles: one symbol, a time range, in time order. The
    # key's columns follow the time, so a page's cursor (time, run, sequence)
    # is a position in this index.
    Index("ix_quotes_symbol_time", "symbol", "time_us", "run_id", "sequence"),
)
