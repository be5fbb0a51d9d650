"""Churn (issue 3, point 6): thousands of streams dropped abruptly, round after round.

FT runs as a real process. Each round, ``scripts/churn_client.py`` (another real
process) opens 2,000 StreamQuotes streams and, once every one has its snapshot,
disappears without a goodbye: SIGKILL from this test, or a TCP RST on every
connection. After each round FT must report 0 subscribers again and hold no
more file descriptors than before; after the last, its RSS must be within 10% of
the baseline, and a new client must get quotes.

Two shapes of client alternate, because each tears down different things in FT:

- 2,000 connections with one stream each: how Core and most clients connect
  (one channel, one stream), so each drop tears down a whole HTTP/2 connection;
- 200 connections with ten streams each: many streams multiplexed on one
  connection, as behind a gRPC-aware proxy; each drop ends ten streams at once.

FT's subscriber count comes from its own log: every stream's "client connected"
and "client disconnected" line ends with the count at that moment, and FT logs
them from its one event-loop thread, so the last such line is the current count.
That needs no test-only endpoint and costs ~4,000 lines a round.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import pytest
from _procs import QuotopiaProcess, clean_env, wait_until
from _services import SYMBOLS, running_ft
from grpclib.client import Channel
from grpclib.const import Cardinality

from quotopia._proto import Quote, StreamQuotesRequest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/<pid>"),
]

REPO = Path(__file__).resolve().parents[1]
CHURN_CLIENT = REPO / "scripts" / "churn_client.py"

STREAMS = 2000
#: Bound on waits that take a second or two on an idle 2-core machine.
DEADLINE = 30.0
#: Bound on one churn client getting every stream its snapshot. On a 2-core
#: machine: 3-4 s for 2,000 connections, about 2 s for 200.
READY_WITHIN = 60.0
#: The requirement: after the churn, FT's RSS is within this fraction of the baseline.
RSS_TOLERANCE = 0.10

SUBSCRIBERS = re.compile(r"; (\d+) subscribers$")

logger = logging.getLogger("churn")


@dataclass(frozen=True)
class Round:
    connections: int
    #: "kill": the test SIGKILLs the client; "reset": the client aborts with RST.
    mode: str

    def __str__(self) -> str:
        return f"{STREAMS} streams on {self.connections} connections, {self.mode}"


#: The baseline is FT's RSS after this round, at 0 subscribers: by then the lazy
#: imports, allocator arenas and per-connection state of a full load exist, so
#: what follows measures churn, not start-up. After it, RSS moves in a band with
#: no trend (measured over 20 rounds, 40,000 streams): a round that starts before
#: the cycle collector has freed the last round's streams peaks higher. grpclib
#: holds a closed connection's handler until ~10 new connections arrive, and a
#: handler task's exception, traceback and frames form cycles. Rounds ended up to
#: 9.4% above this baseline (one run in six; usually 5-7%), so the requirement is
#: checked where it says, on the RSS FT returns to after the churn, not per round.
WARM_UP = Round(STREAMS, "kill")
#: Every shape with every way to go.
MEASURED = (
    Round(200, "reset"),
    Round(STREAMS, "reset"),
    Round(200, "kill"),
    Round(STREAMS, "kill"),
)


# --- FT's resources, from /proc ----------------------------------------------------


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert found, status
    return int(found[1])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reported_subscribers(lines: list[str]) -> int | None:
    """The subscriber count in FT's last "client (dis)connected" line, if any."""
    for line in reversed(lines):
        found = SUBSCRIBERS.search(line)
        if found:
            return int(found[1])
    return None


def last_lines(ft: QuotopiaProcess, count: int = 40) -> str:
    """The end of FT's log, for assertion messages (all of it can be 50,000 lines)."""
    return "\n".join(ft.stderr_lines[-count:])


@contextmanager
def fd_limit(needed: int) -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed``, so FT inherits it.

    FT does not raise its own limit; with a common default of 1024 it could not
    accept 2,000 connections (asyncio logs EMFILE at ERROR and stops accepting).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- the churn client --------------------------------------------------------------


