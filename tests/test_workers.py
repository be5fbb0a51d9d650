"""``quotopia core --workers N`` end to end: real processes on OS-assigned ports.

One FT serves the whole module. Each test of a running Core starts ``quotopia core
--workers 2`` and reads the port and the workers' process ids from its log lines.
Which worker holds a connection is read from Linux's ``/proc`` (the sockets each
process owns), so no debug endpoint is needed to tell them apart.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from _otlp import ReceivedSpan, otlp_receiver
from _procs import QuotopiaProcess, clean_env, wait_until
from _services import DEADLINE, Service, core_args, run_cli, running_ft, usage_error

pytestmark = pytest.mark.e2e

#: The promise: a graceful stop within this many seconds of SIGTERM.
STOP_WITHIN = 2.0
WORKERS = 2

CORE_READY = r"Core listening on http://127\.0\.0\.1:(\d+), feed from FT at \S+ \((\d+) workers\)"
WORKER_STARTED = r"worker (\d+) started \(pid (\d+)\)"


@dataclass(frozen=True)
class Workers:
    process: QuotopiaProcess
    port: int
    #: The workers' process ids, by worker number.
    pids: dict[int, int]
    #: How many lines FT had logged before these workers started.
    ft_lines_before: int


@pytest.fixture(scope="module")
def ft() -> Iterator[Service]:
    with running_ft() as service:
        yield service


@pytest.fixture
def core(ft: Service) -> Iterator[Workers]:
    ft_lines_before = len(ft.process.stderr_lines)
    with QuotopiaProcess(*core_args(ft.port, "--workers", str(WORKERS))) as process:
        ready = process.wait_for_line(CORE_READY, DEADLINE)
        assert int(ready[2]) == WORKERS
        pids = {}
        for line in process.stderr_lines:
            if found := re.search(WORKER_STARTED, line):
                pids[int(found[1])] = int(found[2])
        assert sorted(pids) == list(range(1, WORKERS + 1)), process.output()
        for number in pids:
            process.wait_for_line(rf"worker {number}: serving port {ready[1]}\b", DEADLINE)
        yield Workers(process, int(ready[1]), pids, ft_lines_before)


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def connections_held(pid: int, port: int) -> int:
    """How many established TCP connections on local ``port`` process ``pid`` owns."""
    sockets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target.removeprefix("socket:[").removesuffix("]"))
    held = 0
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            established = state == "01"
            if established and int(local.rsplit(":", 1)[1], 16) == port and inode in sockets:
                held += 1
    return held


def gone(pid: int) -> bool:
    """Has process ``pid`` exited (a zombie counts as gone)?"""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def feeds_since(ft: Service, start: int) -> int:
    """How many streams FT has opened since its ``start``-th log line."""
    return sum("client connected" in line for line in ft.process.stderr_lines[start:])


def no_traceback(process: QuotopiaProcess) -> None:
    assert "Traceback" not in process.output(), process.output()


def test_each_worker_serves_with_its_own_feed_and_sigterm_stops_all(
    ft: Service, core: Workers
) -> None:
    port, pids = core.port, list(core.pids.values())
    # One stream from FT per worker.
    wait_until(lambda: feeds_since(ft, core.ft_lines_before) >= WORKERS, DEADLINE, what="the feeds")
    wait_until(lambda: get(port, "/quotes/BTC")[0] == 200, DEADLINE, what="a BTC quote")

    # Fresh keep-alive connections, each kept open once it got a quote, until every
    # worker holds some: then every worker has answered with a quote. (A worker whose
    # feed has not delivered yet answers 404: that connection is closed.)
    with ExitStack() as open_connections:

        def every_worker_answered() -> bool:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
            open_connections.callback(connection.close)
            connection.request("GET", "/quotes/BTC")
            response = connection.getresponse()
            body = response.read()
            if response.status == 404:
                connection.close()
                return False
            assert response.status == 200
            assert body.startswith(b'{"symbol": "BTC"')
            return all(connections_held(pid, port) for pid in pids)

        wait_until(every_worker_answered, DEADLINE, interval=0, what="every worker to answer")

    status, body = get(port, "/health")
    assert status == 200
    assert b'"connected": true' in body
    assert feeds_since(ft, core.ft_lines_before) == WORKERS

    started = time.monotonic()
    assert core.process.terminate(DEADLINE) == 0, core.process.output()
    assert time.monotonic() - started < STOP_WITHIN
    assert all(gone(pid) for pid in pids)
    lines = core.process.stderr_lines
    assert lines[-1].endswith("INFO    Core stopped"), core.process.output()
    assert len([line for line in lines if re.search(r"worker \d: Core stopped$", line)]) == WORKERS
    no_traceback(core.process)


def test_a_worker_that_dies_stops_the_others_and_fails_the_parent(core: Workers) -> None:
    wait_until(lambda: get(core.port, "/quotes")[0] == 200, DEADLINE, what="quotes")
    os.kill(core.pids[1], signal.SIGKILL)
    assert core.process.wait(DEADLINE) == 1, core.process.output()
    assert all(gone(pid) for pid in core.pids.values())
    core.process.wait_for_line(r"worker 1 \(pid \d+\) exited with status -9", 0)
    core.process.wait_for_line(r"worker 2: Core stopped$", 0)
    no_traceback(core.process)


def test_the_workers_stop_when_the_parent_dies(core: Workers) -> None:
    wait_until(lambda: get(core.port, "/quotes")[0] == 200, DEADLINE, what="quotes")
    assert core.process.kill() == -signal.SIGKILL
    wait_until(lambda: all(gone(pid) for pid in core.pids.values()), DEADLINE, what="workers gone")
    # And the port is free again.
    with socket.create_server(("127.0.0.1", core.port)):
        pass


def test_every_worker_traces_as_one_of_core_s_workers(ft: Service) -> None:
    """Tracing on (OTEL_EXPORTER_OTLP_ENDPOINT): each worker sends its own spans,
    marked with its number, and flushes them when it stops: its feed session ends
    with the stop, so that span arrives only if the worker's last export does."""
    with otlp_receiver() as receiver:
        env = clean_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100"
        )
        with QuotopiaProcess(*core_args(ft.port, "--workers", str(WORKERS)), env=env) as process:
            port = int(process.wait_for_line(CORE_READY, DEADLINE)[1])
            for number in range(1, WORKERS + 1):
                process.wait_for_line(rf"worker {number}: .*tracing on: otlp to ", DEADLINE)

            def workers_of(spans: list[ReceivedSpan], name: str) -> set[object]:
                return {s.resource.get("quotopia.worker") for s in spans if s.name == name}

            def every_worker_traced_a_request() -> bool:
                get(port, "/quotes")  # a fresh connection each time: any worker may take it
                return workers_of(receiver.spans(), "GET /quotes") == set(range(1, WORKERS + 1))

            wait_until(every_worker_traced_a_request, DEADLINE, interval=0.05, what="spans")
            assert process.terminate(DEADLINE) == 0, process.output()

        feed = "QuoteService/StreamQuotes"
        spans = receiver.wait_for(lambda spans: len(workers_of(spans, feed)) == WORKERS)
    for span in spans:
        assert span.service_name == "quotopia-core"
        assert span.resource["quotopia.worker"] in range(1, WORKERS + 1)
    requests = [s for s in spans if s.name == "GET /quotes"]
    assert {(s.kind, s.attributes["http.response.status_code"]) for s in requests} == {
        ("SERVER", 200)
    }
    no_traceback(process)


def test_a_bad_tracing_variable_is_one_line_and_exit_status_2() -> None:
    result = run_cli("core", "--workers", "2", OTEL_TRACES_EXPORTER="zipkin")
    assert "OTEL_TRACES_EXPORTER" in usage_error(result, "core")


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--workers", "0"], {}, "workers must be at least 1, got 0"),
        (["--workers", "two"], {}, "two"),
        ([], {"CORE_WORKERS": "-1"}, "got -1"),
    ],
)
def test_a_bad_worker_count_is_one_line_and_exit_status_2(
    args: list[str], env: dict[str, str], mentions: str
) -> None:
    assert mentions in usage_error(run_cli("core", *args, **env), "core")


def test_a_port_in_use_is_one_line_and_exit_status_2(ft: Service) -> None:
    result = run_cli("core", "--host", "127.0.0.1", "--port", str(ft.port), "--workers", "2")
    line = usage_error(result, "core")
    assert line.startswith("quotopia core: error: cannot listen on ")
    assert str(ft.port) in line
