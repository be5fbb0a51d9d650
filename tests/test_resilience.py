"""Resilience, end to end: real FT and Core processes under faults.

Each fault is done to a real process with a real signal: SIGKILL (FT dies, its
sockets close), SIGSTOP/SIGCONT (FT freezes with its connections open), SIGTERM
(a graceful drain). Core's view of it is read where an operator would read it:
``/health``, ``/quotes`` and its log.

As in ``test_e2e.py``: every service listens on ``--port 0`` and reports its real
port in its "listening on" line; every wait polls a condition under a deadline.
Durations are measured from the moment the process announced an event (when its
log line was read, milliseconds after it was written) or the test caused it (a
signal), to the first poll that saw the effect: polling every 20 ms, each is at
most one poll interval plus one HTTP round trip too long.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from _procs import QuotopiaProcess, clean_env, wait_until
from _services import (
    DEADLINE,
    SYMBOLS,
    Service,
    btc,
    feed,
    ft_metrics_port,
    http_get,
    quotes,
    running_core,
    running_ft,
    stop,
)

pytestmark = pytest.mark.e2e

#: How often the tests poll Core's HTTP API while timing something.
POLL = 0.02
#: What both services promise: a graceful stop within this many seconds of SIGTERM.
STOP_WITHIN = 2.0

RETRY = r"retrying in \d+\.\d\ds$"

#: Signs of trouble that must never appear in a service's output, even under
#: ``python -X dev`` (which shows ResourceWarnings and asyncio's debug checks).
TROUBLE = (
    " ERROR ",
    "Traceback",
    "ResourceWarning",
    "unclosed",
    "Exception ignored",
    "was never awaited",
    "Task was destroyed",
)

#: Measurements go to the log: shown with a failure, or live with ``--log-cli-level=INFO``.
logger = logging.getLogger(__name__)


# --- talking to Core -------------------------------------------------------------


def without_age(quote: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in quote.items() if key != "age_seconds"}


def quote_time(quote: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(quote["time"])


def fresher_btc(port: int, than: dict[str, Any]) -> dict[str, Any] | None:
    """Core's BTC quote if FT made it after ``than``, else None."""
    quote = btc(port)
    if quote is None or quote_time(quote) <= quote_time(than):
        return None
    return quote


def feed_down_at(port: int) -> float:
    """Poll Core's ``/health`` until its feed is down; return when that was seen."""
    return wait_until(
        lambda: time.monotonic() if not feed(port)["connected"] else None,
        DEADLINE,
        interval=POLL,
        what="Core's feed down",
    )


def measured(name: str, value: float) -> None:
    logger.info("measured %s = %s", name, value)


# --- running the services --------------------------------------------------------


def dev_mode_env(dev: bool) -> dict[str, str]:
    """The services' environment; ``PYTHONDEVMODE=1`` is ``python -X dev``."""
    return clean_env(PYTHONDEVMODE="1") if dev else clean_env()


def lines_matching(process: QuotopiaProcess, text: str) -> list[str]:
    return [line for line in process.stderr_lines if text in line]


def retry_delays(process: QuotopiaProcess) -> list[float]:
    """Every delay Core announced ("...; retrying in 0.42s"), in order."""
    return [
        float(found[1])
        for line in process.stderr_lines
        if (found := re.search(r"; retrying in (\d+\.\d+)s$", line))
    ]


def assert_no_trouble(process: QuotopiaProcess) -> None:
    for line in process.stdout_lines + process.stderr_lines:
        assert not any(sign in line for sign in TROUBLE), process.output()


# --- 1. FT killed and restarted ----------------------------------------------------


