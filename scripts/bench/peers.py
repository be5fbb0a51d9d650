"""The baselines the bench measures Quotopia against, and Core with a probe.

Each is a command of ``python -m scripts.bench.peers``, started by the bench:

``asgi``
    A raw ASGI app returning fixed bytes (captured from Core in the same run) on
    hypercorn's Trio worker, configured like Core's: the ceiling of Core's server.
``fastapi``
    What a user might write instead of Core's REST API: FastAPI on uvicorn
    (uvloop, httptools), answering ``GET /quotes`` and ``GET /quotes/{symbol}``
    with the bytes Core returned (captured in the same run), as a
    ``Response`` so no JSON encoding is timed that Core does not do either.
``ft``
    FT's contract (``QuoteService/StreamQuotes``) on a grpcio.aio server, with
    protoc-generated classes, Quotopia's own market walk and Quotopia's own
    :class:`~quotopia.ft.broadcast.Broadcaster` (one bounded queue per subscriber,
    the same slow-consumer policy). Only the gRPC stack differs from FT.
``core-instrumented``
    Core's own ``serve()``, recording the wall-clock time at which each quote
    reaches its store (for the freshness part): the one probe the bench adds.
``sse``
    What a user might write instead of Core's event stream: FastAPI with
    sse-starlette on uvicorn (uvloop, httptools), fed by FT over grpcio.aio, and
    streaming each quote as Core does (rendered once, to every client, through a
    bounded queue per client that drops its oldest when full).

Each logs a "listening" line with its real port, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

from quotopia.telemetry.endpoint import serve_lifespan

__all__ = ["main", "raw_app"]

logger = logging.getLogger("bench.peers")

ASGIScope = dict[str, Any]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]


# --- asgi: the raw ASGI ceiling -------------------------------------------------------


def raw_app(bodies: dict[str, bytes]) -> ASGIApp:
    """An ASGI app answering each path in ``bodies`` with those bytes as JSON."""
    not_found = b'{"error": "not found"}'

    async def app(scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)  # type: ignore[arg-type]
            return
        found = bodies.get(scope["path"])
        body = not_found if found is None else found
        await send(
            {
                "type": "http.response.start",
                "status": 404 if found is None else 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def _hypercorn_config(bind: str) -> Any:
    """hypercorn's settings as Core sets them (quotopia.core.server)."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    return config


def _serve_asgi(args: argparse.Namespace) -> None:
    import trio
    from hypercorn.trio import serve

    from quotopia.shutdown import shutdown_on_signals

    raw = json.loads(Path(args.bodies).read_text())
    app = raw_app({path: body.encode() for path, body in raw.items()})
    config = _hypercorn_config(f"{args.host}:{args.port}")

    async def main() -> None:
        async with shutdown_on_signals(logger) as trigger, trio.open_nursery() as nursery:
            asgi = cast(Any, app)  # hypercorn's ASGI types are stricter than this app needs
            binds = await nursery.start(partial(serve, asgi, config, shutdown_trigger=trigger))
            port = int(binds[0].rsplit(":", 1)[1])
            logger.warning("raw ASGI listening on http://%s:%d", args.host, port)

    trio.run(main)


# --- ft: the grpcio.aio peer ----------------------------------------------------------


def _serve_ft(args: argparse.Namespace) -> None:
    import anyio

    anyio.run(_ft_main, args, backend="asyncio")


