"""End to end: real ``python -m quotopia`` processes on OS-assigned ports.

Every service starts with ``--port 0``; the test reads the real port from the
service's own "listening on" log line. Every wait polls for a condition under a
deadline (``wait_until``, ``wait_for_line``); every process is killed and reaped
when its ``with`` block ends, whatever happened. HTTP goes through ``urllib`` with
proxies disabled.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from _procs import QuotopiaProcess, clean_env, wait_until

from quotopia.cli import build_parser

pytestmark = pytest.mark.e2e

#: Bound on anything that should take a second or two, on a noisy 2-core machine.
DEADLINE = 20.0
#: What the services promise: a graceful stop within this many seconds of SIGTERM.
STOP_WITHIN = 2.0
#: Core's promise: quotes within this many seconds of its start.
QUOTES_WITHIN = 2.0

FT_READY = r"FT listening on 127\.0\.0\.1:(\d+) \("
CORE_READY = r"Core listening on http://127\.0\.0\.1:(\d+), feed from FT at (\S+)"
SYMBOLS = {"SBER", "BTC", "ETH"}

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(port: int, path: str) -> tuple[int, Any]:
    """GET a JSON resource from Core: (status, parsed body)."""
    try:
        with _http.open(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def quotes(port: int) -> dict[str, float]:
    status, body = http_get(port, "/quotes")
    assert status == 200
    assert isinstance(body, dict)
    return body


def feed(port: int) -> dict[str, Any]:
    status, body = http_get(port, "/health")
    assert status == 200
    found: dict[str, Any] = body["feed"]
    return found


def btc(port: int) -> dict[str, Any] | None:
    """Core's BTC quote, or None while it has none (404)."""
    status, body = http_get(port, "/quotes/BTC")
    if status == 404:
        return None
    assert status == 200
    assert isinstance(body, dict)
    return body


def no_traceback(process: QuotopiaProcess) -> None:
    assert "Traceback" not in process.output(), process.output()


@dataclass(frozen=True)
class Service:
    process: QuotopiaProcess
    port: int


def ft_args(port: int = 0, seed: int = 1) -> list[str]:
    return [
        "ft",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tick-interval",
        "0.2",
        "--seed",
        str(seed),
    ]


def core_args(ft_port: int) -> list[str]:
    return [
        "core",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ft-addr",
        f"127.0.0.1:{ft_port}",
        "--backoff-cap",
        "0.5",
    ]


@pytest.fixture
def ft() -> Iterator[Service]:
    with QuotopiaProcess(*ft_args()) as process:
        port = int(process.wait_for_line(FT_READY, DEADLINE)[1])
        yield Service(process, port)


@pytest.fixture
def core(ft: Service) -> Iterator[Service]:
    with QuotopiaProcess(*core_args(ft.port)) as process:
        ready = process.wait_for_line(CORE_READY, DEADLINE)
        assert ready[2] == f"127.0.0.1:{ft.port}"
        yield Service(process, int(ready[1]))


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
    with QuotopiaProcess(*ft_args(port=ft.port, seed=2)) as again:
        assert int(again.wait_for_line(FT_READY, DEADLINE)[1]) == ft.port
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


def test_up_runs_both_and_stops_both_on_sigterm() -> None:
    env = clean_env(FT_HOST="127.0.0.1", CORE_HOST="127.0.0.1")
    with QuotopiaProcess("up", "--ft-port", "0", "--core-port", "0", env=env) as up:
        ft_port = up.wait_for_line(r"^ft   \| .*" + FT_READY, DEADLINE, stream="stdout")[1]
        ready = up.wait_for_line(r"^core \| .*" + CORE_READY, DEADLINE, stream="stdout")
        assert ready[2] == f"127.0.0.1:{ft_port}"
        core_port = int(ready[1])
        wait_until(lambda: quotes(core_port) or None, DEADLINE, what="quotes through up")

        assert up.terminate(DEADLINE) == 0, up.output()
        stdout = up.stdout_lines
        assert any(line.startswith("ft   | ") and "FT stopped" in line for line in stdout)
        assert any(line.startswith("core | ") and "Core stopped" in line for line in stdout)
        assert up.stderr_lines == []
        no_traceback(up)


# --- the command line ------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotopia", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=DEADLINE,
        check=False,
    )


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
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"quotopia {args[0]}: error: ")
    assert mentions in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_port_in_use_is_one_line_and_exit_status_2(ft: Service) -> None:
    taken = str(ft.port)
    for command in (ft_args(port=ft.port), ["core", "--host", "127.0.0.1", "--port", taken]):
        result = run_cli(*command)
        assert result.returncode == 2, result
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"quotopia {command[0]}: error: cannot listen on ")
        assert taken in lines[0]


#: The flags README's configuration table documents, per command.
DOCUMENTED = {
    (): ["--help", "--version", "ft", "core", "up"],
    ("ft",): [
        "--host",
        "--port",
        "--tick-interval",
        "--seed",
        "--symbols",
        "--drain-timeout",
        "--log-level",
    ],
    ("core",): [
        "--host",
        "--port",
        "--ft-addr",
        "--backoff-cap",
        "--feed-timeout",
        "--workers",
        "--log-level",
    ],
    ("up",): ["--ft-port", "--core-port", "--log-level"],
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
