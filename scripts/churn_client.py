"""Open many QuoteService streams to FT at once, then vanish without saying goodbye.

Used by ``tests/test_churn.py``; also runnable by hand against a live FT::

    python scripts/churn_client.py 127.0.0.1 50051 --streams 2000 --connections 200

The client opens ``--connections`` HTTP/2 connections (at most
``--connect-concurrency`` handshakes at a time), then ``--streams`` StreamQuotes
calls spread evenly over them. Once every stream has received its first message
(the snapshot) it prints ``ready N`` on stdout and then, by ``--mode``:

- ``kill``: keeps reading every stream until the process is killed (the caller
  sends SIGKILL: the kernel closes the sockets; no gRPC or HTTP/2 goodbye);
- ``reset``: sets ``SO_LINGER`` to zero on every connection and aborts it, so the
  kernel sends a TCP RST instead of a FIN, then prints ``reset C`` and exits 0.

Every stream keeps reading after its snapshot, so FT never sees a slow consumer:
the only way a stream ends is the abrupt one under test.

Exit status: 0 after a reset; 1, with one line on stderr, if the streams were not
all ready within ``--ready-timeout`` seconds or FT ended one of them; 2 for a bad
argument.
"""

from __future__ import annotations

import argparse
import math
import resource
import socket
import struct
import sys
from asyncio import Transport
from collections.abc import Sequence
from functools import partial

import anyio
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError

from quotopia._proto import StreamQuotesRequest
from quotopia.errors import first_leaf

__all__ = ["ChurnError", "main"]

METHOD = "/QuoteService/StreamQuotes"

#: The MAX_CONCURRENT_STREAMS a grpclib server announces (h2's default). Streams
#: past it on one connection would wait for a free slot forever.
MAX_STREAMS_PER_CONNECTION = 100

#: File descriptors the interpreter needs besides the connections.
SPARE_FDS = 64

#: SO_LINGER on, with a zero timeout: close() discards unsent data and sends RST.
LINGER_ZERO = struct.pack("ii", 1, 0)


class ChurnError(Exception):
    """The churn did not go as asked (one line, shown on stderr)."""


class Undecoded:
    """A reply type that skips protobuf decoding: this client only counts messages.

    Decoding tens of thousands of quotes a second in pure Python (betterproto2)
    would make the client, not FT, the bottleneck.
    """

    __slots__ = ()

    @classmethod
    def FromString(cls, data: bytes) -> Undecoded:
        return UNDECODED


UNDECODED = Undecoded()