async def _ft_main(args: argparse.Namespace) -> None:
    import anyio
    import grpc

    from quotopia.ft.broadcast import Broadcaster, BroadcasterClosed
    from quotopia.market import Market, Quote, parse_symbols

    from .protos import load

    quotes_pb2, quotes_pb2_grpc = load(Path(args.proto_dir))

    market = Market(parse_symbols(args.symbols), None)
    broadcaster: Broadcaster[Any] = Broadcaster(args.subscriber_buffer, args.slow_consumer_timeout)
    canonical = {s.upper(): s for s in market.symbols}

    def to_pb(quotes: Iterable[Quote]) -> tuple[Any, ...]:
        out = []
        for q in quotes:
            message = quotes_pb2.Quote(
                symbol=q.symbol, price=q.price, change_percent=q.change_percent, sequence=q.sequence
            )
            message.time.FromDatetime(q.time)
            out.append(message)
        return tuple(out)

    class Servicer:
        async def StreamQuotes(self, request: Any, context: Any) -> None:
            wanted = set()
            for name in request.symbols:
                symbol = canonical.get(name.upper())
                if symbol is None:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"unknown symbol {name[:64]!r}"
                    )
                wanted.add(symbol)
            wanted = wanted or set(canonical.values())
            try:
                sub = broadcaster.subscribe()
            except BroadcasterClosed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            with sub, sub.cancel_scope:
                for quote in sub.snapshot:
                    if quote.symbol in wanted:
                        await context.write(quote)
                async for batch in sub.updates:
                    for quote in batch:
                        if quote.symbol in wanted:
                            await context.write(quote)
            if sub.slow:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow consumer")

    async def generate() -> None:
        # FT's schedule (quotopia.ft.server._generate): fixed, no drift, no catch-up burst.
        broadcaster.publish(to_pb(market.open(datetime.now(UTC))))
        interval = args.tick_interval
        next_tick = anyio.current_time() + interval
        while True:
            await anyio.sleep_until(next_tick)
            broadcaster.publish(to_pb(market.step(datetime.now(UTC))))
            next_tick += interval
            now = anyio.current_time()
            if next_tick < now - interval:
                next_tick = now + interval

    server = grpc.aio.server()
    quotes_pb2_grpc.add_QuoteServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(generate)
            logger.warning("peer FT listening on %s:%d (grpcio.aio)", args.host, port)
            async for _ in signals:
                break
            broadcaster.close()
            with anyio.move_on_after(2):
                await broadcaster.wait_empty()
            await server.stop(grace=1)
            tg.cancel_scope.cancel()


# --- core-instrumented: Core, recording when each quote reaches its store -------------


def _serve_core_instrumented(args: argparse.Namespace) -> None:
    """Core's own serve(), with one probe: the wall-clock time of each ``store.apply``.

    The probe costs a clock read and a list append per quote. At exit, the record
    (``[symbol, sequence, time]`` per quote) is written to ``args.record`` as JSON.
    """
    import time

    from quotopia.core.store import QuoteStore

    arrivals: list[tuple[str, int, float]] = []
    apply = QuoteStore.apply

    def recorded(self: QuoteStore, *args_: Any, **kwargs: Any) -> None:
        apply(self, *args_, **kwargs)
        now = time.time()
        stored = self.get(str(kwargs.get("symbol", args_[0] if args_ else "")))
        if stored is not None:
            arrivals.append((stored.symbol, stored.sequence, now))

    QuoteStore.apply = recorded  # type: ignore[method-assign]
    try:
        _run_core(
            args.ft_addr, port=args.port, host=args.host, source=args.source, kafka=args.kafka
        )
    finally:
        Path(args.record).write_text(json.dumps(arrivals))


def _run_core(
    ft_addr: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    source: str = "grpc",
    kafka: str | None = None,
) -> None:
    import trio

    from quotopia.core import server
    from quotopia.core.config import CoreConfig
    from quotopia.shutdown import shutdown_on_signals

    config = CoreConfig(host=host, port=port, ft_addr=ft_addr, source=source, kafka=kafka)

    async def main() -> None:
        async with shutdown_on_signals(logger) as trigger:
            await server.serve(config, shutdown_trigger=trigger)

    trio.run(main)


# --- the command line -----------------------------------------------------------------


def _serve_on_uvicorn(app: Any, args: argparse.Namespace, name: str) -> None:
    """Serve ``app`` on uvicorn (uvloop, httptools) at ``--host``/``--port`` until
    SIGTERM; log "{name} listening on http://HOST:PORT" with the real port."""
    import socket

    import uvicorn

    sock = socket.create_server((args.host, args.port), backlog=4096)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, loop="uvloop", http="httptools"
    )
    logger.warning("%s listening on http://%s:%d", name, args.host, port)
    uvicorn.Server(config).run(sockets=[sock])


# --- fastapi: the REST API as a user might write it -----------------------------------


def _serve_fastapi(args: argparse.Namespace) -> None:

    from fastapi import FastAPI, Response

    bodies = {
        path: body.encode() for path, body in json.loads(Path(args.bodies).read_text()).items()
    }
    every = bodies["/quotes"]
    app = FastAPI()

    @app.get("/quotes")
    async def quotes() -> Response:
        return Response(every, media_type="application/json")

    @app.get("/quotes/{symbol}")
    async def quote(symbol: str) -> Response:
        body = bodies.get(f"/quotes/{symbol.upper()}")
        if body is None:
            return Response(
                b'{"error": "not found"}', status_code=404, media_type="application/json"
            )
        return Response(body, media_type="application/json")

    _serve_on_uvicorn(app, args, "peer FastAPI")


