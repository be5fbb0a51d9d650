"""The recorder as a real process, broken on purpose: FT restarted under it, itself
killed with SIGKILL, its PostgreSQL stopped. Each check reads what an operator
could: the database's rows and the recorder's ``/metrics`` and ``/readyz``.

The invariant behind them (see :mod:`quotopia.recorder.gaps`): for a recorder that
started on an empty database, the quotes it counts as missed are, summed over
every (FT run, symbol), the highest stored sequence minus the rows stored.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from _postgres import Postgres
from _procs import wait_until
from _services import (
    DEADLINE,
    SampleKey,
    Service,
    ft_metrics_port,
    http_get,
    run_cli,
    running_ft,
    running_recorder,
    scrape,
    stop,
    usage_error,
)
from _stored import by_key, holes, rows, sample_total

pytestmark = pytest.mark.e2e

#: FT's tick here: 60 quotes a second, which the recorder keeps up with easily.
TICK = 0.05


def all_written(recorder: Service) -> Callable[[], dict[SampleKey, float] | None]:
    """A probe: the recorder's metrics once every quote it received is committed."""

    def probe() -> dict[SampleKey, float] | None:
        samples = scrape(recorder.port)
        received = sample_total(samples, "quotopia_recorder_quotes_received_total")
        stored = sample_total(samples, "quotopia_recorder_rows_written_total") + sample_total(
            samples, "quotopia_recorder_duplicate_quotes_total"
        )
        return samples if received and received == stored else None

    return probe


def at_least(database: str, count: int, run_id: int | None = None) -> Callable[[], bool]:
    def probe() -> bool:
        stored = rows(database)
        return len([r for r in stored if run_id is None or r[1] == run_id]) >= count

    return probe


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'quotes.db'}"


def test_a_gap_across_an_ft_restart_is_counted_and_keys_stay_unique(tmp_path: Path) -> None:
    database = sqlite_url(tmp_path)
    with running_ft(tick=TICK) as ft1, running_recorder(ft1.port, database) as recorder:
        port = ft1.port
        wait_until(at_least(database, 30), DEADLINE, what="rows of the first run")
        (first_run,) = {run for _, run, _ in rows(database)}
        # Frozen, the recorder sees nothing of FT's restart until it is thawed.
        recorder.process.signal(signal.SIGSTOP)
        try:
            stop(ft1)
            with running_ft(port=port, tick=TICK) as ft2:
                ft2_metrics = ft_metrics_port(ft2)
                wait_until(
                    lambda: sample_total(scrape(ft2_metrics), "quotopia_ft_ticks_total") >= 10,
                    DEADLINE,
                    what="ten ticks of the second FT",
                )
                recorder.process.signal(signal.SIGCONT)
                wait_until(
                    lambda: len({run for _, run, _ in rows(database)}) == 2,
                    DEADLINE,
                    what="rows of the second run",
                )
                stop(ft2)
        finally:
            recorder.process.signal(signal.SIGCONT)
        samples = wait_until(all_written(recorder), DEADLINE, what="every quote written")
        stored = rows(database)
        assert len(stored) == len(set(stored))
        (second_run,) = {run for _, run, _ in stored} - {first_run}
        missed = sample_total(samples, "quotopia_recorder_missed_quotes_total")
        assert missed == holes(stored)
        # The second run was at least ten ticks old when the recorder joined it.
        second = {k: v for k, v in by_key(stored).items() if k[1] == second_run}
        assert len(second) == 3
        assert all(min(sequences) > 10 for sequences in second.values()), second
        assert sample_total(samples, "quotopia_recorder_ft_runs_total") == 2
        stop(recorder)


def test_sigkill_mid_batch_loses_no_committed_row_and_duplicates_none(tmp_path: Path) -> None:
    database = sqlite_url(tmp_path)
    # Batches of up to 50 quotes, each waiting up to half a second: SIGKILL lands
    # while one is open.
    flags = ("--batch-size", "50", "--flush-interval", "0.5")
    with running_ft(tick=TICK) as ft:
        with running_recorder(ft.port, database, *flags) as first:
            wait_until(at_least(database, 60), DEADLINE, what="rows before the kill")
            samples = scrape(first.port)
            assert sample_total(samples, "quotopia_recorder_missed_quotes_total") == holes(
                rows(database)
            )
            assert first.process.kill() == -signal.SIGKILL
        before = rows(database)
        with running_recorder(ft.port, database, *flags) as second:
            wait_until(at_least(database, len(before) + 60), DEADLINE, what="rows after restart")
            stop(ft)
            samples = wait_until(all_written(second), DEADLINE, what="every quote written")
            stored = rows(database)
            assert set(before) <= set(stored)
            assert len(stored) == len(set(stored))
            # What the kill lost (the open batch, and the quotes FT sent while no
            # recorder ran) is one hole per symbol, and the second recorder, seeded
            # from the database, counted exactly it.
            lost = holes(stored, from_first=True)
            assert lost > 0
            assert sample_total(samples, "quotopia_recorder_missed_quotes_total") == lost
            assert sample_total(samples, "quotopia_recorder_duplicate_quotes_total") == 0
            stop(second)


def test_postgres_down_then_up_the_recorder_holds_retries_and_catches_up(
    postgres_server: Postgres,
) -> None:
    postgres_server.psql("CREATE DATABASE recorder_outage")
    database = postgres_server.url.rsplit("/", 1)[0] + "/recorder_outage"
    with running_ft(tick=TICK) as ft, running_recorder(ft.port, database) as recorder:
        wait_until(at_least(database, 30), DEADLINE, what="rows before the outage")
        postgres_server.stop()
        try:
            wait_until(
                lambda: (
                    http_get(recorder.port, "/readyz") == (503, {"status": "database unavailable"})
                ),
                DEADLINE,
                what="/readyz saying the database is unavailable",
            )
            failed = ("quotopia_recorder_batches_total", (("outcome", "failed"),))
            wait_until(lambda: scrape(recorder.port)[failed] >= 2, DEADLINE, what="failed attempts")
        finally:
            postgres_server.start()
        wait_until(
            lambda: http_get(recorder.port, "/readyz")[0] == 200, DEADLINE, what="ready again"
        )
        stop(ft)
        samples = wait_until(all_written(recorder), DEADLINE, what="every quote written")
        stored = rows(database)
        # Held in the buffer through the outage: nothing received was lost.
        assert sample_total(samples, "quotopia_recorder_missed_quotes_total") == holes(stored)
        assert len(stored) == sample_total(samples, "quotopia_recorder_quotes_received_total")
        assert holes(stored, from_first=True) == 0
        warnings = [
            line for line in recorder.process.stderr_lines if "database unavailable" in line
        ]
        assert len(warnings) == 1, recorder.process.output()
        assert "Traceback" not in recorder.process.output()
        stop(recorder)


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--db", "none"], "needs a database"),
        (["--retention", "7x"], "7x"),
        (["--buffer", "10", "--batch-size", "100"], "at least one batch"),
        (["--ft-addr", "nowhere"], "nowhere"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_status_2(args: list[str], mentions: str) -> None:
    result = run_cli("recorder", *args)
    assert mentions in usage_error(result, "recorder")
    assert "Traceback" not in result.stderr
