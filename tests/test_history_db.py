"""The history database on both engines: migrations, idempotent writes, pages, candles.

Every test runs on SQLite and on a private PostgreSQL server (the ``database_url``
fixture in conftest.py). Properties state what must hold for any data: pages
cover a window exactly once, candles equal a reference computed in Python, and
both engines give identical candles for the same rows.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from _postgres import Postgres
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection

from quotopia.history import queries
from quotopia.history.database import Database, head_revision, parse_database_url, upgrade
from quotopia.history.queries import Candle, StoredQuote
from quotopia.history.request import INTERVALS, CandleQuery, HistoryQuery, candle_query
from quotopia.history.schema import metadata, quotes

pytestmark = pytest.mark.anyio

T0 = 1_764_698_400_000_000  # 2025-12-02T18:00:00Z, in microseconds
SYMBOLS = ("BTC", "ETH")
# A function-scoped database is fine here: each example empties the table first.
EXAMPLES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    url = parse_database_url(database_url)
    assert url is not None
    upgrade(url)
    with Database(url) as db:
        yield db


async def _reset(db: Database, rows: Iterable[StoredQuote] = ()) -> None:
    batch = list(rows)

    def work(c: Connection) -> None:
        c.execute(delete(quotes))
        queries.insert_quotes(c, batch)

    await db.run(work)


def _quote(symbol: str, run_id: int, sequence: int, time_us: int, price: float) -> StoredQuote:
    return StoredQuote(symbol, run_id, sequence, time_us, price, 0.0)


quote_rows = st.lists(
    st.builds(
        _quote,
        st.sampled_from(SYMBOLS),
        # Run ids are 63-bit: the largest must survive every bind and comparison.
        st.sampled_from([1, 2, 2**63 - 1]),
        st.integers(1, 40),
        # Within ten minutes, with ties: the tie-breakers must agree too.
        st.integers(0, 600).map(lambda s: T0 + s * 1_000_000 + (s % 3) * 250_000),
        st.floats(1, 100_000, allow_nan=False).map(lambda p: round(p, 2)),
    ),
    max_size=120,
    unique_by=lambda q: (q.symbol, q.run_id, q.sequence),
)


# --- schema -----------------------------------------------------------------------------


async def test_migrations_create_exactly_what_the_schema_declares(database: Database) -> None:
    def differences(c: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(c), metadata))

    assert await database.run(differences) == []
    assert await database.revision() == head_revision()


def test_services_starting_together_migrate_one_after_the_other(database_url: str) -> None:
    url = parse_database_url(database_url)
    assert url is not None
    results: list[tuple[str | None, str]] = []
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            results.append(upgrade(url))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    # Exactly one found an empty database; the others found the work done.
    assert sorted(results, key=lambda r: r[0] or "") == [
        (None, "0001"),
        ("0001", "0001"),
        ("0001", "0001"),
    ]


# --- writes ---------------------------------------------------------------------------


@EXAMPLES
@given(batches=st.lists(quote_rows, min_size=1, max_size=4))
async def test_writing_a_quote_twice_leaves_one_row(
    database: Database, batches: list[list[StoredQuote]]
) -> None:
    await _reset(database)
    first: dict[tuple[str, int, int], StoredQuote] = {}
    new = 0
    for batch in batches:
        new += await database.run(lambda c, b=batch: queries.insert_quotes(c, b))  # type: ignore[misc]
        for q in batch:
            first.setdefault((q.symbol, q.run_id, q.sequence), q)
    stored = await database.run(
        lambda c: [StoredQuote(*row) for row in c.execute(select(*quotes.c))]
    )
    assert new == len(first)
    # The first write of a key stays; later writes of it are no-ops.
    assert sorted(stored, key=repr) == sorted(first.values(), key=repr)


# --- history pages --------------------------------------------------------------------


def _sort_key(q: StoredQuote) -> tuple[int, int, int]:
    return (q.time_us, q.run_id, q.sequence)


async def _all_pages(db: Database, query: HistoryQuery) -> list[StoredQuote]:
    seen: list[StoredQuote] = []
    while True:
        page, cursor = await db.run(lambda c, q=query: queries.history_page(c, q))  # type: ignore[misc]
        assert len(page) <= query.limit
        seen += page
        if cursor is None:
            return seen
        assert len(page) == query.limit  # only a full page has a next one
        query = HistoryQuery(
            query.symbol, query.from_us, query.to_us, query.limit, query.order, cursor
        )


@EXAMPLES
@given(
    rows=quote_rows,
    limit=st.integers(1, 30),
    descending=st.booleans(),
    window=st.tuples(st.integers(-10, 700), st.integers(-10, 700)).map(sorted),
    bounded=st.booleans(),
)
async def test_pages_cover_the_window_exactly_once_in_order(
    database: Database,
    rows: list[StoredQuote],
    limit: int,
    descending: bool,
    window: list[int],
    bounded: bool,
) -> None:
    await _reset(database, rows)
    from_us, to_us = (T0 + window[0] * 1_000_000, T0 + window[1] * 1_000_000)
    query = HistoryQuery(
        "BTC",
        from_us if bounded else None,
        to_us if bounded else None,
        limit,
        "desc" if descending else "asc",
        None,
    )
    expected = sorted(
        (q for q in rows if q.symbol == "BTC" and (not bounded or from_us <= q.time_us < to_us)),
        key=_sort_key,
        reverse=descending,
    )
    assert await _all_pages(database, query) == expected


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_paging_is_stable_under_concurrent_inserts(database: Database, order: str) -> None:
    before = [_quote("BTC", 1, n, T0 + n * 1_000_000, 100.0 + n) for n in range(1, 51)]
    await _reset(database, before)
    query = HistoryQuery("BTC", None, None, 7, order, None)  # type: ignore[arg-type]
    seen: list[StoredQuote] = []
    newer = 51
    while True:
        page, cursor = await database.run(lambda c, q=query: queries.history_page(c, q))  # type: ignore[misc]
        seen += page
        # The recorder keeps writing newer quotes while a client pages.
        arriving = [
            _quote("BTC", 1, newer + i, T0 + (newer + i) * 1_000_000, 1.0) for i in range(3)
        ]
        newer += 3
        await database.run(lambda c, b=arriving: queries.insert_quotes(c, b))  # type: ignore[misc]
        if cursor is None:
            break
        query = HistoryQuery("BTC", None, None, 7, query.order, cursor)
    keys = [_sort_key(q) for q in seen]
    assert len(keys) == len(set(keys)), "a row was served twice"
    assert set(before) <= set(seen), "a row that was there all along was skipped"
    assert keys == sorted(keys, reverse=order == "desc")


# --- candles --------------------------------------------------------------------------


def reference_candles(rows: Iterable[StoredQuote], query: CandleQuery) -> list[Candle]:
    """Candles computed in Python, the obvious way."""
    buckets: dict[int, list[StoredQuote]] = {}
    for q in sorted(rows, key=_sort_key):
        if q.symbol == query.symbol and query.from_us <= q.time_us < query.to_us:
            buckets.setdefault(q.time_us - q.time_us % query.width_us, []).append(q)
    return [
        Candle(
            start,
            held[0].price,
            max(q.price for q in held),
            min(q.price for q in held),
            held[-1].price,
            len(held),
        )
        for start, held in sorted(buckets.items())
    ]


candle_queries = st.builds(
    lambda interval, start, span: candle_query(
        "BTC",
        {
            "interval": interval,
            "from": str(T0 // 1_000_000 + start),
            "to": str(T0 // 1_000_000 + start + span),
        },
        0,
    ),
    st.sampled_from(["1s", "1m", "5m"]),
    st.integers(-100, 600),
    st.integers(0, 700),
)


@EXAMPLES
@given(rows=quote_rows, query=candle_queries)
async def test_candles_match_a_reference_computed_in_python(
    database: Database, rows: list[StoredQuote], query: CandleQuery
) -> None:
    await _reset(database, rows)
    assert await database.run(lambda c: queries.candles(c, query)) == reference_candles(rows, query)


@pytest.fixture
async def both_engines(
    tmp_path: Path, postgres_server: Postgres
) -> AsyncIterator[tuple[Database, Database]]:
    postgres_server.psql("DROP DATABASE IF EXISTS candles_both")
    postgres_server.psql("CREATE DATABASE candles_both")
    urls = [
        parse_database_url(f"sqlite:///{tmp_path / 'candles.db'}"),
        parse_database_url(postgres_server.url.rsplit("/", 1)[0] + "/candles_both"),
    ]
    dbs = []
    for url in urls:
        assert url is not None
        upgrade(url)
        dbs.append(Database(url))
    try:
        yield dbs[0], dbs[1]
    finally:
        for db in dbs:
            db.close()


@EXAMPLES
@given(rows=quote_rows, interval=st.sampled_from(list(INTERVALS)))
async def test_both_engines_give_identical_candles(
    both_engines: tuple[Database, Database], rows: list[StoredQuote], interval: str
) -> None:
    query = candle_query("BTC", {"interval": interval, "to": str(T0 // 1_000_000 + 700)}, 0)
    results = []
    for db in both_engines:
        await _reset(db, rows)
        results.append(await db.run(lambda c: queries.candles(c, query)))
    sqlite_candles, postgres_candles = results
    assert sqlite_candles == postgres_candles
    assert sum(c.count for c in sqlite_candles) == sum(
        1 for q in rows if q.symbol == "BTC" and query.from_us <= q.time_us < query.to_us
    )


# --- reads for Core, retention --------------------------------------------------------


async def test_symbols_and_latest_quotes(database: Database) -> None:
    rows = [
        _quote("BTC", 1, 1, T0, 1.0),
        _quote("BTC", 2, 1, T0 + 5, 3.0),  # a newer run: the latest, despite sequence 1
        _quote("BTC", 1, 2, T0 + 2, 2.0),
        _quote("ETH", 1, 1, T0, 9.0),
    ]
    await _reset(database, rows)
    assert await database.run(queries.symbols) == ["BTC", "ETH"]
    assert await database.run(lambda c: queries.has_symbol(c, "ETH"))
    assert not await database.run(lambda c: queries.has_symbol(c, "eth"))
    latest = await database.run(lambda c: queries.latest_per_symbol(c, ["BTC", "ETH", "SBER"]))
    assert latest == {"BTC": rows[1], "ETH": rows[3]}


async def test_retention_deletes_only_older_rows_a_batch_at_a_time(database: Database) -> None:
    rows = [_quote(s, 1, n, T0 + n * 1_000_000, 1.0) for s in SYMBOLS for n in range(1, 101)]
    await _reset(database, rows)
    cutoff = T0 + 61 * 1_000_000  # rows 1..60 of each symbol are older
    deleted = []
    while batch := await database.run(lambda c: queries.delete_before(c, "BTC", cutoff, 25)):
        deleted.append(batch)
    assert deleted == [25, 25, 10]

    def remaining(c: Connection) -> dict[str, tuple[int, int]]:
        counted = c.execute(
            select(quotes.c.symbol, func.min(quotes.c.sequence), func.count()).group_by(
                quotes.c.symbol
            )
        )
        return {symbol: (first, count) for symbol, first, count in counted}

    assert await database.run(remaining) == {"BTC": (61, 40), "ETH": (1, 100)}
