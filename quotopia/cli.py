"""The ``quotopia`` command: ``quotopia ft``, ``quotopia core`` and ``quotopia up``.

Every setting is a flag with an environment variable as its default, read here
and nowhere else. A bad setting ends the program with a one-line message and exit
status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from quotopia import __version__
from quotopia.core.config import CoreConfig
from quotopia.ft.config import FTConfig
from quotopia.market import DEFAULT_SYMBOLS, parse_symbols

__all__ = ["build_parser", "main"]

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not a usage dump: config errors should be easy to read in logs.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _typed(convert: Callable[[str], T], what: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    parse.__name__ = what  # argparse names the type in its message
    return parse


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not in 0..65535")
    return port


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=LOG_LEVELS,
        help="log verbosity (env LOG_LEVEL; default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quotopia",
        description="Quotopia: a gRPC price feed (ft) and an HTTP quote service (core).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    ft = commands.add_parser(
        "ft",
        help="run FT, the gRPC price feed",
        description="Run FT: simulate prices and stream them over gRPC (QuoteService/StreamQuotes).",
    )
    ft.add_argument("--host", default=_env("FT_HOST", "0.0.0.0"), help="address to listen on (env FT_HOST; default %(default)s)")  # noqa: S104
    ft.add_argument("--port", type=_typed(_port, "port"), default=_env("FT_PORT", "50051"), help="port to listen on, 0 for any free port (env FT_PORT; default %(default)s)")
    ft.add_argument("--tick-interval", type=_typed(float, "seconds"), default=_env("FT_TICK_INTERVAL", "1"), help="seconds between price updates (env FT_TICK_INTERVAL; default %(default)s)")
    ft.add_argument("--seed", type=_typed(int, "integer"), default=os.environ.get("FT_SEED"), help="seed of the random walk, for a repeatable price path (env FT_SEED; default: random)")
    ft.add_argument("--symbols", type=_typed(parse_symbols, "symbols"), default=_env("FT_SYMBOLS", DEFAULT_SYMBOLS), help="instruments as SYMBOL=PRICE[:TICK],... (env FT_SYMBOLS; default %(default)s)")
    ft.add_argument("--drain-timeout", type=_typed(float, "seconds"), default=_env("FT_DRAIN_TIMEOUT", "5"), help="on SIGTERM, seconds to let open streams end before cutting them (env FT_DRAIN_TIMEOUT; default %(default)s)")
    _add_common(ft)

    core = commands.add_parser(
        "core",
        help="run Core, the HTTP quote service",
        description="Run Core: consume FT's stream and serve the latest prices over HTTP.",
    )
    core.add_argument("--host", default=_env("CORE_HOST", "0.0.0.0"), help="address to listen on (env CORE_HOST; default %(default)s)")  # noqa: S104
    core.add_argument("--port", type=_typed(_port, "port"), default=_env("CORE_PORT", "8080"), help="port to listen on, 0 for any free port (env CORE_PORT; default %(default)s)")
    core.add_argument("--ft-addr", default=_env("FT_ADDR", "127.0.0.1:50051"), help="FT's address as HOST:PORT (env FT_ADDR; default %(default)s)")
    core.add_argument("--backoff-cap", type=_typed(float, "seconds"), default=_env("CORE_BACKOFF_CAP", "5"), help="longest delay between reconnect attempts (env CORE_BACKOFF_CAP; default %(default)s)")
    _add_common(core)

    up = commands.add_parser(
        "up",
        help="run FT and Core together, for local use",
        description=(
            "Start FT and Core as child processes and prefix their log lines. Each child "
            "reads its usual environment variables; Ctrl-C or SIGTERM stops both."
        ),
    )
    up.add_argument("--ft-port", type=_typed(_port, "port"), default=_env("FT_PORT", "50051"), help="FT's port (env FT_PORT; default %(default)s)")
    up.add_argument("--core-port", type=_typed(_port, "port"), default=_env("CORE_PORT", "8080"), help="Core's port (env CORE_PORT; default %(default)s)")
    _add_common(up)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run = _dispatch(args)
    except ValueError as exc:
        parser.exit(2, f"quotopia {args.command}: error: {exc}\n")
    sys.exit(run())


def _dispatch(args: argparse.Namespace) -> Callable[[], int]:
    """Validate the settings of one command and return what runs it."""
    from quotopia import logs

    if args.command == "ft":
        ft_config = FTConfig(
            host=args.host,
            port=args.port,
            tick_interval=args.tick_interval,
            seed=args.seed,
            instruments=args.symbols,
            drain_timeout=args.drain_timeout,
        )

        def run_ft() -> int:
            import anyio

            from quotopia.ft.server import serve, wait_for_signal

            logs.configure(args.log_level)
            anyio.run(lambda: serve(ft_config, shutdown_trigger=wait_for_signal), backend="asyncio")
            return 0

        return run_ft

    if args.command == "core":
        core_config = CoreConfig(
            host=args.host, port=args.port, ft_addr=args.ft_addr, backoff_cap=args.backoff_cap
        )

        def run_core() -> int:
            import trio

            from quotopia.core.server import serve, wait_for_signal

            logs.configure(args.log_level)
            trio.run(lambda: serve(core_config, shutdown_trigger=wait_for_signal))
            return 0

        return run_core

    from quotopia.up import run_up

    return lambda: run_up(ft_port=args.ft_port, core_port=args.core_port, log_level=args.log_level)
