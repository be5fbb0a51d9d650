"""The recorder: its pure parts, then the whole service in-process against a real FT,
on SQLite and on PostgreSQL.

In-process, FT and the recorder share the test's event loop (AnyIO's asyncio
backend, as both run in production), and every check reads what a user could
read: the database's rows, ``/metrics`` and ``/readyz`` of the recorder's
endpoint, and its log records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
import pytest
from _services import DEADLINE, SampleKey, http_get, scrape
from _stored import holes, rows, sample_total
from hypothesis import given
from hypothesis import strategies as st

from quotopia.ft.config import FTConfig
from quotopia.ft.server import serve as serve_ft
from quotopia.history.database import Database, parse_database_url, upgrade
from quotopia.history.queries import StoredQuote, insert_quotes
from quotopia.quote_codec import DecodedQuote
from quotopia.recorder.config import RecorderConfig, parse_duration
from quotopia.recorder.gaps import GapTracker
from quotopia.recorder.service import serve as serve_recorder
from quotopia.recorder.service import storable_row

pytestmark = pytest.mark.anyio

TICK = 0.02


# --- --retention's syntax and the configuration ------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * 86400),
        ("12h", 12 * 3600),
        ("30m", 1800),
        ("90s", 90),
        ("1d12h", 86400 + 12 * 3600),
        ("1.5h", 5400),
        (" 2D ", 2 * 86400),
        ("none", None),
        ("", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["7", "7x", "d7", "7d 1h", "-1d", "0s", "1h7", "week"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"7d|delete every quote"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"database": "none"}, "needs a database"),
        ({"database": "mysql://u@h/db"}, "unsupported database"),
        ({"ft_addr": "nowhere"}, "bad address"),
        ({"batch_size": 0}, "batch size"),
        ({"buffer": 10, "batch_size": 100}, "at least one batch"),
        ({"flush_interval": 0}, "flush interval"),
        ({"retention": -5.0}, "retention"),
        ({"drain_timeout": math.nan}, "drain timeout"),
        ({"metrics_port": 70000}, "metrics port"),
    ],
)
def test_bad_configuration_is_refused(settings: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"database": "sqlite:///x.db", **settings}
    with pytest.raises(ValueError, match=message):
        RecorderConfig(**values)


# --- gaps ---------------------------------------------------------------------------


def test_gaps_replays_and_new_runs() -> None:
    gaps = GapTracker()
    assert gaps.observe("BTC", 7, 1) is None
    assert gaps.observe("BTC", 7, 2) is None
    gap = gaps.observe("BTC", 7, 6)
    assert gap is not None
    assert (gap.first, gap.last, gap.missed) == (3, 5, 3)
    assert gaps.observe("BTC", 7, 6) is None  # a reconnect's snapshot repeats the latest
    assert gaps.replays == {"BTC": 1}
    # A new FT run numbers from 1 again: a key space of its own, joined at 4.
    joined = gaps.observe("BTC", 8, 4)
    assert joined is not None
    assert (joined.first, joined.last) == (1, 3)
    assert gaps.missed == {"BTC": 6}
    assert gaps.gaps == {"BTC": 2}
    assert gaps.runs == 2


def test_a_seeded_tracker_counts_what_was_missed_while_down() -> None:
    gaps = GapTracker()
    gaps.seed([("ETH", 3, 10)])
    gap = gaps.observe("ETH", 3, 15)
    assert gap is not None
    assert (gap.first, gap.last) == (11, 14)
    assert gaps.runs == 0  # the run was known from the database, not new in the feed


def test_the_tracker_remembers_a_bounded_number_of_runs() -> None:
    gaps = GapTracker()
    for run in range(1, 100):
        gaps.observe("SBER", run, 1)
    assert gaps.runs == 99
    assert len(gaps._last["SBER"]) <= GapTracker.RUNS_KEPT


@given(
    st.lists(
        st.tuples(st.sampled_from(["A", "B"]), st.sampled_from([1, 2]), st.booleans()),
        max_size=300,
    )
)
def test_missed_is_the_highest_sequence_minus_the_quotes_kept(
    events: list[tuple[str, int, bool]],
) -> None:
    """What the recorder's invariant rests on: a stream in which each run's quotes
    come in order, some dropped, some repeated, gives ``missed`` = highest sequence
    seen minus distinct sequences seen, summed over (run, symbol)."""
    gaps = GapTracker()
    next_sequence: dict[tuple[str, int], int] = {}
    seen: dict[tuple[str, int], set[int]] = {}
    for symbol, run, dropped in events:
        key = (symbol, run)
        sequence = next_sequence.get(key, 1)
        next_sequence[key] = sequence + 1
        if dropped:
            continue
        for _repeat in range(2 if sequence % 3 == 0 else 1):  # some arrive twice
            gaps.observe(symbol, run, sequence)
        seen.setdefault(key, set()).add(sequence)
    expected = sum(max(s) - len(s) for s in seen.values())
    assert sum(gaps.missed.values()) == expected


# --- a quote's row -----------------------------------------------------------------


def test_a_quote_becomes_a_row_under_its_own_name() -> None:
    at = datetime(2026, 12, 3, 10, 0, 0, 250_000, tzinfo=UTC)
    at_us = int(at.timestamp() * 1_000_000)
    row = storable_row(DecodedQuote("BTC", 1.5, at_us, 0.1, 4, 9))
    assert row == StoredQuote("BTC", 9, 4, at_us, 1.5, 0.1)


@pytest.mark.parametrize(
    "bad",
    [
        {"run_id": 0},  # an FT from before run ids: its keys would collide
        {"run_id": 2**63},
        {"sequence": 0},
        {"symbol": ""},
        {"symbol": "X" * 33},
        {"symbol": "A\x00B"},
        {"price": math.nan},
        {"change_percent": math.inf},
        {"time_us": None},
    ],
)
def test_unstorable_quotes_are_refused(bad: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "symbol": "BTC",
        "price": 1.0,
        "time_us": 1_764_720_000_000_000,
        "change_percent": 0.0,
        "sequence": 1,
        "run_id": 1,
        **bad,
    }
    assert storable_row(DecodedQuote(**fields)) is None


# --- the service, in-process -------------------------------------------------------


def ft_config(port: int = 0) -> FTConfig:
    return FTConfig(host="127.0.0.1", port=port, metrics_port=0, tick_interval=TICK, seed=3)


def recorder_config(database: str, ft_port: int, **overrides: Any) -> RecorderConfig:
    settings: dict[str, Any] = {
        "database": database,
        "ft_addr": f"127.0.0.1:{ft_port}",
        "host": "127.0.0.1",
        "metrics_port": 0,
        "flush_interval": 0.05,
        "backoff_cap": 0.2,
        "feed_timeout": 2.0,
        **overrides,
    }
    return RecorderConfig(**settings)


@dataclass
class Running:
    port: int
    stop: anyio.Event
    stopped: anyio.Event


@asynccontextmanager
async def running(serve: Any, config: Any) -> AsyncIterator[Running]:
    """A service in the test's task group; ``stop`` drains it, leaving cancels it."""
    stop, stopped = anyio.Event(), anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
        stopped.set()

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            port = await tg.start(run)
        yield Running(port, stop, stopped)
        tg.cancel_scope.cancel()