def test_ft_killed_core_serves_last_prices_and_recovers_when_ft_returns() -> None:
    cap = 1.0
    # The first FT ticks so slowly that the only quotes it ever sends are its opening
    # snapshot: "the prices just before the kill" are then known exactly, with no
    # tick racing the kill. A long feed timeout keeps Core's staleness check out of
    # the way: Core must notice the kill from the closed connection alone.
    with (
        running_ft(tick=60.0) as ft,
        running_core(ft.port, "--backoff-cap", str(cap), "--feed-timeout", "60") as core,
    ):
        before = wait_until(
            lambda: q if set(q := quotes(core.port)) == SYMBOLS else None,
            DEADLINE,
            what="every symbol at Core",
        )
        assert feed(core.port)["connected"]

        killed_at = time.monotonic()
        ft.process.signal(signal.SIGKILL)
        down_at = feed_down_at(core.port)
        assert ft.process.wait(DEADLINE) == -signal.SIGKILL
        took = down_at - killed_at
        measured("kill_to_feed_down_s", round(took, 3))
        assert took <= 1.0, f"Core saw the feed down {took:.3f}s after the kill"

        # FT is gone: the last known prices stay, and their age keeps growing.
        asked = time.monotonic()
        last = btc(core.port)
        assert last is not None
        assert quotes(core.port) == before
        aging = wait_until(
            lambda: (
                q
                if (q := btc(core.port)) and q["age_seconds"] >= last["age_seconds"] + 0.3
                else None
            ),
            DEADLINE,
            interval=POLL,
            what="the BTC quote to age",
        )
        answered = time.monotonic()
        grown = aging["age_seconds"] - last["age_seconds"]
        # Core's clock ran no longer than ours between the two requests (+ rounding).
        assert grown <= answered - asked + 0.002
        assert without_age(aging) == without_age(last)
        assert quotes(core.port) == before
        assert not feed(core.port)["connected"]

        # Restart FT only once Core's delay has grown to the cap (0.8-1.0 s with the
        # jitter): the worst case for how long Core takes to notice FT is back.
        wait_until(
            lambda: any(delay >= 0.8 * cap for delay in retry_delays(core.process)),
            DEADLINE,
            what="Core's retry delay to reach the cap",
        )
        with running_ft(port=ft.port, seed=2) as again:
            fresh = wait_until(
                lambda: fresher_btc(core.port, than=last),
                DEADLINE,
                interval=POLL,
                what="a BTC quote from the new FT",
            )
            took = time.monotonic() - again.ready_at
            measured("ft_back_to_fresh_quotes_s", round(took, 3))
            assert took <= cap + 1.0, f"fresh quotes {took:.3f}s after FT was back"
            status = feed(core.port)
            assert status["connected"]
            assert status["reconnects"] >= 1
            assert status["last_update_age_seconds"] < 1.0
            assert fresh["age_seconds"] < 1.0

            # Exactly one "feed lost" (a WARNING), then one INFO line per failed attempt.
            log = core.process.stderr_lines
            (lost,) = [i for i, line in enumerate(log) if "feed lost: " in line]
            assert re.search(r"WARNING +feed lost: connection lost; " + RETRY, log[lost]), log[lost]
            back = next(
                i for i, line in enumerate(log) if i > lost and "connected to FT at" in line
            )
            attempts = log[lost + 1 : back]
            assert attempts, core.process.output()
            for line in attempts:
                assert re.search(r"INFO +FT unavailable: connection refused; " + RETRY, line), line
            assert max(retry_delays(core.process)) <= cap
            assert len(lines_matching(core.process, "connected to FT at")) == 2
            assert_no_trouble(core.process)


# --- 2. Core started long before FT ----------------------------------------------


def test_core_started_before_ft_retries_quietly_in_constant_memory() -> None:
    cap = 0.3
    # A port that was just free: FT binds it, reports it, and dies. (Core's own
    # attempts use ephemeral ports too; the odds of one landing on this port are
    # about one in 28,000 per attempt.)
    with running_ft() as probe:
        port = probe.port
        probe.process.kill()

    with running_core(port, "--backoff-cap", str(cap)) as core:

        def attempts() -> int:
            return len(lines_matching(core.process, "FT unavailable: "))

        wait_until(lambda: attempts() >= 10, DEADLINE, what="10 attempts")
        rss_early = core.process.rss_bytes()
        wait_until(lambda: attempts() >= 40, DEADLINE * 2, what="40 attempts")
        rss_late = core.process.rss_bytes()
        log = core.process.stderr_lines

        # One line per attempt, and nothing else: no tracebacks, no WARNINGs for an
        # FT that was never there.
        (start,) = [i for i, line in enumerate(log) if "connecting to FT at" in line]
        after = log[start + 1 :]
        assert len(after) >= 40
        for line in after:
            assert re.search(r"INFO +FT unavailable: connection refused; " + RETRY, line), line
        assert max(retry_delays(core.process)) <= cap

        # RSS moves by tens of KiB with no leak at all: CPython's allocator grows its
        # arenas in steps, first-use caches fill, pages are touched late. Measured
        # here: about +60 KiB from attempt 10 to 40, flat from about attempt 1000 on
        # (over 1,400 attempts). The slack of 2 MiB (~68 KiB per attempt) catches a
        # leak of anything heavy per attempt (a channel with its HTTP/2 state and
        # buffers, a socket, a task), not a leak of a few bytes.
        grown = rss_late - rss_early
        measured("rss_growth_10_to_40_attempts_bytes", grown)
        assert grown <= 2 * 2**20, f"RSS grew {grown / 2**10:.0f} KiB over 30 attempts"

        with running_ft(port=port) as ft:
            wait_until(lambda: btc(core.port), DEADLINE, interval=POLL, what="quotes at Core")
            took = time.monotonic() - ft.ready_at
            measured("ft_ready_to_quotes_s", round(took, 3))
            assert took <= cap + 1.0, f"quotes {took:.3f}s after FT started"
            status = feed(core.port)
            assert status["connected"]
            assert status["reconnects"] == 0, "a first connection is not a reconnect"
            assert status["last_update_age_seconds"] < 1.0
        assert_no_trouble(core.process)


