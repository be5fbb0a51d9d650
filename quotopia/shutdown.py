"""Turning SIGTERM and SIGINT into a graceful shutdown, for both services.

Works on any AnyIO backend: FT runs on asyncio, Core on Trio.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

__all__ = ["shutdown_on_signals"]


@asynccontextmanager
async def shutdown_on_signals(
    logger: logging.Logger,
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Yield a shutdown trigger that returns at the first SIGTERM or SIGINT.

    The signals stay caught until the block exits, so a second Ctrl-C (or a
    process manager's repeated SIGTERM) cannot cut the graceful shutdown short
    with a KeyboardInterrupt or the default "terminate now" action.
    """
    requested = anyio.Event()

    async def watch(signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            if requested.is_set():
                logger.info("received %s, already shutting down", signum.name)
            else:
                logger.info("received %s, shutting down", signum.name)
                requested.set()

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, signals)
            yield requested.wait
            tg.cancel_scope.cancel()