async def stop(service: Running) -> None:
    service.stop.set()
    with anyio.fail_after(DEADLINE):
        await service.stopped.wait()


async def metrics(port: int) -> dict[SampleKey, float]:
    return await anyio.to_thread.run_sync(scrape, port)


async def until(probe: Any, what: str) -> Any:
    """Await ``probe()`` until it returns something truthy; fail after DEADLINE."""
    # Polling: what is awaited is another process's state (a database, an endpoint).
    with anyio.fail_after(DEADLINE):
        while True:
            if result := await probe():
                return result
            await anyio.sleep(0.02)


def runs(stored: list[tuple[str, int, int]]) -> list[int]:
    """The distinct run ids in ``stored``."""
    return sorted({run for _, run, _ in stored})


async def ready(port: int) -> tuple[int, Any] | None:
    """``/readyz`` once it answers 200."""
    status, body = await anyio.to_thread.run_sync(http_get, port, "/readyz")
    return (status, body) if status == 200 else None


async def written_all(port: int) -> dict[SampleKey, float] | None:
    """The recorder's metrics once every quote it received is committed."""
    samples = await metrics(port)
    received = sample_total(samples, "quotopia_recorder_quotes_received_total")
    stored = sample_total(samples, "quotopia_recorder_rows_written_total") + sample_total(
        samples, "quotopia_recorder_duplicate_quotes_total"
    )
    return samples if received and received == stored else None


async def test_every_quote_received_is_stored_once_and_the_gaps_add_up(database_url: str) -> None:
    async with running(serve_ft, ft_config()) as ft:
        await anyio.sleep(TICK * 5)  # FT ran before the recorder came: a gap at the start
        async with running(serve_recorder, recorder_config(database_url, ft.port)) as recorder:
            status, body = await until(lambda: ready(recorder.port), "ready")
            await until(
                lambda: anyio.to_thread.run_sync(lambda: len(rows(database_url)) >= 60),
                "60 rows",
            )
            await stop(ft)  # no more quotes: what was received can all be written
            samples = await until(lambda: written_all(recorder.port), "every quote written")
            stored = rows(database_url)
            assert len(stored) == len(set(stored))
            assert {s for s, _, _ in stored} == {"SBER", "BTC", "ETH"}
            assert len({run for _, run, _ in stored}) == 1
            missed = sample_total(samples, "quotopia_recorder_missed_quotes_total")
            assert missed == holes(stored) > 0
            assert sample_total(samples, "quotopia_recorder_rows_written_total") == len(stored)
            assert sample_total(samples, "quotopia_recorder_ft_runs_total") == 1
            assert sample_total(samples, "quotopia_recorder_database_up") == 1
            await stop(recorder)
    assert status == 200
    assert body["status"] == "ready", body