# --- 3. FT frozen: the connection stays open, nothing arrives ----------------------


def test_frozen_ft_is_noticed_by_the_feed_timeout_and_recovered_after_sigcont() -> None:
    feed_timeout = 1.0
    cap = 1.0
    with (
        running_ft() as ft,
        running_core(
            ft.port, "--feed-timeout", f"{feed_timeout:g}", "--backoff-cap", f"{cap:g}"
        ) as core,
    ):
        wait_until(lambda: btc(core.port), DEADLINE, what="a BTC quote at Core")
        try:
            stopped_at = time.monotonic()
            ft.process.signal(signal.SIGSTOP)
            down_at = feed_down_at(core.port)
            took = down_at - stopped_at
            measured("sigstop_to_feed_down_s", round(took, 3))
            assert took <= feed_timeout + 1.0, f"feed down {took:.3f}s after SIGSTOP"
            core.process.wait_for_line(
                rf"WARNING +feed lost: no data from FT for {feed_timeout:g}s; {RETRY}", DEADLINE
            )
            # Nothing can change Core's quotes now; they stay served.
            last = btc(core.port)
            assert last is not None
            # A new attempt gets a TCP connection (the kernel accepts it for the frozen
            # FT) but no HTTP/2 answer: the same timeout ends it.
            core.process.wait_for_line(
                rf"INFO +FT unavailable: no data from FT for {feed_timeout:g}s; {RETRY}", DEADLINE
            )
            still = btc(core.port)
            assert still is not None
            assert without_age(still) == without_age(last)
            assert still["age_seconds"] > last["age_seconds"]
        finally:
            continued_at = time.monotonic()
            ft.process.signal(signal.SIGCONT)

        wait_until(
            lambda: fresher_btc(core.port, than=last),
            DEADLINE,
            interval=POLL,
            what="a fresh quote after SIGCONT",
        )
        took = time.monotonic() - continued_at
        measured("sigcont_to_fresh_quotes_s", round(took, 3))
        assert took <= cap + 1.0, f"fresh quotes {took:.3f}s after SIGCONT"
        assert feed(core.port)["connected"]
        assert_no_trouble(core.process)
        assert_no_trouble(ft.process)


# --- 4. Graceful drain on SIGTERM ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "dev"),
    [("ft", False), ("ft", True), ("core", True)],
    ids=["ft-first", "ft-first-dev-mode", "core-first-dev-mode"],
)
def test_sigterm_stops_each_service_at_once_and_cleanly(first: str, dev: bool) -> None:
    """Under ``-X dev`` too: no ERROR, traceback or ResourceWarning in either log."""
    env = dev_mode_env(dev)
    with running_ft(env=env) as ft, running_core(ft.port, "--backoff-cap", "1", env=env) as core:
        wait_until(lambda: btc(core.port), DEADLINE, what="a BTC quote at Core")
        if first == "ft":
            took = stop(ft)
            measured(f"ft_sigterm_to_exit_s[{'dev' if dev else 'plain'}]", round(took, 3))
            assert took < STOP_WITHIN
            # The drain ended Core's stream with status OK, not a broken connection.
            core.process.wait_for_line(
                r"WARNING +feed lost: FT ended the stream; " + RETRY, DEADLINE
            )
            took = stop(core)
        else:
            took = stop(core)
            assert took < STOP_WITHIN
            ft.process.wait_for_line(r"INFO +client disconnected: \S+; 0 subscribers$", DEADLINE)
            took = stop(ft)
        assert took < STOP_WITHIN

    assert ft.process.stderr_lines[-1].endswith(
        "FT stopped (0 slow consumers disconnected, 0 quotes conflated)"
    ), ft.process.output()
    assert core.process.stderr_lines[-1].endswith("Core stopped"), core.process.output()
    for service in (ft, core):
        assert len(lines_matching(service.process, "received SIGTERM, shutting down")) == 1
        assert_no_trouble(service.process)
    assert not lines_matching(ft.process, "drain deadline")