class ChurnClient:
    """A running ``scripts/churn_client.py``: its stdout read under deadlines."""

    def __init__(self, popen: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        self._popen = popen
        self._stderr = stderr
        self._buffer = b""

    def describe(self) -> str:
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace")
        return f"churn client (exit status {self._popen.poll()}), stderr:\n{err}"

    def read_line(self, timeout: float) -> str:
        """The next line of the client's stdout; fails after ``timeout`` seconds."""
        assert self._popen.stdout is not None
        fd = self._popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line after {timeout}s from the {self.describe()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"stdout ended early: {self._buffer!r}; {self.describe()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def kill(self) -> None:
        self._popen.kill()
        assert self._popen.wait(DEADLINE) == -9, self.describe()

    def wait(self, timeout: float) -> int:
        return self._popen.wait(timeout)


@contextmanager
def churn_client(port: int, run: Round) -> Iterator[ChurnClient]:
    """Start the churn client for one round.

    Resource handling: leaving the ``with`` block kills the client if it still
    runs, reaps it and closes its pipe and stderr file.
    """
    with tempfile.TemporaryFile() as stderr:
        popen = subprocess.Popen(
            [
                sys.executable,
                str(CHURN_CLIENT),
                "127.0.0.1",
                str(port),
                f"--streams={STREAMS}",
                f"--connections={run.connections}",
                f"--mode={run.mode}",
                f"--ready-timeout={READY_WITHIN:g}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=0,
            cwd=REPO,
            env=clean_env(),
        )
        try:
            yield ChurnClient(popen, stderr)
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait(DEADLINE)
            assert popen.stdout is not None
            popen.stdout.close()


# --- one round ---------------------------------------------------------------------


def churn_round(ft: QuotopiaProcess, port: int, run: Round, fds_before: int) -> int:
    """Open STREAMS streams, drop them abruptly; check FT is back to idle; return its RSS."""
    mark = len(ft.stderr_lines)
    started = time.monotonic()
    with churn_client(port, run) as client:
        assert client.read_line(READY_WITHIN + DEADLINE) == f"ready {STREAMS}", client.describe()
        # FT logs a subscriber before sending its snapshot: the line is there already.
        ft.wait_for_line(rf"client connected: .*; {STREAMS} subscribers$", DEADLINE, start=mark)
        ready = time.monotonic()
        peak = rss_kib(ft.pid)
        if run.mode == "kill":
            client.kill()
        else:
            assert client.read_line(DEADLINE) == f"reset {run.connections}", client.describe()
            assert client.wait(DEADLINE) == 0, client.describe()

    ft.wait_for_line(r"client disconnected: .*; 0 subscribers$", DEADLINE, start=mark)
    wait_until(
        lambda: open_fds(ft.pid) == fds_before,
        DEADLINE,
        what=f"FT's open file descriptors back to {fds_before}",
    )
    idle = time.monotonic()
    rss = rss_kib(ft.pid)

    lines = ft.stderr_lines[mark:]
    assert reported_subscribers(lines) == 0, last_lines(ft)
    connected = sum("client connected: " in line for line in lines)
    disconnected = sum("client disconnected: " in line for line in lines)
    assert connected == disconnected == STREAMS, (str(run), connected, disconnected)
    assert not any("(slow consumer)" in line for line in lines), "the client reads everything"
    logger.info(
        "%s: ready in %.1fs, 0 subscribers %.1fs later; RSS %d KiB at %d subscribers, %d KiB after",
        run,
        ready - started,
        idle - ready,
        peak,
        STREAMS,
        rss,
    )
    return rss


async def fresh_quotes(port: int) -> dict[str, list[Quote]]:
    """Subscribe to every symbol; return the quotes, once each symbol had an update."""
    received: dict[str, list[Quote]] = {}
    channel = Channel("127.0.0.1", port)
    try:
        with anyio.fail_after(DEADLINE):
            async with channel.request(
                "/QuoteService/StreamQuotes", Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote
            ) as stream:
                await stream.send_message(StreamQuotesRequest(), end=True)
                async for quote in stream:
                    received.setdefault(quote.symbol, []).append(quote)
                    if set(received) == SYMBOLS and all(len(q) > 1 for q in received.values()):
                        break
                # The stream never ends by itself; without this, leaving the block
                # would wait for its trailers.
                await stream.cancel()
    finally:
        channel.close()
    return received


# --- the test ----------------------------------------------------------------------


# 17-20 s on a quiet 2-core machine; every wait inside is bounded, so this timeout
# only catches what those bounds cannot.
@pytest.mark.timeout(180)
def test_ft_recovers_from_abruptly_dropped_streams(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    with fd_limit(STREAMS + 200), running_ft("--log-level", "INFO") as service:
        ft, port = service.process, service.port
        fds = open_fds(ft.pid)
        logger.info("FT started: RSS %d KiB, %d open file descriptors", rss_kib(ft.pid), fds)

        baseline = churn_round(ft, port, WARM_UP, fds)
        after = [churn_round(ft, port, run, fds) for run in MEASURED]

        figures = f"RSS baseline {baseline} KiB, after each round {after} KiB"
        logger.info(figures)
        assert after[-1] <= baseline * (1 + RSS_TOLERANCE), figures

        # Still healthy: a new client is the one subscriber, gets a snapshot and
        # then live updates.
        mark = len(ft.stderr_lines)
        quotes = anyio.run(fresh_quotes, port, backend="asyncio")
        ft.wait_for_line(r"client connected: .*; 1 subscribers$", DEADLINE, start=mark)
        assert set(quotes) == SYMBOLS
        for symbol, seen in quotes.items():
            assert seen[-1].sequence > seen[0].sequence, (symbol, seen)
        ft.wait_for_line(r"client disconnected: .*; 0 subscribers$", DEADLINE, start=mark)

        assert ft.terminate(DEADLINE) == 0, last_lines(ft)
        stopped = re.search(
            r"FT stopped \(0 slow consumers disconnected, (\d+) quotes conflated\)$",
            ft.stderr_lines[-1],
        )
        assert stopped, last_lines(ft)
        lines = ft.stdout_lines + ft.stderr_lines
        bad = [line for line in lines if "Traceback" in line or " ERROR " in line]
        assert not bad, "\n".join(bad[:20])
        logger.info(
            "FT logged %d lines, %d of them asyncio's 'socket.send() raised exception.'; "
            "%s quotes conflated",
            len(lines),
            sum("socket.send() raised exception." in line for line in lines),
            stopped[1],
        )
