"""Core's history routes: ``GET /quotes/{symbol}/history`` and ``/candles``.

Through quart-trio's test client over a real database, on both engines (the
``database_url`` fixture: SQLite always, PostgreSQL on a private server): pages
cover the rows exactly once and stay stable while rows arrive; candles equal
candles computed here in Python, and are the same on both engines; every bad
parameter is a 400 naming it; an unknown symbol is a 404; no database, no schema
and an unreachable database are 503s, logged once. Then a real ``quotopia core
--db`` process answering from a database ``quotopia db upgrade`` made.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from _postgres import Postgres
from _services import DEADLINE, http_get, run_cli, running_core, running_ft, usage_error
from quart.typing import TestClientProtocol as Client
from sqlalchemy.engine import URL

from quotopia.core.app import create_app
from quotopia.core.history import NO_DATABASE, NO_SCHEMA, UNREACHABLE, HistoryReader
from quotopia.core.store import QuoteStore
from quotopia.history import queries
from quotopia.history.database import Database, parse_database_url, upgrade
from quotopia.history.queries import StoredQuote
from quotopia.history.request import INTERVALS, MAX_LIMIT

pytestmark = pytest.mark.anyio

T0 = 1_764_698_400_000_000  # 2025-12-02T18:00:00Z, in microseconds
T0_SECONDS = T0 // 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The keys of a quote in a history page: the push protocols' quote, and the run.
QUOTE_KEYS = {"symbol", "price", "time", "change_percent", "sequence", "run_id"}
BIG_RUN = 2**63 - 1


@pytest.fixture
def anyio_backend() -> str:
    # quart-trio's app and test client run on Trio only.
    return "trio"


def url_of(text: str) -> URL:
    url = parse_database_url(text)
    assert url is not None
    return url


@dataclass
class History:
    """A migrated database, a writer on it, and Core's app reading it."""

    writer: Database
    store: QuoteStore
    client: Client

    async def insert(self, rows: Iterable[StoredQuote]) -> None:
        batch = list(rows)
        await self.writer.run(lambda c: queries.insert_quotes(c, batch))


def app_for(url: URL | None, store: QuoteStore | None = None) -> tuple[Client, HistoryReader]:
    reader = HistoryReader(url)
    if store is None:
        store = QuoteStore()
    return create_app(store, history=reader).test_client(), reader


@pytest.fixture
async def history(database_url: str) -> AsyncIterator[History]:
    url = url_of(database_url)
    upgrade(url)
    store = QuoteStore()
    store.feed_up()
    store.apply("BTC", 95000.0, None, 0.0, 1)  # known to the store; ETH only to the database
    client, reader = app_for(url, store)
    with Database(url) as writer, reader:
        yield History(writer, store, client)


def quote(symbol: str, run_id: int, sequence: int, time_us: int, price: float) -> StoredQuote:
    return StoredQuote(symbol, run_id, sequence, time_us, price, 0.0)


