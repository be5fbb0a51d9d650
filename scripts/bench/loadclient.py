"""The subscriber load: processes that each hold many StreamQuotes streams (at FT)
or push connections (at Core: ``--client sse`` or ``ws``, see :mod:`.pushwire`).

One load process (``python -m scripts.bench.loadclient``, started by the bench,
never by hand) opens its share of the streams, spread over connections of
``--per-connection`` streams each, and for every quote whose generation time
(``Quote.time``) falls in the measurement window records:

- the latency from generation to receipt, in a :class:`~.latency.Histogram`;
- gaps in the per-stream, per-symbol ``sequence`` (a missed or conflated tick);
- how many quotes of each tick arrived (across its streams), so the bench can
  tell which ticks reached every subscriber.

It reports its own CPU time over the window (``getrusage``), so the bench can
show whether the load itself was the bottleneck. Its gRPC client is either
grpcio's grpc.aio (``--client grpcio``: C-core, what users run, and the bench's
default) or the lean reader in :mod:`.wire` (``--client wire``: about 2.5 times
less CPU per message for the load, and cheaper for FT too, since it sends no
window updates or pings as data arrives); both see the same quotes.

The conversation with the bench, one line each way:

- load → bench: ``READY {json}`` once every stream got its first quote or failed;
- bench → load: ``WINDOW <t0> <t1> <stop>`` (epoch seconds; t0 may be in the future);
- load → bench: ``RESULT {json}`` at ``stop``; then it exits.

:class:`Subscribers` is the bench's side: it starts the processes, splits the
streams between them and merges their reports into one :class:`FanoutSample`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from . import protos, pushwire, wire
from .latency import Histogram
from .procs import BenchError

__all__ = ["CLIENTS", "PUSH_CLIENTS", "FanoutSample", "Subscribers", "merge"]

#: The load's gRPC clients: the lean one (:mod:`.wire`) and grpcio's grpc.aio.
CLIENTS = ("wire", "grpcio")
#: Its push clients, for Core (and its peer): Server-Sent Events and WebSocket.
PUSH_CLIENTS = ("sse", "ws")

ROOT = Path(__file__).resolve().parents[2]


# --- the load process -----------------------------------------------------------------

PATH = "/QuoteService/StreamQuotes"


class _Subscriber:
    """One stream: the last sequence per symbol it saw, and whether it started."""

    __slots__ = ("gaps", "last", "load", "started")

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.last: dict[str, int] = {}
        self.gaps = 0
        self.started = False

    # wire.StreamHandler
    def on_message(self, message: bytes) -> None:
        now = time.time()
        self.load.record_quote(self, self.load.parse(message), now)

    def on_end(self, status: str) -> None:
        self.load.end(self, status)


class _Load:
    """One load process's streams, and what they saw in the measurement window."""

    def __init__(self, args: argparse.Namespace, pb: Any) -> None:
        self.target = args.target
        self.streams = args.streams
        self.stall: bool = getattr(args, "stall", False)
        self.per_connection = args.per_connection
        self.connections = math.ceil(self.streams / self.per_connection)
        self.request = pb.StreamQuotesRequest()
        self.parse = pb.Quote.FromString
        self.window = (math.inf, math.inf)
        self.ready = asyncio.Event()
        self.started = 0
        self.failed = 0
        self.received = 0
        self.gaps = 0
        self.disorder = 0
        self.streams_with_gaps = 0
        self.errors: dict[str, int] = {}
        self.ended = 0
        #: Streams that started, then ended or failed.
        self.lost = 0
        self.ticks: dict[int, int] = {}
        self.latency = Histogram()
        self._add_latency = self.latency.add

    def record_quote(self, sub: _Subscriber, quote: Any, now: float) -> None:
        """Account for one protobuf ``Quote`` received at ``now`` (epoch seconds)."""
        stamp = quote.time
        self.record(sub, quote.symbol, quote.sequence, stamp.seconds + stamp.nanos * 1e-9, now)

    def start(self, sub: _Subscriber) -> None:
        """``sub`` is subscribed (it got its first quote, or a push snapshot)."""
        if not sub.started:
            sub.started = True
            self.started += 1
            self._check_ready()

    def record(
        self, sub: _Subscriber, symbol: str, sequence: int, generated: float, now: float
    ) -> None:
        """Account for one quote, generated at ``generated`` and received at ``now``
        (epoch seconds)."""
        if not sub.started:
            self.start(sub)
        last = sub.last
        previous = last.get(symbol)
        last[symbol] = sequence
        t0, t1 = self.window
        if not t0 <= generated < t1:
            return
        self.received += 1
        self._add_latency(now - generated)
        ticks = self.ticks
        ticks[sequence] = ticks.get(sequence, 0) + 1
        if previous is not None:
            if sequence > previous + 1:
                if not sub.gaps:
                    self.streams_with_gaps += 1
                sub.gaps += sequence - previous - 1
                self.gaps += sequence - previous - 1
            elif sequence <= previous:
                self.disorder += 1

    def end(self, sub: _Subscriber, status: str) -> None:
        """A stream ended (``"OK"`` is an end too: nothing should end during the bench)."""
        if status == "OK":
            self.ended += 1
        else:
            self.errors[status] = self.errors.get(status, 0) + 1
        if sub.started:
            self.lost += 1
        else:
            self.failed += 1
            self._check_ready()

    def _check_ready(self) -> None:
        if self.started + self.failed >= self.streams:
            self.ready.set()

    # -- grpcio --------------------------------------------------------------------

    async def run_grpcio(self) -> None:
        import grpc

        channels = [
            grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(self.connections)
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                for index in range(self.streams):
                    channel = channels[index // self.per_connection]
                    tg.create_task(self._grpcio_stream(channel, _Subscriber(self)))
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    for channel in channels:
                        await channel.close(grace=None)

    async def _grpcio_stream(self, channel: Any, sub: _Subscriber) -> None:
        import grpc

        call = channel.unary_stream(
            PATH,
            request_serializer=type(self.request).SerializeToString,
            response_deserializer=self.parse,
        )(self.request)
        eof = grpc.aio.EOF
        try:
            while True:
                quote = await call.read()
                now = time.time()
                if quote is eof:
                    self.end(sub, "OK")
                    return
                self.record_quote(sub, quote, now)
        except grpc.aio.AioRpcError as exc:
            self.end(sub, exc.code().name)

    # -- wire (scripts.bench.wire) ---------------------------------------------------

    async def run_wire(self) -> None:
        host, _, port = self.target.rpartition(":")
        request = self.request.SerializeToString()
        connections: list[wire.Connection] = []
        try:
            left = self.streams
            for _ in range(self.connections):
                count = min(left, self.per_connection)
                left -= count
                subs = [_Subscriber(self) for _ in range(count)]
                try:
                    connection = await wire.Connection.open(host, int(port), PATH)
                except OSError as exc:
                    for sub in subs:
                        self.end(sub, f"connect: {exc.strerror or exc}")
                    continue
                connections.append(connection)
                for sub in subs:
                    connection.call(request, sub)
            await asyncio.Event().wait()
        finally:
            for connection in connections:
                connection.close()

    # -- push: SSE and WebSocket (scripts.bench.pushwire) -----------------------------

    async def run_push(self, kind: str) -> None:
        host, _, port = self.target.rpartition(":")
        loop = asyncio.get_running_loop()
        transports: list[asyncio.Transport] = []
        reader = pushwire.SseReader if kind == "sse" else pushwire.WebSocketReader
        stall = self.stall
        try:
            for _ in range(self.streams):
                sub = _Subscriber(self)
                try:
                    opened, _ = await loop.create_connection(
                        functools.partial(reader, sub, self, stall=stall),
                        sock=await _connected(host, int(port), small_window=stall),
                    )
                except OSError as exc:
                    self.end(sub, f"connect: {exc.strerror or exc}")
                    continue
                transports.append(opened)
            await asyncio.Event().wait()
        finally:
            for transport in transports:
                transport.close()


async def _connected(host: str, port: int, *, small_window: bool) -> socket.socket:
    """A connected, non-blocking socket; with a 4 KiB receive buffer if asked (set
    before connecting, so the window it offers stays small: a client that stops
    reading then fills its server's socket within moments)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if small_window:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _run(args: argparse.Namespace) -> None:
    quotes_pb2, _ = protos.load(Path(args.proto_dir))
    load = _Load(args, quotes_pb2)
    begun = time.perf_counter()
    if args.client in PUSH_CLIENTS:
        running = load.run_push(args.client)
    else:
        running = load.run_wire() if args.client == "wire" else load.run_grpcio()
    streams = asyncio.create_task(running)
    # The bench may send the window before every stream started (a feed too busy to
    # accept them all in time): then the streams that did start are measured.
    window = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))
    ready = asyncio.create_task(load.ready.wait())
    try:
        await asyncio.wait((window, ready), return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            _say(
                "READY",
                {
                    "streams": load.started,
                    "failed": load.failed,
                    "errors": load.errors,
                    "seconds": time.perf_counter() - begun,
                },
            )
        line = await window
        word, t0, t1, stop = line.split()
        assert word == "WINDOW", line
        load.window = (float(t0), float(t1))
        await asyncio.sleep(max(0.0, float(t0) - time.time()))
        cpu0 = _cpu()
        await asyncio.sleep(max(0.0, float(t1) - time.time()))
        cpu1 = _cpu()
        await asyncio.sleep(max(0.0, float(stop) - time.time()))
        _say(
            "RESULT",
            {
                "streams": load.streams,
                "connections": load.connections,
                "connected": load.started - load.lost,
                "received": load.received,
                "gaps": load.gaps,
                "streams_with_gaps": load.streams_with_gaps,
                "disorder": load.disorder,
                "errors": load.errors,
                "ended": load.ended,
                "ticks": {str(k): v for k, v in load.ticks.items()},
                "latency": load.latency.to_json(),
                "cpu_window_s": cpu1 - cpu0,
                "cpu_total_s": _cpu(),
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            },
        )
    finally:
        ready.cancel()
        streams.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streams


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(word: str, body: dict[str, object]) -> None:
    sys.stdout.write(f"{word} {json.dumps(body, separators=(',', ':'))}\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="StreamQuotes subscriber load (for the bench)")
    parser.add_argument("--target", required=True, help="HOST:PORT of the feed")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--client", choices=CLIENTS + PUSH_CLIENTS, default="wire")
    parser.add_argument("--proto-dir", required=True, help="grpc_tools output (quotes_pb2)")
    parser.add_argument(
        "--stall", action="store_true", help="push clients stop reading once subscribed"
    )
    asyncio.run(_run(parser.parse_args(argv)))


# --- the bench's side -----------------------------------------------------------------


@dataclass
class FanoutSample:
    """What N subscribers saw over one measurement window, merged over processes."""

    subscribers: int
    symbols: int
    connected: int
    connections: int
    window_s: float
    #: Ticks generated in the window (seen by at least one subscriber).
    ticks: int
    #: Ticks of which every subscriber received every quote in time.
    ticks_to_all: int
    received: int
    gaps: int
    streams_with_gaps: int
    disorder: int
    errors: dict[str, int]
    ended: int
    latency: Histogram = field(repr=False)
    client_cpu_s: float
    #: The busiest load process's CPU time: near the window's length, it was the limit.
    client_busiest_cpu_s: float
    client_processes: int
    client_maxrss_kib: int

    @property
    def fraction_to_all(self) -> float:
        return self.ticks_to_all / self.ticks if self.ticks else 0.0

    @property
    def deliveries(self) -> float:
        """Share of (tick, subscriber, symbol) deliveries that happened, of the ticks made."""
        expected = self.ticks * self.subscribers * self.symbols
        return self.received / expected if expected else 0.0

    @property
    def delivered_per_s(self) -> float:
        return self.received / self.window_s

    @property
    def every_tick_everywhere(self) -> bool:
        """No subscriber missed anything, none failed, and ticks were generated."""
        return (
            self.ticks > 0
            and self.ticks_to_all == self.ticks
            and self.gaps == 0
            and not self.errors
            and self.ended == 0
            and self.connected == self.subscribers
        )

    def to_json(self) -> dict[str, object]:
        return {
            "subscribers": self.subscribers,
            "connected": self.connected,
            "connections": self.connections,
            "window_s": self.window_s,
            "ticks": self.ticks,
            "ticks_to_all": self.ticks_to_all,
            "fraction_to_all": self.fraction_to_all,
            "deliveries": self.deliveries,
            "received": self.received,
            "delivered_per_s": self.delivered_per_s,
            "gaps": self.gaps,
            "streams_with_gaps": self.streams_with_gaps,
            "disorder": self.disorder,
            "errors": self.errors,
            "ended_early": self.ended,
            "latency_p50_s": self.latency.quantile(0.5),
            "latency_p99_s": self.latency.quantile(0.99),
            "latency_max_s": self.latency.max(),
            "client_cpu_s": self.client_cpu_s,
            "client_cpu_pct": 100 * self.client_cpu_s / self.window_s,
            "client_busiest_process_cpu_pct": 100 * self.client_busiest_cpu_s / self.window_s,
            "client_processes": self.client_processes,
            "client_maxrss_kib": self.client_maxrss_kib,
        }


def merge(
    reports: Sequence[dict[str, Any]], subscribers: int, symbols: int, window_s: float
) -> FanoutSample:
    """Merge the load processes' reports into one sample.

    A tick reached every subscriber when its quote count, summed over processes,
    is ``subscribers * symbols`` (each stream gets each quote at most once).
    """
    ticks: dict[int, int] = {}
    latency = Histogram()
    errors: dict[str, int] = {}
    for report in reports:
        for key, count in report["ticks"].items():
            ticks[int(key)] = ticks.get(int(key), 0) + count
        latency.merge(Histogram.from_json(report["latency"]))
        for name, count in report["errors"].items():
            errors[name] = errors.get(name, 0) + count
    expected = subscribers * symbols
    return FanoutSample(
        subscribers=subscribers,
        symbols=symbols,
        connected=sum(r["connected"] for r in reports),
        connections=sum(r["connections"] for r in reports),
        window_s=window_s,
        ticks=len(ticks),
        ticks_to_all=sum(1 for count in ticks.values() if count >= expected),
        received=sum(r["received"] for r in reports),
        gaps=sum(r["gaps"] for r in reports),
        streams_with_gaps=sum(r["streams_with_gaps"] for r in reports),
        disorder=sum(r["disorder"] for r in reports),
        errors=errors,
        ended=sum(r["ended"] for r in reports),
        latency=latency,
        client_cpu_s=sum(r["cpu_window_s"] for r in reports),
        client_busiest_cpu_s=max((r["cpu_window_s"] for r in reports), default=0.0),
        client_processes=len(reports),
        client_maxrss_kib=sum(r["maxrss_kib"] for r in reports),
    )


class LoadError(BenchError):
    """A load process failed, or did not answer in time."""


class _LoadProcess:
    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line.rstrip("\n"))

    def expect(self, word: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LoadError(f"load process gave no {word} in time") from None
            if line is None:
                tail = "\n".join(self.stderr[-15:])
                raise LoadError(f"load process exited before {word}:\n{tail}")
            head, _, body = line.partition(" ")
            if head == word:
                parsed: dict[str, Any] = json.loads(body)
                return parsed

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class Subscribers:
    """``total`` StreamQuotes subscribers, split over ``processes`` load processes.

    Resource handling: leaving the ``with`` block kills and reaps every load process.
    """

    def __init__(
        self,
        target: str,
        total: int,
        *,
        processes: int,
        per_connection: int,
        client: str,
        proto_dir: Path,
        stall: bool = False,
    ) -> None:
        processes = max(1, min(processes, total))
        shares = [total // processes + (i < total % processes) for i in range(processes)]
        self.total = total
        self._procs = [
            _LoadProcess(
                [
                    sys.executable,
                    "-m",
                    "scripts.bench.loadclient",
                    f"--target={target}",
                    f"--streams={share}",
                    f"--per-connection={per_connection}",
                    f"--client={client}",
                    f"--proto-dir={proto_dir}",
                    *(["--stall"] if stall else []),
                ]
            )
            for share in shares
        ]
        self.pids = [p.popen.pid for p in self._procs]
        self._window = (0.0, 0.0, 0.0)

    def __enter__(self) -> Subscribers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self._procs:
            proc.close()

    def wait_ready(self, timeout: float) -> tuple[float, str | None]:
        """Wait until every stream got its first quote (or failed to start).

        Returns how long that took, and what went wrong if some streams failed or
        ``timeout`` passed first (then the streams that did start can be measured).
        """
        begun = time.monotonic()
        deadline = begun + timeout
        failed = 0
        errors: dict[str, int] = {}
        for proc in self._procs:
            try:
                ready = proc.expect("READY", deadline)
            except LoadError:
                if proc.popen.poll() is not None:
                    raise
                return time.monotonic() - begun, f"not every stream started within {timeout:g}s"
            failed += ready["failed"]
            for name, count in ready["errors"].items():
                errors[name] = errors.get(name, 0) + count
        problem = f"{failed} streams failed to start: {errors}" if failed else None
        return time.monotonic() - begun, problem

    def begin(self, t0: float, t1: float, grace: float) -> None:
        """Record quotes generated in [t0, t1) (epoch seconds) and received by t1 + grace.

        Call it before t0; then :meth:`collect` the result.
        """
        self._window = (t0, t1, t1 + grace)
        for proc in self._procs:
            proc.send(f"WINDOW {t0!r} {t1!r} {t1 + grace!r}")

    def collect(self, symbols: int) -> FanoutSample:
        """Wait for the window (and its grace) to end; merge what the processes saw."""
        t0, t1, stop = self._window
        deadline = time.monotonic() + (stop - time.time()) + 60
        reports = [proc.expect("RESULT", deadline) for proc in self._procs]
        return merge(reports, self.total, symbols, t1 - t0)


if __name__ == "__main__":
    main()