# --- sse: FastAPI + sse-starlette on uvicorn ------------------------------------------


def _serve_sse(args: argparse.Namespace) -> None:
    import asyncio
    import contextlib
    from collections.abc import AsyncIterator

    import grpc
    from fastapi import FastAPI
    from sse_starlette import EventSourceResponse, ServerSentEvent

    from .protos import load

    quotes_pb2, _ = load(Path(args.proto_dir))
    clients: set[asyncio.Queue[bytes]] = set()

    async def consume() -> None:
        """FT's stream, forever: every quote rendered once, queued to every client."""
        numbered = 0
        while True:
            try:
                async with grpc.aio.insecure_channel(args.ft_addr) as channel:
                    call = channel.unary_stream(
                        "/QuoteService/StreamQuotes",
                        request_serializer=quotes_pb2.StreamQuotesRequest.SerializeToString,
                        response_deserializer=quotes_pb2.Quote.FromString,
                    )(quotes_pb2.StreamQuotesRequest())
                    async for quote in call:
                        numbered += 1
                        data = json.dumps(
                            {
                                "symbol": quote.symbol,
                                "price": quote.price,
                                "time": quote.time.ToDatetime(UTC)
                                .isoformat(timespec="milliseconds")
                                .replace("+00:00", "Z"),
                                "change_percent": round(quote.change_percent, 4),
                                "sequence": quote.sequence,
                            }
                        )
                        # Rendered once for every client, as Core does; "\n" line ends,
                        # as Core's (sse-starlette's default is "\r\n").
                        event = ServerSentEvent(data, event="quote", id=str(numbered), sep="\n")
                        frame = event.encode()
                        for queue in clients:
                            if queue.full():
                                queue.get_nowait()  # the oldest goes
                            queue.put_nowait(frame)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(consume())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(lifespan=lifespan)

    @app.get("/quotes/stream")
    async def stream() -> EventSourceResponse:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        clients.add(queue)

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield await queue.get()
            finally:
                clients.discard(queue)

        return EventSourceResponse(events(), ping=15, sep="\n")

    _serve_on_uvicorn(app, args, "peer SSE")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The bench's peers (started by the bench)")
    commands = parser.add_subparsers(dest="command", required=True)

    asgi = commands.add_parser("asgi", help="raw ASGI app on hypercorn's Trio worker")
    asgi.add_argument("--bodies", required=True, help="JSON file: {path: body}")

    rest = commands.add_parser("fastapi", help="FastAPI on uvicorn, returning Core's bytes")
    rest.add_argument("--bodies", required=True, help="JSON file: {path: body}")

    ft = commands.add_parser("ft", help="grpcio.aio peer of FT")
    ft.add_argument("--proto-dir", required=True, help="grpc_tools output (quotes_pb2)")
    ft.add_argument("--tick-interval", type=float, default=1.0)
    ft.add_argument("--symbols", default="SBER=275.50,BTC=95400.00,ETH=2650.20")
    ft.add_argument("--subscriber-buffer", type=int, default=16)
    ft.add_argument("--slow-consumer-timeout", type=float, default=10.0)

    probed = commands.add_parser("core-instrumented", help="Core, timing each quote's arrival")
    probed.add_argument("--ft-addr", required=True)
    probed.add_argument("--record", required=True, help="JSON file written at exit")
    probed.add_argument("--source", choices=("grpc", "kafka"), default="grpc")
    probed.add_argument("--kafka", help="bootstrap servers, with --source kafka")

    sse = commands.add_parser("sse", help="FastAPI + sse-starlette on uvicorn, fed by FT")
    sse.add_argument("--ft-addr", required=True)
    sse.add_argument("--proto-dir", required=True, help="grpc_tools output (quotes_pb2)")

    for command in (asgi, rest, ft, probed, sse):
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=0)
        command.add_argument("--log-level", default="WARNING")

    args = parser.parse_args(argv)
    from quotopia import logs

    logs.configure(args.log_level)
    if args.command == "asgi":
        _serve_asgi(args)
    elif args.command == "fastapi":
        _serve_fastapi(args)
    elif args.command == "ft":
        _serve_ft(args)
    elif args.command == "sse":
        _serve_sse(args)
    else:
        _serve_core_instrumented(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