def rfc3339(time_us: int) -> str:
    """The API's time format, written out independently of Core's code."""
    moment = EPOCH + timedelta(microseconds=time_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def get(client: Client, path: str) -> tuple[int, Any]:
    response = await client.get(path)
    assert response.content_type == "application/json"
    return response.status_code, json.loads(await response.get_data(as_text=True))


def key(row: dict[str, Any]) -> tuple[str, int, int]:
    return (row["time"], int(row["run_id"]), row["sequence"])


# --- pages -------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_pages_return_every_row_once_while_rows_arrive(history: History, order: str) -> None:
    # Ties in time, across two runs (one with the largest run id): the cursor's
    # tie-breakers must hold on both engines.
    before = [quote("BTC", 7, n, T0 + (n // 2) * 1_000_000, 100.0 + n) for n in range(1, 41)]
    before += [quote("BTC", BIG_RUN, n, T0 + n * 1_000_000, 200.0 + n) for n in range(1, 11)]
    before += [quote("ETH", 7, n, T0 + n * 1_000_000, 1.0) for n in range(1, 6)]
    await history.insert(before)
    seen: list[dict[str, Any]] = []
    cursor = None
    newer = 1000
    pages = 0
    while True:
        path = f"/quotes/btc/history?limit=7&order={order}"
        if cursor is not None:
            path += f"&cursor={cursor}"
        status, body = await get(history.client, path)
        assert status == 200, body
        assert set(body) == {"symbol", "order", "quotes", "next_cursor"}
        assert (body["symbol"], body["order"]) == ("BTC", order)
        assert len(body["quotes"]) <= 7
        seen += body["quotes"]
        pages += 1
        # Meanwhile the recorder stores newer quotes, and a late one from the past.
        await history.insert(
            [quote("BTC", 7, newer + i, T0 + (newer + i) * 1_000_000, 1.0) for i in range(3)]
            + [quote("BTC", 3, newer, T0 - 5_000_000, 1.0)]
        )
        newer += 3
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(body["quotes"]) == 7, "only a full page has a next one"
    assert all(set(row) == QUOTE_KEYS for row in seen)
    keys = [key(row) for row in seen]
    assert len(keys) == len(set(keys)), "a row was served twice"
    expected = {(rfc3339(q.time_us), q.run_id, q.sequence) for q in before if q.symbol == "BTC"}
    assert expected <= set(keys), "a row that was there all along was skipped"
    assert keys == sorted(keys, reverse=order == "desc")
    assert pages >= 50 // 7


async def test_a_page_shows_a_quote_as_the_rest_of_the_api_does(history: History) -> None:
    await history.insert(
        [StoredQuote("BTC", BIG_RUN, 12, T0 + 123_456, 95432.12, 0.0123456)]
        + [quote("ETH", 1, n, T0 + n * 1_000_000, 2600.0 + n) for n in range(1, 4)]
    )
    status, body = await get(history.client, "/quotes/BTC/history")
    assert status == 200
    assert body == {
        "symbol": "BTC",
        "order": "desc",
        "quotes": [
            {
                "symbol": "BTC",
                "price": 95432.12,
                "time": "2025-12-02T18:00:00.123Z",
                "change_percent": 0.0123,
                "sequence": 12,
                "run_id": str(BIG_RUN),
            }
        ],
        "next_cursor": None,
    }
    # A symbol only the database has, in any case; from inclusive, to exclusive.
    window = f"from={T0_SECONDS + 1}&to={T0_SECONDS + 3}&order=asc"
    status, body = await get(history.client, f"/quotes/eth/history?{window}")
    assert status == 200
    assert body["symbol"] == "ETH"
    assert [row["sequence"] for row in body["quotes"]] == [1, 2]
    # RFC 3339 with an offset names the same instant.
    status, offset = await get(
        history.client,
        "/quotes/ETH/history?from=2025-12-02T21:00:01%2B03:00&to=2025-12-02T18:00:03Z&order=asc",
    )
    assert (status, offset) == (200, body)


async def test_a_known_symbol_without_rows_is_an_empty_page(history: History) -> None:
    status, body = await get(history.client, "/quotes/BTC/history")
    assert (status, body["quotes"], body["next_cursor"]) == (200, [], None)
    status, body = await get(history.client, "/quotes/BTC/candles?interval=1m")
    assert (status, body["candles"]) == (200, [])


async def test_an_unknown_symbol_is_a_404(history: History) -> None:
    await history.insert([quote("ETH", 1, 1, T0, 1.0)])
    for path in (
        "/quotes/doge/history",
        "/quotes/doge/candles?interval=1m",
        "/quotes/" + "X" * 40 + "/history",
        "/quotes/a%00b/history",
    ):
        status, body = await get(history.client, path)
        symbol = path.split("/")[2].replace("%00", "\x00")
        assert (status, body) == (404, {"error": "not found", "symbol": symbol}), path
    # Like the latest quote's 404.
    _, latest = await get(history.client, "/quotes/doge")
    status, body = await get(history.client, "/quotes/doge/history")
    assert body == latest


# --- candles --------------------------------------------------------------------------


def random_rows(seed: int, count: int = 400) -> list[StoredQuote]:
    """Quotes of BTC over 20 minutes, with ties in time and two runs."""
    rng = random.Random(seed)
    rows = []
    for sequence in range(1, count + 1):
        second = rng.randrange(0, 1200)
        time_us = T0 + second * 1_000_000 + rng.choice([0, 0, 250_000])
        run = rng.choice([1, BIG_RUN])
        rows.append(quote("BTC", run, sequence, time_us, round(rng.uniform(90, 110), 2)))
    return rows


def reference_candles(
    rows: Iterable[StoredQuote], width: int, from_us: int, to_us: int
) -> list[dict[str, Any]]:
    """The candles of a window, computed the obvious way."""
    buckets: dict[int, list[StoredQuote]] = {}
    for q in sorted(rows, key=lambda q: (q.time_us, q.run_id, q.sequence)):
        if from_us <= q.time_us < to_us:
            buckets.setdefault(q.time_us - q.time_us % width, []).append(q)
    return [
        {
            "time": rfc3339(start),
            "open": held[0].price,
            "high": max(q.price for q in held),
            "low": min(q.price for q in held),
            "close": held[-1].price,
            "count": len(held),
        }
        for start, held in sorted(buckets.items())
    ]


@pytest.mark.parametrize("interval", list(INTERVALS))
async def test_candles_equal_candles_computed_in_python(history: History, interval: str) -> None:
    rows = random_rows(seed=len(interval) * 31 + ord(interval[-1]))
    await history.insert(rows)
    width = INTERVALS[interval]
    # A window that starts and ends inside intervals: the answer widens it to whole ones.
    start, end = T0 + 90_500_000, T0 + 1_100_250_000
    status, body = await get(
        history.client,
        f"/quotes/btc/candles?interval={interval}&from={start / 1e6:.6f}&to={end / 1e6:.6f}",
    )
    if (-(-end // width) * width - (start - start % width)) // width > 1000:
        assert status == 400  # 1s over 17 minutes: more than 1000 candles
        assert body["parameter"] == "from"
        return
    assert status == 200, body
    from_us, to_us = start - start % width, -(-end // width) * width
    assert body == {
        "symbol": "BTC",
        "interval": interval,
        "from": rfc3339(from_us),
        "to": rfc3339(to_us),
        "candles": reference_candles(rows, width, from_us, to_us),
    }
    assert sum(c["count"] for c in body["candles"]) == sum(
        1 for q in rows if from_us <= q.time_us < to_us
    )


async def test_1s_candles_over_a_short_window(history: History) -> None:
    rows = random_rows(seed=5)
    await history.insert(rows)
    start = T0 + 100_000_000
    status, body = await get(
        history.client,
        f"/quotes/BTC/candles?interval=1s&from={start // 1_000_000}&to={start // 1_000_000 + 300}",
    )
    assert status == 200, body
    assert body["candles"] == reference_candles(rows, 1_000_000, start, start + 300_000_000)
    assert body["candles"], "the window holds quotes"


async def test_sqlite_and_postgresql_give_identical_candles(
    tmp_path: Path, postgres_server: Postgres
) -> None:
    postgres_server.psql("DROP DATABASE IF EXISTS core_candles")
    postgres_server.psql("CREATE DATABASE core_candles")
    urls = [
        url_of(f"sqlite:///{tmp_path / 'candles.db'}"),
        url_of(postgres_server.url.rsplit("/", 1)[0] + "/core_candles"),
    ]
    rows = random_rows(seed=11, count=600)
    answers: list[list[Any]] = []
    for url in urls:
        upgrade(url)
        with Database(url) as writer:
            await writer.run(lambda c: queries.insert_quotes(c, rows))
        client, reader = app_for(url)
        with reader:
            answers.append(
                [
                    await get(
                        client,
                        f"/quotes/BTC/candles?interval={interval}&to={T0_SECONDS + 1200}",
                    )
                    for interval in INTERVALS
                ]
            )
    sqlite_answers, postgres_answers = answers
    assert all(status == 200 for status, _ in sqlite_answers)
    assert sqlite_answers == postgres_answers
    assert any(body["candles"] for _, body in sqlite_answers)


# --- 400: each names its parameter ------------------------------------------------------


def foreign_cursor(symbol: str, order: str) -> str:
    raw = f"h1|{symbol}|{order}|{T0}|1|1".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_PARAMETERS = [
    ("history?from=yesterday", "from"),
    ("history?to=2025-13-01T00:00:00Z", "to"),
    ("history?from=2025-12-02T18:00:00", "from"),  # no offset
    (f"history?from={T0_SECONDS + 10}&to={T0_SECONDS}", "from"),
    (f"history?limit={MAX_LIMIT + 1}", "limit"),
    ("history?limit=0", "limit"),
    ("history?limit=ten", "limit"),
    ("history?order=newest", "order"),
    ("history?cursor=not-a-cursor!", "cursor"),
    ("history?cursor=aDF8", "cursor"),
    (f"history?cursor={foreign_cursor('ETH', 'desc')}", "cursor"),
    (f"history?order=asc&cursor={foreign_cursor('BTC', 'desc')}", "cursor"),
    ("history?form=1764698400", "form"),
    ("candles", "interval"),
    ("candles?interval=2m", "interval"),
    ("candles?interval=1m&from=soon", "from"),
    ("candles?interval=1m&to=later", "to"),
    (f"candles?interval=1m&from={T0_SECONDS + 60}&to={T0_SECONDS}", "from"),
    (f"candles?interval=1s&from={T0_SECONDS}&to={T0_SECONDS + 3600}", "from"),
    ("candles?interval=1d&to=9999-12-31T12:00:00Z", "to"),
    ("candles?interval=1m&limit=5", "limit"),
]


@pytest.mark.parametrize(("query", "parameter"), BAD_PARAMETERS)
async def test_each_bad_parameter_is_a_400_that_names_it(
    tmp_path: Path, query: str, parameter: str
) -> None:
    url = url_of(f"sqlite:///{tmp_path / 'h.db'}")
    upgrade(url)
    store = QuoteStore()
    store.feed_up()
    store.apply("BTC", 1.0, None, 0.0, 1)
    client, reader = app_for(url, store)
    with reader:
        status, body = await get(client, f"/quotes/btc/{query}")
    assert status == 400, body
    assert set(body) == {"error", "parameter", "detail"}
    assert (body["error"], body["parameter"]) == ("bad parameter", parameter)
    assert body["detail"]


async def test_a_cursor_from_one_page_works_only_on_its_own(history: History) -> None:
    await history.insert(quote("BTC", 1, n, T0 + n, 1.0) for n in range(1, 4))
    status, body = await get(history.client, "/quotes/BTC/history?limit=1&order=asc")
    cursor = body["next_cursor"]
    assert status == 200
    assert cursor
    status, body = await get(history.client, f"/quotes/BTC/history?cursor={cursor}")
    assert (status, body["parameter"]) == (400, "cursor")
    assert "asc pages of BTC" in body["detail"]
    status, body = await get(history.client, f"/quotes/BTC/history?order=asc&cursor={cursor}")
    assert status == 200
    assert [q["sequence"] for q in body["quotes"]] == [2, 3]


# --- 503: no database, no schema, no reaching it ----------------------------------------


def unavailable(detail: str) -> dict[str, str]:
    return {"error": "history unavailable", "detail": detail}


async def test_without_a_database_history_is_a_503() -> None:
    store = QuoteStore()
    store.feed_up()
    store.apply("BTC", 1.0, None, 0.0, 1)
    client, _ = app_for(None, store)
    for path in ("/quotes/BTC/history", "/quotes/BTC/candles?interval=1m", "/quotes/X/history"):
        status, body = await get(client, path)
        assert (status, body) == (503, unavailable(NO_DATABASE)), path
    assert body["detail"] == "no history database configured (--db)"
    # Parameters are checked first: a bad one is a 400 even so.
    status, body = await get(client, "/quotes/BTC/history?limit=0")
    assert status == 400


def history_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "quotopia.core" and r.levelno == logging.WARNING and "history" in r.message
    ]


async def test_a_missing_sqlite_file_is_no_schema_and_is_not_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "quotopia.core")
    path = tmp_path / "not" / "yet" / "quotes.db"
    url = url_of(f"sqlite:///{path}")
    client, reader = app_for(url)
    with reader:
        for query in ("history", "candles?interval=1m", "history?order=asc"):
            status, body = await get(client, f"/quotes/BTC/{query}")
            assert (status, body) == (503, unavailable(NO_SCHEMA))
        assert "quotopia db upgrade" in body["detail"]
        assert not (tmp_path / "not").exists(), "Core created the database's directory"
        [warning] = history_warnings(caplog)  # once, not per request
        assert warning.exc_info is None
        assert str(path) in warning.message
        # An empty file (no schema in it) is the same.
        await anyio.Path(path.parent).mkdir(parents=True)
        await anyio.Path(path).touch()
        status, body = await get(client, "/quotes/BTC/history")
        assert (status, body) == (503, unavailable(NO_SCHEMA))
        # `quotopia db upgrade`: history is back, and the log says so.
        upgrade(url)
        with Database(url) as writer:
            await writer.run(lambda c: queries.insert_quotes(c, [quote("BTC", 1, 1, T0, 2.0)]))
        status, body = await get(client, "/quotes/BTC/history")
        assert status == 200
        assert [q["price"] for q in body["quotes"]] == [2.0]
    assert any("available again" in r.message and r.levelno == logging.INFO for r in caplog.records)
    assert len(history_warnings(caplog)) == 1


async def test_a_database_without_the_schema_is_a_503(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The fixture's database exists (SQLite: once something has opened it) but is
    # not migrated.
    url = url_of(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        await anyio.Path(url.database).touch()
    client, reader = app_for(url)
    with reader:
        status, body = await get(client, "/quotes/BTC/candles?interval=1h")
    assert (status, body) == (503, unavailable(NO_SCHEMA))
    assert all(r.exc_info is None for r in history_warnings(caplog))


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_an_unreachable_database_is_a_503_logged_once(
    refusing_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "quotopia.core")
    url = url_of(f"postgresql://quotopia:secret@127.0.0.1:{refusing_port}/quotopia")
    store = QuoteStore()
    store.feed_up()
    store.apply("BTC", 1.0, None, 0.0, 1)
    client, reader = app_for(url, store)
    with reader:
        for path in ("/quotes/BTC/history", "/quotes/BTC/candles?interval=1m") * 2:
            status, body = await get(client, path)
            assert (status, body) == (503, unavailable(UNREACHABLE)), path
    [warning] = history_warnings(caplog)
    assert warning.exc_info is None
    assert "unreachable" in warning.message
    assert "secret" not in warning.message  # the password is hidden
    assert str(refusing_port) in warning.message


async def test_a_postgresql_server_that_goes_away_and_comes_back(
    postgres_server: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Dropped connections in the pool are noticed; recovery is logged at INFO."""
    caplog.set_level(logging.INFO, "quotopia.core")
    postgres_server.psql("DROP DATABASE IF EXISTS core_outage")
    postgres_server.psql("CREATE DATABASE core_outage")
    url = url_of(postgres_server.url.rsplit("/", 1)[0] + "/core_outage")
    upgrade(url)
    with Database(url) as writer:
        await writer.run(lambda c: queries.insert_quotes(c, [quote("ETH", 1, 1, T0, 3.0)]))
    client, reader = app_for(url)
    with reader:
        assert (await get(client, "/quotes/ETH/history"))[0] == 200
        # Every connection of the pool is cut, and new ones are refused.
        postgres_server.psql("ALTER DATABASE core_outage WITH ALLOW_CONNECTIONS false")
        postgres_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = 'core_outage' AND pid <> pg_backend_pid()"
        )
        for _ in range(2):
            status, body = await get(client, "/quotes/ETH/history")
            assert (status, body) == (503, unavailable(UNREACHABLE))
        postgres_server.psql("ALTER DATABASE core_outage WITH ALLOW_CONNECTIONS true")
        status, body = await get(client, "/quotes/ETH/history")
        assert status == 200
        assert [q["price"] for q in body["quotes"]] == [3.0]
    assert len(history_warnings(caplog)) == 1
    assert any("available again" in r.message and r.levelno == logging.INFO for r in caplog.records)


# --- a real Core ------------------------------------------------------------------------


def insert_rows(url: URL, rows: list[StoredQuote]) -> None:
    """Insert ``rows``, as the recorder would."""

    async def insert() -> None:
        with Database(url) as writer:
            await writer.run(lambda c: queries.insert_quotes(c, rows))

    anyio.run(insert)


@pytest.mark.e2e
def test_a_real_core_with_a_database(tmp_path: Path) -> None:
    path = tmp_path / "quotes.db"
    db = f"sqlite:///{path}"
    result = run_cli("db", "upgrade", "--db", db)
    assert result.returncode == 0, result
    url = url_of(db)
    # OLD: a symbol FT does not stream, which only the database has.
    insert_rows(url, [quote("OLD", 5, n, T0 + n * 1_000_000, 10.0 + n) for n in range(1, 251)])
    with running_ft() as ft, running_core(ft.port, "--db", db) as core:
        core.process.wait_for_line(r"history from sqlite:///\S+quotes\.db \(read only\)", DEADLINE)
        seen: list[dict[str, Any]] = []
        cursor = ""
        while True:
            status, body = http_get(core.port, f"/quotes/old/history?order=asc&limit=100{cursor}")
            assert status == 200, body
            seen += body["quotes"]
            if body["next_cursor"] is None:
                break
            cursor = f"&cursor={body['next_cursor']}"
        assert [q["sequence"] for q in seen] == list(range(1, 251))
        status, body = http_get(
            core.port, f"/quotes/OLD/candles?interval=1m&from={T0_SECONDS}&to={T0_SECONDS + 300}"
        )
        assert status == 200, body
        assert [c["count"] for c in body["candles"]] == [59, 60, 60, 60, 11]
        status, body = http_get(core.port, "/quotes/NOPE/history")
        assert status == 404
        status, body = http_get(core.port, "/quotes/OLD/history?limit=5000")
        assert (status, body["parameter"]) == (400, "limit")


@pytest.mark.e2e
def test_a_real_core_without_the_database_file_answers_503_and_creates_nothing(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing" / "quotes.db"
    with running_ft() as ft, running_core(ft.port, "--db", f"sqlite:///{missing}") as core:
        status, body = http_get(core.port, "/quotes/BTC/history")
        assert (status, body) == (503, unavailable(NO_SCHEMA))
        core.process.wait_for_line(r"WARNING .*history database .* does not exist", DEADLINE)
        assert not missing.parent.exists()
    with running_ft() as ft, running_core(ft.port, "--db", "none") as core:
        core.process.wait_for_line("no history database", DEADLINE)
        status, body = http_get(core.port, "/quotes/BTC/history")
        assert (status, body) == (503, unavailable(NO_DATABASE))
    assert "Traceback" not in core.process.output()


def test_a_bad_database_url_is_a_one_line_error() -> None:
    for db, words in (
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("sqlite:///:memory:", "SQLite needs a file"),
        ("nonsense", "bad database URL 'nonsense'"),
    ):
        line = usage_error(run_cli("core", "--db", db), "core")
        assert words in line, line
    line = usage_error(run_cli("core", QUOTOPIA_DB="mysql://u@h/db"), "core")
    assert "unsupported database" in line
