"""FT and Core as real processes for end-to-end tests, and Core's API over HTTP.

Every service starts on ``127.0.0.1`` with ``--port 0``; the real port is read
from the service's own "listening on" log line. :func:`running_ft` and
:func:`running_core` are context managers: on exit the process is killed and
reaped, whatever happened (see :class:`~_procs.QuotopiaProcess`).

HTTP goes through ``urllib`` with proxies disabled, so a proxy set in the
environment cannot stand between a test and Core.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from _procs import QuotopiaProcess, clean_env
from _waiting import DEADLINE
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "CORE_READY",
    "DEADLINE",
    "FT_METRICS",
    "FT_READY",
    "RECORDER_METRICS",
    "SYMBOLS",
    "Service",
    "btc",
    "core_args",
    "feed",
    "ft_args",
    "ft_metrics_port",
    "http_get",
    "quotes",
    "recorder_args",
    "run_cli",
    "running_core",
    "running_ft",
    "running_recorder",
    "scrape",
    "stop",
    "usage_error",
]


#: FT's start line; group 1 is its port.
FT_READY = r"FT listening on 127\.0\.0\.1:(\d+) \("
#: Core's start line; group 1 is its port, group 2 the FT address it reads from.
#: FT's metrics endpoint line; group 1 is its port.
FT_METRICS = r"FT metrics on http://127\.0\.0\.1:(\d+)/metrics"

CORE_READY = r"Core listening on http://127\.0\.0\.1:(\d+), feed from FT at (\S+)"
#: FT's default instruments.
SYMBOLS = frozenset({"SBER", "BTC", "ETH"})


@dataclass(frozen=True)
class Service:
    process: QuotopiaProcess
    port: int
    #: When its "listening" line was read (``time.monotonic()``).
    ready_at: float


def ft_args(*flags: str, port: int = 0, tick: float = 0.2, seed: int = 1) -> list[str]:
    """``quotopia ft`` on 127.0.0.1 with a short tick and a fixed seed, plus ``flags``."""
    return [
        "ft",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--tick-interval",
        str(tick),
        "--seed",
        str(seed),
        *flags,
    ]


def core_args(ft_port: int, *flags: str) -> list[str]:
    """``quotopia core`` on 127.0.0.1, port 0, fed by the FT on ``ft_port``, plus ``flags``."""
    return [
        "core",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ft-addr",
        f"127.0.0.1:{ft_port}",
        *flags,
    ]


@contextmanager
def running_ft(
    *flags: str,
    port: int = 0,
    tick: float = 0.2,
    seed: int = 1,
    env: dict[str, str] | None = None,
    width: int | None = None,
) -> Iterator[Service]:
    """FT, once it listens (on ``port`` if that is not 0)."""
    with QuotopiaProcess(
        *ft_args(*flags, port=port, tick=tick, seed=seed), env=env, width=width
    ) as process:
        ready, ready_at = process.wait_for_line_at(FT_READY, DEADLINE)
        assert port in (0, int(ready[1])), process.output()
        yield Service(process, int(ready[1]), ready_at)


@contextmanager
def running_core(ft_port: int, *flags: str, env: dict[str, str] | None = None) -> Iterator[Service]:
    """Core, fed by the FT on ``ft_port``, once it listens."""
    with QuotopiaProcess(*core_args(ft_port, *flags), env=env) as process:
        ready, ready_at = process.wait_for_line_at(CORE_READY, DEADLINE)
        assert ready[2] == f"127.0.0.1:{ft_port}", process.output()
        yield Service(process, int(ready[1]), ready_at)


#: The recorder's endpoint line; group 1 is its port.
RECORDER_METRICS = r"recorder metrics on http://127\.0\.0\.1:(\d+)/metrics"


def recorder_args(ft_port: int, database: str, *flags: str) -> list[str]:
    """``quotopia recorder`` on 127.0.0.1, its endpoint on port 0, from the FT on
    ``ft_port`` into ``database``, with short waits, plus ``flags``."""
    return [
        "recorder",
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--ft-addr",
        f"127.0.0.1:{ft_port}",
        "--db",
        database,
        "--flush-interval",
        "0.05",
        "--backoff-cap",
        "0.5",
        *flags,
    ]


@contextmanager
def running_recorder(
    ft_port: int, database: str, *flags: str, env: dict[str, str] | None = None
) -> Iterator[Service]:
    """The recorder, once it records (its ``port`` is its metrics endpoint's)."""
    with QuotopiaProcess(*recorder_args(ft_port, database, *flags), env=env) as process:
        ready, ready_at = process.wait_for_line_at(RECORDER_METRICS, DEADLINE)
        process.wait_for_line(r"recording quotes from ", DEADLINE)
        yield Service(process, int(ready[1]), ready_at)


def ft_metrics_port(ft: Service) -> int:
    """The port of ``ft``'s metrics endpoint (``/metrics``, ``/livez``, ``/readyz``)."""
    return int(ft.process.wait_for_line(FT_METRICS, DEADLINE)[1])


def stop(service: Service) -> float:
    """SIGTERM, wait for exit status 0, and return how long the exit took."""
    signalled = time.monotonic()
    service.process.signal(signal.SIGTERM)
    code = service.process.wait(DEADLINE)
    took = time.monotonic() - signalled
    assert code == 0, service.process.output()
    return took


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m quotopia *args`` to its end, with ``env`` added to a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "quotopia", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=DEADLINE,
        check=False,
    )


def usage_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """Check ``result`` is the CLI refusing ``command``'s settings: exit status 2 and
    one line on stderr, ``quotopia <command>: error: <message>``. Returns the line."""
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"quotopia {command}: error: "), result.stderr
    return lines[0]


# --- Core's API ------------------------------------------------------------------

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(port: int, path: str) -> tuple[int, Any]:
    """GET a JSON resource from Core: (status, parsed body)."""
    try:
        with _http.open(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


#: One sample of an exposition: its name and its sorted labels.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def scrape(port: int) -> dict[SampleKey, float]:
    """Every sample of ``GET /metrics`` on ``port``, in the Prometheus text format."""
    with _http.open(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def quotes(port: int) -> dict[str, float]:
    """Core's ``/quotes``: the latest price of every symbol it has."""
    status, body = http_get(port, "/quotes")
    assert status == 200
    assert isinstance(body, dict)
    return body


def feed(port: int) -> dict[str, Any]:
    """The ``feed`` part of Core's ``/health`` (which is 200 "healthy" throughout)."""
    status, body = http_get(port, "/health")
    assert status == 200
    assert body["status"] == "healthy"
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