async def test_a_new_ft_run_gets_keys_of_its_own(database_url: str) -> None:
    async with running(serve_ft, ft_config()) as first:
        port = first.port
        config = recorder_config(database_url, port)
        async with running(serve_recorder, config) as recorder:
            await until(lambda: ready(recorder.port), "ready")
            await until(
                lambda: anyio.to_thread.run_sync(lambda: len(rows(database_url)) >= 30),
                "rows of the first run",
            )
            await stop(first)
            async with running(serve_ft, ft_config(port)) as second:
                await until(
                    lambda: anyio.to_thread.run_sync(lambda: len(rows(database_url)) >= 60),
                    "rows of the second run",
                )
                await stop(second)
            samples = await until(lambda: written_all(recorder.port), "every quote written")
            stored = rows(database_url)
            # Both runs number from 1: the same (symbol, sequence) is in both, and
            # only run_id tells the two quotes apart.
            first_run, second_run = (
                {(s, n) for s, r, n in stored if r == run} for run in runs(stored)
            )
            assert first_run & second_run
            assert len(stored) == len(set(stored))
            assert sample_total(samples, "quotopia_recorder_ft_runs_total") == 2
            assert sample_total(samples, "quotopia_recorder_missed_quotes_total") == holes(stored)
            await stop(recorder)


async def test_a_drain_writes_what_the_buffer_holds(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "quotopia.recorder")
    # Batches that would wait 30 s to fill: at the stop, every quote is still pending.
    config_overrides = {"batch_size": 100_000, "buffer": 100_000, "flush_interval": 30.0}
    async with running(serve_ft, ft_config()) as ft:
        config = recorder_config(database_url, ft.port, **config_overrides)
        async with running(serve_recorder, config) as recorder:
            await until(lambda: ready(recorder.port), "ready")
            samples = await until(
                lambda: _received_at_least(recorder.port, 30), "quotes in the buffer"
            )
            assert sample_total(samples, "quotopia_recorder_rows_written_total") == 0
            await stop(recorder)
    (stopped,) = [r for r in caplog.records if r.getMessage().startswith("recorder stopped")]
    stored = rows(database_url)
    assert stopped.received >= 30  # type: ignore[attr-defined]
    assert len(stored) == stopped.rows == stopped.received  # type: ignore[attr-defined]


async def _received_at_least(port: int, count: int) -> dict[SampleKey, float] | None:
    samples = await metrics(port)
    return (
        samples
        if sample_total(samples, "quotopia_recorder_quotes_received_total") >= count
        else None
    )


async def test_without_migrations_it_waits_for_the_schema(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = parse_database_url(database_url)
    assert url is not None
    async with running(serve_ft, ft_config()) as ft:
        config = recorder_config(database_url, ft.port, migrate=False)
        async with running(serve_recorder, config) as recorder:
            status, body = await anyio.to_thread.run_sync(http_get, recorder.port, "/readyz")
            assert (status, body["status"]) == (503, "starting")
            await anyio.to_thread.run_sync(upgrade, url)
            await until(lambda: ready(recorder.port), "ready once migrated")
            await stop(recorder)
    assert any("run `quotopia db upgrade`" in r.getMessage() for r in caplog.records)


async def test_retention_deletes_old_rows_and_keeps_new_ones(database_url: str) -> None:
    url = parse_database_url(database_url)
    assert url is not None
    await anyio.to_thread.run_sync(upgrade, url)
    old_us = int((datetime.now(UTC).timestamp() - 3 * 86400) * 1_000_000)
    old = [StoredQuote("BTC", 1, n, old_us + n, 100.0, 0.0) for n in range(1, 2501)]
    with Database(url) as db:
        await db.run(lambda c: insert_quotes(c, old))
    async with running(serve_ft, ft_config()) as ft:
        config = recorder_config(
            database_url, ft.port, retention=86400.0, retention_interval=0.1, retention_batch=1000
        )
        async with running(serve_recorder, config) as recorder:

            async def swept() -> dict[SampleKey, float] | None:
                samples = await metrics(recorder.port)
                deleted = sample_total(samples, "quotopia_recorder_retention_deleted_rows_total")
                written = sample_total(samples, "quotopia_recorder_rows_written_total")
                return samples if deleted >= len(old) and written else None

            samples = await until(swept, "old rows deleted")
            await stop(recorder)
    stored = rows(database_url)
    assert sample_total(samples, "quotopia_recorder_retention_deleted_rows_total") == len(old)
    assert not [r for r in stored if r[1] == 1]  # every old row went
    assert stored  # the new ones stayed