#: 40 instruments with 2,000-character names: FT's opening snapshot (~80 KB) alone
#: overfills a 64 KiB HTTP/2 window, so a client that never reads blocks FT's handler
#: on its very first messages. A deterministic stall, not a matter of waiting for
#: "enough" ticks to fill the window.
BULKY_SYMBOLS = ",".join(f"S{i}{'X' * (2000 - len(str(i)) - 1)}=100" for i in range(40))

#: A gRPC client that opens StreamQuotes with a 64 KiB window and never reads it,
#: then polls FT's health (on a second connection) and prints each change.
#: argv: FT's port, its own lifetime in seconds.
_STUCK_CLIENT = """
import asyncio
import sys

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from quotopia._proto import Quote, StreamQuotesRequest

SMALL_WINDOW = Configuration(
    http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1
)


async def main(port: int) -> None:
    async with (
        Channel("127.0.0.1", port, config=SMALL_WINDOW) as stuck,
        Channel("127.0.0.1", port) as other,
        stuck.request(
            "/QuoteService/StreamQuotes",
            Cardinality.UNARY_STREAM,
            StreamQuotesRequest,
            Quote,
        ) as stream,
    ):
        await stream.send_message(StreamQuotesRequest(), end=True)
        # The headers come with FT's first message: FT has subscribed us.
        await stream.recv_initial_metadata()
        print("stream open, not reading", flush=True)
        health = HealthStub(other)
        shown = None
        while True:
            try:
                reply = await health.Check(HealthCheckRequest(service="QuoteService"))
                status = HealthCheckResponse.ServingStatus.Name(reply.status)
            except Exception as exc:
                status = type(exc).__name__
            if status != shown:
                print("health", status, flush=True)
                shown = status
            await asyncio.sleep(0.01)


async def bounded(port: int, lifetime: float) -> None:
    try:
        async with asyncio.timeout(lifetime):
            await main(port)
    except TimeoutError:
        pass


asyncio.run(bounded(int(sys.argv[1]), float(sys.argv[2])))
"""


@pytest.mark.parametrize("dev", [False, True], ids=["plain", "dev-mode"])
def test_sigterm_cuts_a_client_that_does_not_read_at_the_drain_deadline(dev: bool) -> None:
    drain = 1.0
    with (
        running_ft(
            "--drain-timeout",
            f"{drain:g}",
            "--symbols",
            BULKY_SYMBOLS,
            # Keep the slow-consumer policy out of this test: only the drain cuts.
            "--slow-consumer-timeout",
            "600",
            env=dev_mode_env(dev),
            width=160,
        ) as ft,
        QuotopiaProcess(
            str(ft.port), str(DEADLINE * 2), python_args=("-c", _STUCK_CLIENT)
        ) as client,
    ):
        client.wait_for_line(r"^stream open, not reading$", DEADLINE, stream="stdout")
        client.wait_for_line(r"^health SERVING$", DEADLINE, stream="stdout")
        ft.process.wait_for_line(r"INFO +client connected: \S+ \(.*\); 1 subscribers$", DEADLINE)
        metrics_port = ft_metrics_port(ft)
        assert http_get(metrics_port, "/readyz") == (200, {"status": "ready"})

        signalled = time.monotonic()
        ft.process.signal(signal.SIGTERM)
        # While it drains, FT tells load balancers to stop sending.
        wait_until(
            lambda: http_get(metrics_port, "/readyz") == (503, {"status": "draining"}),
            drain,
            interval=0.01,
            what="/readyz draining",
        )
        assert ft.process.wait(DEADLINE) == 0, ft.process.output()
        took = time.monotonic() - signalled
        measured(f"ft_drain_with_stuck_client_s[{'dev' if dev else 'plain'}]", round(took, 3))
        assert drain <= took <= drain + 1.0, f"FT exited {took:.3f}s after SIGTERM"
        # While it drained, FT said NOT_SERVING (then it was gone).
        client.wait_for_line(r"^health (?!SERVING$|NOT_SERVING$)", DEADLINE, stream="stdout")
        health = [line for line in client.stdout_lines if line.startswith("health ")]
        assert health[:2] == ["health SERVING", "health NOT_SERVING"], client.output()

    log = ft.process.stderr_lines
    # Leave out the price moves of the bulky instruments, and under -X dev asyncio's
    # debug note on a callback slower than 0.1 s (logging 40 bulky lines at a tick
    # can be, on a busy machine): diagnostics, not events.
    noise = re.compile(r"INFO +S\d+X+: |WARNING +Executing <.*> took \d+\.\d+ seconds$")
    events = [line for line in log if not noise.search(line)]
    expected = [
        r"INFO +FT listening on ",
        r"INFO +FT metrics on http://",
        r"INFO +client connected: ",
        r"INFO +received SIGTERM, shutting down$",
        rf"WARNING +drain deadline \({drain:g}s\) passed with 1 streams still open; cutting them$",
        r"INFO +client disconnected: \S+ \(drain\); 0 subscribers$",
        r"INFO +FT stopped \(0 slow consumers disconnected, \d+ quotes conflated\)$",
    ]
    assert len(events) == len(expected), ft.process.output()
    for line, pattern in zip(events, expected, strict=True):
        assert re.search(pattern, line), ft.process.output()
    assert_no_trouble(ft.process)


