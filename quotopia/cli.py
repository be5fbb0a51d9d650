"""The ``quotopia`` command: ``quotopia ft``, ``quotopia core`` and ``quotopia up``.

Every setting is a flag with an environment variable as its default, read here
and nowhere else. A bad setting ends the program with a one-line message and exit
status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import NoReturn, TypeVar

import anyio

from quotopia import __version__, logs
from quotopia.bus.topic import (
    BOOTSTRAP_ENV,
    DEFAULT_PARTITIONS,
    DEFAULT_TOPIC,
    SOURCES,
    TOPIC_ENV,
    check_topic,
    parse_bootstrap,
)
from quotopia.errors import StartupError, first_leaf
from quotopia.history import DB_ENV, default_database_url
from quotopia.market import DEFAULT_SYMBOLS, parse_symbols
from quotopia.recorder.config import DEFAULT_GROUP, parse_duration
from quotopia.shutdown import shutdown_on_signals

__all__ = ["build_parser", "main"]

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not a usage dump: config errors should be easy to read in logs.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(convert: Callable[[str], T], what: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad {what}: {exc}") from None

    parse.__name__ = what  # argparse names the type in its message
    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not in 0..65535")
    return port


PORT = _typed(_port, "port")
SECONDS = _typed(float, "seconds")
INTEGER = _typed(int, "integer")
COUNT = _typed(int, "count")
ALL_INTERFACES = "0.0.0.0"  # in a container, the service must be reachable from outside


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: str | None,
    help: str,
    type: Callable[[str], object] = str,
    *,
    unset: str = "random",
) -> None:
    """Add ``flag``, defaulting to ``$env`` and then to ``default``; say so in --help
    (a ``None`` default reads as ``unset``)."""
    shown = unset if default is None else default
    parser.add_argument(
        flag,
        type=type,
        default=os.environ.get(env, default),
        help=f"{help} (env {env}; default: {shown})",
    )


def _add_logging(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--log-level", "LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR", _log_level)
    _option(
        parser,
        "--log-format",
        "LOG_FORMAT",
        "text",
        "text (one readable line per event) or json (one JSON object per line)",
        _log_format,
    )


def _add_database(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "--db",
        DB_ENV,
        default_database_url(),
        "the history database: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/NAME",
    )


def _add_kafka(parser: argparse.ArgumentParser, role: str) -> None:
    """``--kafka`` and ``--kafka-topic``, read from the same variables by every service."""
    _option(
        parser,
        "--kafka",
        BOOTSTRAP_ENV,
        None,
        f"Kafka bootstrap servers, HOST:PORT[,HOST:PORT...], {role}",
        _typed(parse_bootstrap, "bootstrap servers"),
        unset="none",
    )
    _option(
        parser,
        "--kafka-topic",
        TOPIC_ENV,
        DEFAULT_TOPIC,
        "the Kafka topic of the quotes",
        _typed(check_topic, "topic"),
    )


def _source(text: str) -> str:
    source = text.lower()
    if source not in SOURCES:
        raise argparse.ArgumentTypeError(f"source must be one of {', '.join(SOURCES)}")
    return source


def _log_format(text: str) -> str:
    fmt = text.lower()
    if fmt not in logs.LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"log format must be one of {', '.join(logs.LOG_FORMATS)}")
    return fmt


def _env_flag(env: str, *, default: bool = False) -> bool:
    """An on/off environment variable (unset: ``default``); a bad value is a
    ValueError (exit status 2)."""
    word = os.environ.get(env, "").strip().lower()
    if not word:
        return default
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{env} must be true or false, got {word!r}")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quotopia",
        description="Quotopia: a gRPC price feed (ft), an HTTP quote service (core), "
        "the recorder that stores every quote (recorder) and its history database (db).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    ft = commands.add_parser(
        "ft",
        help="run FT, the gRPC price feed",
        description="Run FT: simulate prices and stream them over gRPC "
        "(QuoteService/StreamQuotes). SIGTERM or Ctrl-C drains open streams and exits 0.",
    )
    _option(ft, "--host", "FT_HOST", ALL_INTERFACES, "address to listen on")
    _option(ft, "--port", "FT_PORT", "50051", "port to listen on; 0 picks a free one", PORT)
    _option(
        ft,
        "--metrics-port",
        "FT_METRICS_PORT",
        "8081",
        "HTTP port of /metrics, /livez and /readyz; 0 picks a free one",
        PORT,
    )
    _option(
        ft, "--tick-interval", "FT_TICK_INTERVAL", "1", "seconds between price updates", SECONDS
    )
    _option(
        ft, "--seed", "FT_SEED", None, "seed of the random walk, for a repeatable path", INTEGER
    )
    _option(
        ft,
        "--symbols",
        "FT_SYMBOLS",
        DEFAULT_SYMBOLS,
        "instruments as SYMBOL=PRICE[:TICK],... (tick size defaults to 0.01)",
        _typed(parse_symbols, "symbols"),
    )
    _option(
        ft,
        "--drain-timeout",
        "FT_DRAIN_TIMEOUT",
        "5",
        "on shutdown, seconds open streams get to end before they are cut",
        SECONDS,
    )
    _option(
        ft,
        "--keepalive",
        "FT_KEEPALIVE",
        "30",
        "seconds of quiet before FT pings a connection; one that does not answer "
        "within as long again is closed",
        SECONDS,
    )
    _option(
        ft,
        "--subscriber-buffer",
        "FT_SUBSCRIBER_BUFFER",
        "16",
        "ticks buffered per client; a client further behind gets conflated quotes "
        "(only the newest per symbol)",
        COUNT,
    )
    _option(
        ft,
        "--slow-consumer-timeout",
        "FT_SLOW_CONSUMER_TIMEOUT",
        "10",
        "seconds a client may stay behind before it is disconnected with RESOURCE_EXHAUSTED",
        SECONDS,
    )
    _add_kafka(ft, "to publish every quote to as well (none: gRPC only)")
    _option(
        ft,
        "--kafka-partitions",
        "FT_KAFKA_PARTITIONS",
        str(DEFAULT_PARTITIONS),
        "partitions of the topic, if FT creates it",
        COUNT,
    )
    _option(
        ft,
        "--kafka-replication",
        "FT_KAFKA_REPLICATION",
        "1",
        "replicas of each partition, if FT creates the topic",
        COUNT,
    )
    _option(
        ft,
        "--kafka-buffer",
        "FT_KAFKA_BUFFER",
        "10000",
        "quotes held while the broker is slow or away; past that the oldest are dropped",
        COUNT,
    )
    ft.add_argument(
        "--kafka-idempotence",
        action=argparse.BooleanOptionalAction,
        help="use Kafka's idempotent producer; --no-kafka-idempotence for brokers without "
        "it, such as Tansu (env FT_KAFKA_IDEMPOTENCE; default: on)",
    )
    _add_logging(ft)

    core = commands.add_parser(
        "core",
        help="run Core, the HTTP quote service",
        description="Run Core: consume FT's stream and serve the latest prices over HTTP. "
        "SIGTERM or Ctrl-C finishes in-flight requests and exits 0.",
    )
    _option(core, "--host", "CORE_HOST", ALL_INTERFACES, "address to listen on")
    _option(core, "--port", "CORE_PORT", "8080", "port to listen on; 0 picks a free one", PORT)
    _option(
        core,
        "--source",
        "CORE_SOURCE",
        "grpc",
        "where prices come from: grpc (FT's stream at --ft-addr) or kafka (the topic at --kafka)",
        _source,
    )
    _option(core, "--ft-addr", "FT_ADDR", "127.0.0.1:50051", "FT's address, HOST:PORT")
    _add_kafka(core, "to read quotes from with --source kafka")
    _option(
        core,
        "--kafka-replay",
        "CORE_KAFKA_REPLAY",
        "1000",
        "with --source kafka, records read back from the end of each partition at start, "
        "to find each symbol's latest quote",
        COUNT,
    )
    _option(
        core,
        "--backoff-cap",
        "CORE_BACKOFF_CAP",
        "5",
        "longest wait, in seconds, between attempts to reconnect to FT",
        SECONDS,
    )
    _option(
        core,
        "--feed-timeout",
        "CORE_FEED_TIMEOUT",
        "5",
        "seconds without data from FT before the feed counts as lost; keep it above "
        "FT's tick interval",
        SECONDS,
    )
    _option(
        core,
        "--workers",
        "CORE_WORKERS",
        "1",
        "processes serving HTTP on the one port, each with its own feed from FT",
        COUNT,
    )
    _option(
        core,
        "--shutdown-delay",
        "CORE_SHUTDOWN_DELAY",
        "0",
        "on SIGTERM, seconds Core keeps serving with /readyz answering 503, so a load "
        "balancer stops sending before Core stops accepting",
        SECONDS,
    )
    _option(
        core,
        "--sse-heartbeat",
        "CORE_SSE_HEARTBEAT",
        "15",
        "seconds of quiet after which an event stream (/quotes/stream) gets a heartbeat",
        SECONDS,
    )
    _option(
        core,
        "--push-lag-limit",
        "CORE_PUSH_LAG_LIMIT",
        "10",
        "seconds a push client (SSE, WebSocket) may stay behind before it is disconnected",
        SECONDS,
    )
    _option(
        core,
        "--ws-ping-interval",
        "CORE_WS_PING_INTERVAL",
        "20",
        "seconds between WebSocket pings",
        SECONDS,
    )
    _option(
        core,
        "--ws-ping-timeout",
        "CORE_WS_PING_TIMEOUT",
        "20",
        "seconds a WebSocket client may leave a ping unanswered before it is dropped",
        SECONDS,
    )
    _option(
        core,
        "--ws-max-subscriptions",
        "CORE_WS_MAX_SUBSCRIPTIONS",
        "100",
        "symbols one WebSocket may subscribe to; more closes it with code 1008",
        COUNT,
    )
    _option(
        core,
        "--db",
        DB_ENV,
        default_database_url(),
        "the history database the history routes read: sqlite:///PATH or "
        "postgresql://USER:PASSWORD@HOST:PORT/NAME; none turns them off (503). Core never "
        "creates nor migrates it: run `quotopia db upgrade`",
    )
    core.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        help="log one line per HTTP request (env CORE_ACCESS_LOG=true; default: off)",
    )
    _add_logging(core)

    recorder = commands.add_parser(
        "recorder",
        help="run the recorder, which writes every quote into the history database",
        description="Run the recorder: read FT's stream and write every quote into the history "
        "database, in batches, counting gaps. Applies the schema's migrations at start unless "
        "--no-migrate. SIGTERM or Ctrl-C writes what is buffered and exits 0.",
    )
    _option(
        recorder, "--host", "RECORDER_HOST", ALL_INTERFACES, "address of /metrics, /livez, /readyz"
    )
    _option(
        recorder,
        "--metrics-port",
        "RECORDER_METRICS_PORT",
        "8082",
        "HTTP port of /metrics, /livez and /readyz; 0 picks a free one",
        PORT,
    )
    _option(
        recorder,
        "--source",
        "RECORDER_SOURCE",
        "grpc",
        "where quotes come from: grpc (FT's stream at --ft-addr) or kafka (the topic at --kafka)",
        _source,
    )
    _option(recorder, "--ft-addr", "FT_ADDR", "127.0.0.1:50051", "FT's address, HOST:PORT")
    _add_kafka(recorder, "to read quotes from with --source kafka")
    _option(
        recorder,
        "--kafka-group",
        "RECORDER_KAFKA_GROUP",
        DEFAULT_GROUP,
        "with --source kafka, the consumer group; recorders in one group share the partitions",
    )
    _option(
        recorder,
        "--kafka-session-timeout",
        "RECORDER_KAFKA_SESSION_TIMEOUT",
        "10",
        "with --source kafka, seconds a silent recorder keeps its partitions before the "
        "group gives them to the others",
        SECONDS,
    )
    _add_database(recorder)
    _option(
        recorder,
        "--batch-size",
        "RECORDER_BATCH_SIZE",
        "2000",
        "quotes per transaction, at most",
        COUNT,
    )
    _option(
        recorder,
        "--flush-interval",
        "RECORDER_FLUSH_INTERVAL",
        "0.2",
        "seconds a batch may wait to fill before it is written",
        SECONDS,
    )
    _option(
        recorder,
        "--buffer",
        "RECORDER_BUFFER",
        "10000",
        "quotes held for the database; when full, the recorder stops reading FT",
        COUNT,
    )
    _option(
        recorder,
        "--retention",
        "RECORDER_RETENTION",
        "none",
        "how long quotes are kept, e.g. 7d, 12h, 30m; none keeps them all",
        _typed(parse_duration, "duration"),
    )
    recorder.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        help="apply the schema's migrations at start; with --no-migrate, wait until "
        "`quotopia db upgrade` has (env RECORDER_MIGRATE; default: on)",
    )
    _option(
        recorder,
        "--backoff-cap",
        "RECORDER_BACKOFF_CAP",
        "5",
        "longest wait, in seconds, between attempts to reach FT or the database",
        SECONDS,
    )
    _option(
        recorder,
        "--feed-timeout",
        "RECORDER_FEED_TIMEOUT",
        "5",
        "seconds without data from FT before the feed counts as lost",
        SECONDS,
    )
    _option(
        recorder,
        "--drain-timeout",
        "RECORDER_DRAIN_TIMEOUT",
        "5",
        "on shutdown, seconds the buffered quotes get to reach the database",
        SECONDS,
    )
    _add_logging(recorder)

    db = commands.add_parser(
        "db",
        help="manage the history database (schema migrations)",
        description="Manage the history database: `quotopia db upgrade` applies every "
        "schema migration not yet applied, `quotopia db current` says where it is.",
    )
    db_commands = db.add_subparsers(
        dest="db_command", required=True, metavar="ACTION", parser_class=_Parser
    )
    for action, text in (
        ("upgrade", "apply every migration not yet applied, then print the revision"),
        ("current", "print the revision the database is at (none: no schema yet)"),
    ):
        db_action = db_commands.add_parser(action, help=text, description=text.capitalize() + ".")
        _add_database(db_action)
        _add_logging(db_action)

    up = commands.add_parser(
        "up",
        help="run FT, Core and the recorder together, for local use",
        description="Start `quotopia ft`, then `quotopia core` and `quotopia recorder`, as "
        "child processes and prefix their log lines. Core and the recorder share the history "
        "database (--db). Each child also reads its own environment variables (see "
        "`quotopia ft --help` and the others). Ctrl-C or SIGTERM stops Core and the recorder, "
        "then FT.",
    )
    _option(up, "--ft-port", "FT_PORT", "50051", "FT's port", PORT)
    _option(up, "--core-port", "CORE_PORT", "8080", "Core's port", PORT)
    _option(up, "--ft-metrics-port", "FT_METRICS_PORT", "8081", "FT's metrics port", PORT)
    _option(
        up,
        "--recorder-metrics-port",
        "RECORDER_METRICS_PORT",
        "8082",
        "the recorder's metrics port",
        PORT,
    )
    _add_database(up)
    up.add_argument(
        "--recorder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the recorder, so Core's history API has quotes (default: on)",
    )
    _add_logging(up)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run = _dispatch(args)
    except ValueError as exc:
        parser.exit(2, f"quotopia {args.command}: error: {exc}\n")
    try:
        code = run()
    except* StartupError as group:
        parser.exit(2, f"quotopia {args.command}: error: {first_leaf(group)}\n")
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> Callable[[], int]:
    """Validate the settings of one command and return what runs it."""
    if args.command == "ft":
        from quotopia.ft import FTConfig
        from quotopia.ft import serve as serve_ft

        ft_config = FTConfig(
            host=args.host,
            port=args.port,
            tick_interval=args.tick_interval,
            seed=args.seed,
            instruments=args.symbols,
            metrics_port=args.metrics_port,
            drain_timeout=args.drain_timeout,
            keepalive=args.keepalive,
            subscriber_buffer=args.subscriber_buffer,
            slow_consumer_timeout=args.slow_consumer_timeout,
            kafka=args.kafka,
            kafka_topic=args.kafka_topic,
            kafka_partitions=args.kafka_partitions,
            kafka_replication=args.kafka_replication,
            kafka_buffer=args.kafka_buffer,
            kafka_idempotence=(
                _env_flag("FT_KAFKA_IDEMPOTENCE", default=True)
                if args.kafka_idempotence is None
                else args.kafka_idempotence
            ),
        )
        # grpclib is asyncio-only.
        return _service(partial(serve_ft, ft_config), "ft", "asyncio", args)

    if args.command == "core":
        from quotopia.core import CoreConfig
        from quotopia.core import serve as serve_core
        from quotopia.core.config import PushLimits

        core_config = CoreConfig(
            host=args.host,
            port=args.port,
            ft_addr=args.ft_addr,
            backoff_cap=args.backoff_cap,
            feed_timeout=args.feed_timeout,
            workers=args.workers,
            shutdown_delay=args.shutdown_delay,
            access_log=(
                _env_flag("CORE_ACCESS_LOG") if args.access_log is None else args.access_log
            ),
            push=PushLimits(
                heartbeat=args.sse_heartbeat,
                lag_limit=args.push_lag_limit,
                ws_ping_interval=args.ws_ping_interval,
                ws_ping_timeout=args.ws_ping_timeout,
                ws_max_subscriptions=args.ws_max_subscriptions,
            ),
            database=args.db,
            source=args.source,
            kafka=args.kafka,
            kafka_topic=args.kafka_topic,
            kafka_replay=args.kafka_replay,
        )
        if core_config.workers > 1:
            from quotopia.core.workers import run_workers
            from quotopia.telemetry import tracing

            tracing.check_environment()  # each worker sets tracing up from them

            return partial(run_workers, core_config, args.log_level, args.log_format)
        return _service(partial(serve_core, core_config), "core", "trio", args)

    if args.command == "recorder":
        from quotopia.recorder.config import RecorderConfig
        from quotopia.recorder.service import serve as serve_recorder

        recorder_config = RecorderConfig(
            database=args.db,
            ft_addr=args.ft_addr,
            host=args.host,
            metrics_port=args.metrics_port,
            batch_size=args.batch_size,
            flush_interval=args.flush_interval,
            buffer=args.buffer,
            retention=args.retention,
            migrate=_env_flag("RECORDER_MIGRATE", default=True)
            if args.migrate is None
            else args.migrate,
            backoff_cap=args.backoff_cap,
            feed_timeout=args.feed_timeout,
            drain_timeout=args.drain_timeout,
            source=args.source,
            kafka=args.kafka,
            kafka_topic=args.kafka_topic,
            kafka_group=args.kafka_group,
            kafka_session_timeout=args.kafka_session_timeout,
        )
        # grpclib is asyncio-only.
        return _service(partial(serve_recorder, recorder_config), "recorder", "asyncio", args)

    if args.command == "db":
        return _database_command(args)

    from quotopia.up import run_up

    return lambda: run_up(
        ft_port=args.ft_port,
        core_port=args.core_port,
        ft_metrics_port=args.ft_metrics_port,
        recorder_metrics_port=args.recorder_metrics_port,
        database=args.db,
        recorder=args.recorder,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _database_command(args: argparse.Namespace) -> Callable[[], int]:
    """``quotopia db upgrade|current``: one blocking step, no event loop needed."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from quotopia.history.database import (
        current_revision,
        describe_url,
        parse_database_url,
        upgrade,
    )

    url = parse_database_url(args.db)
    if url is None:
        raise ValueError("--db names no database")

    def run() -> int:
        logs.configure(args.log_level, args.log_format, "db")
        log = logging.getLogger("quotopia.db")
        try:
            if args.db_command == "upgrade":
                before, after = upgrade(url)
                if before == after:
                    log.info("%s is up to date (revision %s)", describe_url(url), after)
                else:
                    log.info(
                        "%s upgraded from %s to revision %s",
                        describe_url(url),
                        before or "an empty database",
                        after,
                    )
                sys.stdout.write(f"{after}\n")
            else:
                sys.stdout.write(f"{current_revision(url) or 'none'}\n")
        except SQLAlchemyError as exc:
            # One line: the driver's own first line says what is wrong.
            cause = exc.orig if isinstance(exc, DBAPIError) else exc
            reason = (str(cause).splitlines() or [type(cause).__name__])[0]
            raise StartupError(f"database {describe_url(url)}: {reason}") from None
        return 0

    return run


def _service(
    serve: Callable[..., Awaitable[None]], service: str, backend: str, args: argparse.Namespace
) -> Callable[[], int]:
    """Run ``serve(shutdown_trigger=...)`` until SIGTERM/SIGINT, then return exit status 0.

    Tracing is set up from the ``OTEL_*`` variables here, so a bad one is a
    one-line error (exit status 2) before anything starts.
    """
    from quotopia.telemetry import tracing

    tracing.check_environment()

    async def main() -> None:
        async with shutdown_on_signals(logging.getLogger(f"quotopia.{service}")) as trigger:
            await serve(shutdown_trigger=trigger)

    def run() -> int:
        logs.configure(args.log_level, args.log_format, service)
        tracing.configure_tracing(service)
        try:
            anyio.run(main, backend=backend)
        finally:
            tracing.shutdown_tracing()
        return 0

    return run
