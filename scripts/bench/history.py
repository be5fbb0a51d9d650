"""Part 8: history and candle queries through Core, over a million stored quotes.

The database is filled directly (``insert_quotes``, the recorder's own write) with
``history_rows`` quotes of the three default symbols, one a second per symbol,
ending now; then ``ANALYZE``. A real ``quotopia core --db URL`` answers, and one
client on a keep-alive connection asks each query ``history_requests`` times in
a row (fewer, at least 5, where they take more than ``history_budget_s`` in
all): p50 and p99 of the whole HTTP round trip. Each query's plan, read from the
engine at that size (``EXPLAIN QUERY PLAN``; PostgreSQL's ``EXPLAIN (ANALYZE)``),
goes into the JSON, and the table shows its first line.

The queries, each for BTC:

- the newest page (``limit=100``);
- a page from the middle of the history (``order=asc&from=...``);
- 1-minute candles over the last hour (3,600 quotes);
- 1-hour candles over the last day (86,400 quotes);
- 1-day candles over all of BTC's history.
"""

from __future__ import annotations

import http.client
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from quotopia.history.database import Database, parse_database_url, upgrade
from quotopia.history.queries import (
    StoredQuote,
    candles_statement,
    history_statement,
    insert_quotes,
)
from quotopia.history.request import candle_query, history_query

from .ingest import postgres_server
from .latency import percentile
from .plan import Context
from .procs import BenchError, start_core, start_ft
from .report import Part, Row, ms

__all__ = ["run"]

SYMBOLS = ("BTC", "ETH", "SBER")
FILL_BATCH = 10_000


def _fill(url: str, rows: int, end_us: int) -> int:
    """``rows`` quotes, a second apart per symbol, the newest at ``end_us``; returns
    the oldest time."""
    parsed = parse_database_url(url)
    assert parsed is not None
    upgrade(parsed)
    per_symbol = rows // len(SYMBOLS)
    start_us = end_us - (per_symbol - 1) * 1_000_000
    with Database(parsed, pool_size=1) as db:
        engine = db._engine  # the bench fills and explains synchronously
        batch: list[StoredQuote] = []
        for n in range(per_symbol):
            for i, symbol in enumerate(SYMBOLS):
                price = 100.0 * (i + 1) + (n % 1000) / 100
                batch.append(StoredQuote(symbol, 1, n + 1, start_us + n * 1_000_000, price, 0.01))
            if len(batch) >= FILL_BATCH or n == per_symbol - 1:
                with engine.begin() as connection:
                    insert_quotes(connection, batch)
                batch = []
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))
    return start_us


def _plans(url: str, queries: dict[str, tuple[str, Any]]) -> dict[str, str]:
    parsed = parse_database_url(url)
    assert parsed is not None
    plans: dict[str, str] = {}
    with Database(parsed, pool_size=1) as db, db._engine.connect() as connection:
        for name, (kind, query) in queries.items():
            statement = history_statement(query) if kind == "history" else candles_statement(query)
            compiled = statement.compile(dialect=connection.dialect)
            params: Any = compiled.params
            if compiled.positional:
                params = tuple(compiled.params[key] for key in compiled.positiontup or ())
            if connection.dialect.name == "postgresql":
                explain = f"EXPLAIN (ANALYZE, COSTS OFF) {compiled}"
                plans[name] = "\n".join(connection.exec_driver_sql(explain, params).scalars())
            else:
                explain = f"EXPLAIN QUERY PLAN {compiled}"
                rows = connection.exec_driver_sql(explain, params).all()
                plans[name] = "\n".join(str(row[-1]) for row in rows)
    return plans