def unsent_bytes(local_port: int, remote_port: int) -> int | None:
    """Bytes queued in the send buffer of a 127.0.0.1 TCP socket (``tx_queue`` in
    /proc/net/tcp): sent but not yet taken by the peer. None if no such socket."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (
                local_port,
                remote_port,
            ):
                return int(queues.split(":")[0], 16)
    return None


@dataclass(frozen=True)
class SlowReader:
    ft: Service
    core: Service
    #: A client that asked for ``/quotes`` (~80 KB) and has read none of it yet.
    client: socket.socket
    #: Bytes of the answer stuck in Core's send queue.
    stuck: int


@contextmanager
def core_answering_a_slow_reader() -> Iterator[SlowReader]:
    """Core in the middle of a response, stuck on a client that is not reading.

    Made certain, not a race: the bulky instruments make ``/quotes`` ~80 KB, and
    the client has a 4 KiB receive buffer; the wait is for bytes to back up in
    Core's send queue, which only happens mid-response.
    """
    with (
        running_ft("--symbols", BULKY_SYMBOLS, width=160) as ft,
        running_core(ft.port) as core,
        socket.socket() as client,
    ):
        wait_until(lambda: len(quotes(core.port)) == 40, DEADLINE, what="every quote at Core")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(DEADLINE)
        client.connect(("127.0.0.1", core.port))
        client.sendall(b"GET /quotes HTTP/1.1\r\nHost: core\r\n\r\n")
        me = client.getsockname()[1]
        stuck = wait_until(
            lambda: unsent_bytes(core.port, me) or None,
            DEADLINE,
            what="Core's answer to back up in its send queue",
        )
        yield SlowReader(ft, core, client, stuck)


def test_core_sigterm_finishes_the_response_in_flight_then_frees_its_port() -> None:
    """A response Core is still sending when SIGTERM arrives is sent in full.

    (A small request sent just before SIGTERM would be a race instead: Core may
    read it, or close the idle keep-alive connection first, as HTTP/1.1 allows;
    clients retry such requests.)
    """
    with core_answering_a_slow_reader() as slow:
        core = slow.core
        signalled = time.monotonic()
        core.process.signal(signal.SIGTERM)

        # Now read: the whole answer comes.
        response = http.client.HTTPResponse(slow.client)
        response.begin()
        body = response.read()  # raises IncompleteRead if the response is cut short
        assert response.status == 200
        assert len(json.loads(body)) == 40
        assert len(body) > slow.stuck

        assert core.process.wait(DEADLINE) == 0, core.process.output()
        took = time.monotonic() - signalled
        measured("core_sigterm_to_exit_with_response_in_flight_s", round(took, 3))
        assert took < STOP_WITHIN

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", core.port), timeout=DEADLINE).close()
        assert core.process.stderr_lines[-1].endswith("Core stopped"), core.process.output()
        assert_no_trouble(core.process)
        slow.ft.process.wait_for_line(r"INFO +client disconnected: \S+; 0 subscribers$", DEADLINE)


def test_core_sigterm_is_not_held_up_by_a_client_that_stops_reading() -> None:
    with core_answering_a_slow_reader() as slow:
        signalled = time.monotonic()
        slow.core.process.signal(signal.SIGTERM)
        # The client never reads. Waiting any longer than the promise is pointless.
        code = slow.core.process.wait(STOP_WITHIN + 1.0)
        took = time.monotonic() - signalled
        measured("core_sigterm_to_exit_with_a_client_not_reading_s", round(took, 3))
        assert code == 0, slow.core.process.output()
        assert took < STOP_WITHIN
        assert_no_trouble(slow.core.process)