class Countdown:
    """Done once ``count`` streams have received their snapshot.

    One event for all the streams, not one each: awaiting thousands of events in
    turn is a checkpoint each, and each checkpoint waits for a full turn of an
    event loop that is busy reading those streams; 2,000 of them took from a few
    seconds up to a minute.
    """

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = anyio.Event()
        if count <= 0:
            self.done.set()

    def arrived(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to at least ``needed``, up to the hard limit.

    Raises :class:`ChurnError` if the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ChurnError(f"need {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def connect(channel: Channel, limiter: anyio.CapacityLimiter) -> Transport:
    """Open ``channel``'s connection now, holding ``limiter``; return its transport.

    Thousands of simultaneous handshakes would overflow FT's accept queue: the
    kernel then drops them and TCP retries seconds later.
    """
    async with limiter:
        protocol = await channel.__connect__()
    # grpclib has no public handle on a connection's transport; the reset needs it.
    return protocol.connection._transport


def reset(transport: Transport) -> None:
    """Abort a connection with a TCP RST, without any HTTP/2 or gRPC goodbye.

    ``Channel.close()`` would end the connection politely: the opposite of the point.
    """
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    transport.abort()


async def open_stream(
    channel: Channel,
    request: StreamQuotesRequest,
    snapshots: Countdown,
    resetting: anyio.Event,
) -> None:
    """One StreamQuotes call: count its first quote in ``snapshots``, read the rest.

    Returns when the connection is lost after ``resetting`` was set. Raises
    :class:`ChurnError` if FT ends the stream or drops the connection itself.
    """
    async with channel.request(
        METHOD, Cardinality.UNARY_STREAM, StreamQuotesRequest, Undecoded
    ) as stream:
        await stream.send_message(request, end=True)
        if await stream.recv_message() is None:
            raise ChurnError("FT ended a stream before its snapshot")
        snapshots.arrived()
        try:
            async for _ in stream:
                pass
        except StreamTerminatedError:
            if resetting.is_set():
                return
            raise ChurnError("FT dropped a connection") from None
    raise ChurnError("FT ended a stream")


async def churn(
    host: str,
    port: int,
    streams: int,
    connections: int,
    *,
    mode: str,
    symbols: Sequence[str],
    connect_concurrency: int,
    ready_timeout: float,
) -> None:
    """Connect, open the streams, report ``ready``, then wait to be killed or reset all."""
    channels = [Channel(host, port) for _ in range(connections)]
    transports: list[Transport] = []
    request = StreamQuotesRequest(symbols=list(symbols))
    snapshots = Countdown(streams)
    resetting = anyio.Event()
    limiter = anyio.CapacityLimiter(connect_concurrency)

    async def connect_one(channel: Channel) -> None:
        transports.append(await connect(channel, limiter))

    try:
        async with anyio.create_task_group() as tg:
            try:
                with anyio.fail_after(ready_timeout):
                    async with anyio.create_task_group() as connecting:
                        for channel in channels:
                            connecting.start_soon(connect_one, channel)
                    for index in range(streams):
                        channel = channels[index % connections]
                        tg.start_soon(open_stream, channel, request, snapshots, resetting)
                    await snapshots.done.wait()
            except TimeoutError:
                raise ChurnError(
                    f"{len(transports)} of {connections} connections open and "
                    f"{streams - snapshots.remaining} of {streams} snapshots received "
                    f"after {ready_timeout:g}s"
                ) from None
            print(f"ready {streams}", flush=True)
            if mode == "kill":
                await anyio.sleep_forever()
            resetting.set()
            for transport in transports:
                reset(transport)
            # Every stream task now sees its connection lost, and returns.
        print(f"reset {connections}", flush=True)
    finally:
        for channel in channels:
            channel.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="churn_client.py",
        description="Open many StreamQuotes streams to FT, then disappear abruptly.",
    )
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--streams", type=int, default=2000, help="streams to open (2000)")
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        help="HTTP/2 connections to spread them over (default: one per stream)",
    )
    parser.add_argument(
        "--mode",
        choices=("kill", "reset"),
        default="kill",
        help="kill: wait to be killed (default); reset: abort every connection and exit",
    )
    parser.add_argument(
        "--symbols", default="", help="comma-separated symbols to ask for (default: all)"
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=50,
        help="connection handshakes in flight at any one time (50)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds for every stream to get its snapshot (60)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    streams: int = args.streams
    connections: int = streams if args.connections is None else args.connections
    if streams < 1 or not 1 <= connections <= streams:
        parser.error("need --streams >= 1 and 1 <= --connections <= --streams")
    if args.connect_concurrency < 1:
        parser.error("need --connect-concurrency >= 1")
    per_connection = math.ceil(streams / connections)
    if per_connection > MAX_STREAMS_PER_CONNECTION:
        parser.error(
            f"{per_connection} streams per connection, but FT allows "
            f"{MAX_STREAMS_PER_CONNECTION}: use more --connections"
        )
    run = partial(
        churn,
        args.host,
        args.port,
        streams,
        connections,
        mode=args.mode,
        symbols=[s for s in args.symbols.split(",") if s],
        connect_concurrency=args.connect_concurrency,
        ready_timeout=args.ready_timeout,
    )
    failure: BaseException | None = None
    try:
        raise_fd_limit(connections + SPARE_FDS)
        anyio.run(run, backend="asyncio")
    except* (ChurnError, OSError, GRPCError, StreamTerminatedError) as group:
        failure = first_leaf(group)
    if failure is not None:
        print(f"churn_client.py: error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
