"""End to end: real ``python -m quotopia`` processes on OS-assigned ports.

Every service starts with ``--port 0``; the test reads the real port from the
service's own "listening on" log line (``_services``). Every wait polls for a
condition under a deadline (``wait_until``, ``wait_for_line``); every process is
killed and reaped when its ``with`` block ends, whatever happened.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _procs import QuotopiaProcess, clean_env, wait_until
from _services import (
    CORE_READY,
    DEADLINE,
    FT_READY,
    SYMBOLS,
    Service,
    btc,
    feed,
    ft_args,
    http_get,
    quotes,
    run_cli,
    running_core,
    running_ft,
    usage_error,
)

from quotopia.cli import build_parser

pytestmark = pytest.mark.e2e

#: What the services promise: a graceful stop within this many seconds of SIGTERM.
STOP_WITHIN = 2.0
#: Core's promise: quotes within this many seconds of its start.
QUOTES_WITHIN = 2.0


def no_traceback(process: QuotopiaProcess) -> None:
    assert "Traceback" not in process.output(), process.output()


@pytest.fixture
def ft() -> Iterator[Service]:
    with running_ft() as service:
        yield service


@pytest.fixture
def core(ft: Service) -> Iterator[Service]:
    with running_core(ft.port, "--backoff-cap", "0.5") as service:
        yield service


# --- the running pair ------------------------------------------------------------


def test_quotes_reach_core_quickly_and_keep_moving(core: Service) -> None:
    # The snapshot arrives one quote at a time: wait for every symbol.
    first = wait_until(
        lambda: now if set(now := quotes(core.port)) == SYMBOLS else None,
        DEADLINE,
        what="quotes of every symbol at Core",
    )
    took = time.monotonic() - core.process.started_at
    assert took < QUOTES_WITHIN, f"first quotes {took:.2f}s after Core started"
    assert all(isinstance(price, float) and price > 0 for price in first.values())

    moved = wait_until(
        lambda: now if (now := quotes(core.port)) != first else None,
        DEADLINE,
        what="a price change",
    )
    assert set(moved) == SYMBOLS


def test_core_reports_ft_loss_and_recovers_when_ft_returns_on_the_same_port(
    ft: Service, core: Service
) -> None:
    before = wait_until(lambda: btc(core.port), DEADLINE, what="a BTC quote at Core")
    assert feed(core.port)["connected"]

    assert ft.process.kill() == -9
    wait_until(lambda: not feed(core.port)["connected"], DEADLINE, what="feed down")
    assert set(quotes(core.port)) == SYMBOLS, "the last known prices stay available"

    # Core shows quote times to the millisecond, truncated: compare at that precision.
    now = datetime.now(UTC)
    restarted = now.replace(microsecond=now.microsecond // 1000 * 1000)
    with running_ft(port=ft.port, seed=2) as restarted_ft:
        again = restarted_ft.process
        wait_until(lambda: feed(core.port)["connected"], DEADLINE, what="feed back up")
        assert feed(core.port)["reconnects"] >= 1

        def fresh_btc() -> dict[str, Any] | None:
            quote = btc(core.port)
            assert quote is not None
            return quote if datetime.fromisoformat(quote["time"]) >= restarted else None

        first = wait_until(fresh_btc, DEADLINE, what="a quote from the new FT")
        later = wait_until(
            lambda: q if (q := fresh_btc()) and q["sequence"] > first["sequence"] else None,
            DEADLINE,
            what="a newer quote from the new FT",
        )
        assert later["time"] >= first["time"]
        assert first["time"] > before["time"]
        assert again.terminate(DEADLINE) == 0
    assert core.process.returncode is None, core.process.output()
    core.process.wait_for_line(r"feed lost: ", DEADLINE)
    assert len([line for line in core.process.stderr_lines if "connected to FT" in line]) >= 2


def test_sigterm_stops_both_cleanly_and_quickly(ft: Service, core: Service) -> None:
    wait_until(lambda: feed(core.port)["connected"], DEADLINE, what="the feed")

    started = time.monotonic()
    assert ft.process.terminate(DEADLINE) == 0, ft.process.output()
    assert time.monotonic() - started < STOP_WITHIN
    # FT's drain ended Core's stream with status OK, not a broken connection.
    core.process.wait_for_line(r"feed lost: FT ended the stream", DEADLINE)

    started = time.monotonic()
    assert core.process.terminate(DEADLINE) == 0, core.process.output()
    assert time.monotonic() - started < STOP_WITHIN

    for service, last in ((ft, r"FT stopped \(0 slow consumers"), (core, r"Core stopped$")):
        no_traceback(service.process)
        assert re.search(last, service.process.stderr_lines[-1]), service.process.output()


# --- quotopia up -----------------------------------------------------------------


def _up_env(data: Path) -> dict[str, str]:
    """Every child of ``quotopia up`` on loopback and free ports, its data in ``data``."""
    return clean_env(
        FT_HOST="127.0.0.1",
        CORE_HOST="127.0.0.1",
        RECORDER_HOST="127.0.0.1",
        FT_METRICS_PORT="0",
        RECORDER_METRICS_PORT="0",
        XDG_DATA_HOME=str(data),
    )


def test_up_runs_all_three_with_history_out_of_the_box(tmp_path: Path) -> None:
    with QuotopiaProcess("up", "--ft-port", "0", "--core-port", "0", env=_up_env(tmp_path)) as up:
        ft_port = up.wait_for_line(r"^ft   \| .*" + FT_READY, DEADLINE, stream="stdout")[1]
        ready = up.wait_for_line(r"^core \| .*" + CORE_READY, DEADLINE, stream="stdout")
        assert ready[2] == f"127.0.0.1:{ft_port}"
        core_port = int(ready[1])
        recording = up.wait_for_line(
            r"^rec  \| .*recording quotes from FT at (\S+) into (\S+)", DEADLINE, stream="stdout"
        )
        assert recording[1] == f"127.0.0.1:{ft_port}"
        # The default database, in the data directory: no --db anywhere.
        assert recording[2] == f"sqlite:///{tmp_path / 'quotopia' / 'quotes.db'}"
        wait_until(lambda: quotes(core_port) or None, DEADLINE, what="quotes through up")

        def stored() -> list[dict[str, object]] | None:
            status, body = http_get(core_port, "/quotes/BTC/history?limit=5")
            return body["quotes"] if status == 200 and len(body["quotes"]) >= 2 else None

        # FT's default tick is 1 s: two quotes of BTC are in the history within seconds.
        history = wait_until(stored, DEADLINE, what="history through up")
        assert [q["symbol"] for q in history] == ["BTC"] * len(history)

        assert up.terminate(DEADLINE) == 0, up.output()
        stdout = up.stdout_lines
        assert any(line.startswith("ft   | ") and "FT stopped" in line for line in stdout)
        assert any(line.startswith("core | ") and "Core stopped" in line for line in stdout)
        assert any(line.startswith("rec  | ") and "recorder stopped" in line for line in stdout)
        assert up.stderr_lines == []
        no_traceback(up)


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigint-to-up", "ctrl-c-in-a-terminal"])
def test_up_stops_core_and_recorder_before_ft_so_a_clean_stop_warns_of_nothing(
    ctrl_c: bool, tmp_path: Path
) -> None:
    # Were FT and Core stopped at the same moment, Core could see its feed end first
    # and warn "feed lost". A terminal's Ctrl-C signals the whole foreground process
    # group; with ctrl_c, up leads a group of its own and the test signals all of it.
    args = ("up", "--ft-port", "0", "--core-port", "0")
    with QuotopiaProcess(*args, env=_up_env(tmp_path), new_session=ctrl_c) as up:
        ready = up.wait_for_line(r"^core \| .*" + CORE_READY, DEADLINE, stream="stdout")
        core_port = int(ready[1])
        # Streams from FT are open when the stop comes, so there are feeds to lose.
        wait_until(lambda: feed(core_port)["connected"], DEADLINE, what="Core's feed")
        up.wait_for_line(r"^rec  \| .*connected to FT at ", DEADLINE, stream="stdout")

        if ctrl_c:
            os.killpg(up.pid, signal.SIGINT)
        else:
            up.signal(signal.SIGINT)
        assert up.wait(DEADLINE) == 0, up.output()
        no_traceback(up)
        assert up.stderr_lines == [], up.output()
        stdout = up.stdout_lines
        assert not [line for line in stdout if "WARNING" in line], up.output()

        def first(prefix: str, text: str) -> int:
            found = [i for i, line in enumerate(stdout) if line.startswith(prefix) and text in line]
            assert found, f"no {prefix!r} line with {text!r}\n{up.output()}"
            return found[0]

        ft_stopped = first("ft   | ", "FT stopped")
        assert first("core | ", "Core stopped") < ft_stopped, up.output()
        assert first("rec  | ", "recorder stopped") < ft_stopped, up.output()


# --- the command line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["ft", "--port", "70000"], "70000"),
        (["ft", "--tick-interval", "-1"], "-1"),
        (["ft", "--symbols", "SBER=abc"], "SBER=abc"),
        (["core", "--ft-addr", "nonsense"], "nonsense"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_status_2(args: list[str], mentions: str) -> None:
    result = run_cli(*args)
    assert mentions in usage_error(result, args[0])
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_port_in_use_is_one_line_and_exit_status_2(ft: Service) -> None:
    taken = str(ft.port)
    for command in (ft_args(port=ft.port), ["core", "--host", "127.0.0.1", "--port", taken]):
        line = usage_error(run_cli(*command), command[0])
        assert line.startswith(f"quotopia {command[0]}: error: cannot listen on ")
        assert taken in line


#: The flags README's configuration table documents, per command.
DOCUMENTED = {
    (): ["--help", "--version", "ft", "core", "recorder", "db", "up"],
    ("ft",): [
        "--host",
        "--port",
        "--tick-interval",
        "--seed",
        "--symbols",
        "--drain-timeout",
        "--log-level",
        "--log-format",
    ],
    ("core",): [
        "--host",
        "--port",
        "--ft-addr",
        "--backoff-cap",
        "--feed-timeout",
        "--workers",
        "--log-level",
        "--log-format",
    ],
    ("recorder",): [
        "--host",
        "--metrics-port",
        "--ft-addr",
        "--db",
        "--batch-size",
        "--flush-interval",
        "--buffer",
        "--retention",
        "--migrate",
        "--backoff-cap",
        "--feed-timeout",
        "--drain-timeout",
        "--log-level",
        "--log-format",
    ],
    ("up",): [
        "--ft-port",
        "--core-port",
        "--ft-metrics-port",
        "--recorder-metrics-port",
        "--db",
        "--recorder",
        "--log-level",
        "--log-format",
    ],
}


def _defined_flags(command: tuple[str, ...]) -> set[str]:
    """Every option string the parser defines for ``command``."""
    parser = build_parser()
    for name in command:
        (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = commands.choices[name]
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", list(DOCUMENTED), ids=lambda c: " ".join(c) or "quotopia")
def test_help_mentions_every_flag(command: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result
    assert result.stderr == ""
    missing = [
        flag
        for flag in {*DOCUMENTED[command], *_defined_flags(command)}
        if flag not in result.stdout
    ]
    assert not missing, f"{missing} not in:\n{result.stdout}"