def _latencies(port: int, path: str, count: int, budget_s: float = math.inf) -> list[float]:
    """``count`` round trips of ``GET path``, fewer (at least 5) if they take more
    than ``budget_s`` in all."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    took: list[float] = []
    try:
        for _ in range(count):
            if len(took) >= 5 and sum(took) > budget_s:
                break
            began = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            took.append(time.perf_counter() - began)
            if response.status != 200:
                raise BenchError(f"GET {path}: {response.status} {body[:200]!r}")
    finally:
        conn.close()
    return took


def _measure(ctx: Context, engine: str, url: str) -> dict[str, Any]:
    plan = ctx.plan
    now_us = int(time.time() * 1_000_000)
    started = time.monotonic()
    start_us = _fill(url, plan.history_rows, now_us)
    fill_s = time.monotonic() - started
    middle_s = (start_us + (now_us - start_us) // 2) / 1e6
    hour_ago, day_ago = (now_us / 1e6) - 3600, (now_us / 1e6) - 86400
    paths = {
        "newest page": "/quotes/BTC/history?limit=100",
        "a page from the middle": f"/quotes/BTC/history?order=asc&limit=100&from={middle_s:.0f}",
        "1m candles, last hour": f"/quotes/BTC/candles?interval=1m&from={hour_ago:.0f}",
        "1h candles, last day": f"/quotes/BTC/candles?interval=1h&from={day_ago:.0f}",
        "1d candles, all": f"/quotes/BTC/candles?interval=1d&from={start_us / 1e6:.0f}",
    }
    queries: dict[str, tuple[str, Any]] = {}
    for name, path in paths.items():
        route, _, query_text = path.partition("?")
        args = dict(pair.split("=", 1) for pair in query_text.split("&"))
        if route.endswith("/history"):
            queries[name] = ("history", history_query("BTC", args))
        else:
            queries[name] = ("candles", candle_query("BTC", args, now_us))
    plans = _plans(url, queries)
    ft, ft_port = start_ft(1.0)
    with ft:
        core, port = start_core(ft_port, extra=[f"--db={url}"])
        with core:
            _latencies(port, paths["newest page"], 5)  # warm Core's schema check and pool
            figures: dict[str, dict[str, Any]] = {}
            for name, path in paths.items():
                took = _latencies(port, path, plan.history_requests, plan.history_budget_s)
                figures[name] = {
                    "p50_s": percentile(took, 0.5),
                    "p99_s": percentile(took, 0.99),
                    "requests": len(took),
                }
                ctx.log(
                    f"history {engine} {name}: p50 {ms(figures[name]['p50_s'])}, "
                    f"p99 {ms(figures[name]['p99_s'])}"
                )
    return {
        "engine": engine,
        "rows": plan.history_rows,
        "fill_s": round(fill_s, 1),
        "paths": paths,
        "latency": figures,
        "plans": plans,
    }


def _index_line(plan: str) -> str:
    """The line of a plan that says how the rows are found (the index), shortened."""
    lines = [line.strip() for line in plan.splitlines() if line.strip()]
    found = next((line for line in lines if "index" in line.lower()), lines[0] if lines else "")
    return found[:90]


def run(ctx: Context) -> Part:
    results: list[dict[str, Any]] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="quotopia-bench-history-") as tmp:
        results.append(_measure(ctx, "sqlite", f"sqlite:///{Path(tmp) / 'history.db'}"))
        with postgres_server() as server:
            if server is None:
                rows.append(Row("history", "on PostgreSQL", "-", notes="no PostgreSQL here"))
            else:
                server.psql("CREATE DATABASE history_bench")
                url = server.url.rsplit("/", 1)[0] + "/history_bench"
                results.append(_measure(ctx, "postgresql", url))
    for result in results:
        latency: dict[str, dict[str, Any]] = result["latency"]
        plans: dict[str, str] = result["plans"]
        for name, figure in latency.items():
            rows.append(
                Row(
                    "history",
                    f"{name}, {result['engine']}, {result['rows']:,} rows",
                    f"p50 {ms(figure['p50_s'])}, p99 {ms(figure['p99_s'])}",
                    f"{figure['requests']} requests",
                    notes=_index_line(plans[name]),
                )
            )
    return Part("history", rows, {"results": results})
