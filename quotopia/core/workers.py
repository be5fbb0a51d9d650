"""``quotopia core --workers N``: one listening socket, N whole Cores serving it.

::

    quotopia core --workers N ── parent: binds the port, starts the workers, watches them
      worker 1..N ────────────── Core's serve() on the inherited socket: hypercorn,
                                 its own feed from FT, its own quote store

Why processes: a Core is one Python thread, so it can use one CPU at most. The
parent binds the socket itself, so ``--port 0`` works and the real port is logged
once; every worker accepts on that one socket, and each new connection goes to
whichever worker takes it first (a keep-alive connection stays with it). Each worker
holds its own stream from FT: N workers are N subscribers, and each answers
``/health`` for its own feed.

Signals and exits:

- Workers run in sessions of their own, so a Ctrl-C in a terminal reaches only the
  parent. On SIGTERM or SIGINT the parent sends SIGTERM to every worker, which drains
  as a single Core does; the parent exits 0 once all are gone.
- If a worker exits by itself, the parent stops the others and exits 1.
- If the parent dies, even by SIGKILL, its workers stop by themselves: each holds
  the read end of a pipe (the *lifeline*) whose write end only the parent holds,
  and which therefore ends when the parent does.

Tracing (the ``OTEL_*`` variables, which the workers inherit) is checked by the
parent and set up in each worker, whose spans carry a ``quotopia.worker`` resource
attribute, its number; the parent serves nothing, so it traces nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import anyio
import trio
from anyio.abc import Process, TaskStatus

from quotopia import logs
from quotopia.core.config import CoreConfig, PushLimits
from quotopia.core.feed import feed_origin
from quotopia.core.server import LISTEN_BACKLOG, serve
from quotopia.errors import StartupError, describe_os_error
from quotopia.shutdown import shutdown_on_signals
from quotopia.telemetry import tracing

__all__ = ["STOP_TIMEOUT", "run_workers"]

logger = logging.getLogger("quotopia.core")

#: Seconds a worker gets to exit after SIGTERM before it is killed. A worker stops
#: within about ``CoreConfig.graceful_timeout``; this only bounds a stuck one.
STOP_TIMEOUT = 5.0

#: How the parent starts a worker: ``python -c`` with the arguments of _worker_main.
_WORKER = "from quotopia.core.workers import _worker_main; _worker_main()"


def run_workers(config: CoreConfig, log_level: str, log_format: str = "text") -> int:
    """Serve Core from ``config.workers`` processes until SIGTERM or SIGINT.

    The parent and every worker log at ``log_level`` in ``log_format`` (see
    :func:`quotopia.logs.configure`). Returns the exit status: 0 after a requested
    stop, 1 if a worker exited by itself (or would not stop).

    Error handling: raises :class:`~quotopia.errors.StartupError` if the port
    cannot be bound, before any worker starts. The caller checks the ``OTEL_*``
    variables first (:func:`~quotopia.telemetry.tracing.check_environment`).
    """
    logs.configure(log_level, log_format, "core")
    listener = _listen(config)
    return anyio.run(_supervise, config, listener, log_level, log_format, backend="trio")


def _listen(config: CoreConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        return socket.create_server(
            (config.host, config.port), family=family, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {config.host}:{config.port}: {describe_os_error(exc)}"
        ) from None


async def _supervise(
    config: CoreConfig, listener: socket.socket, log_level: str, log_format: str
) -> int:
    """Start the workers, wait for a signal or a worker's exit, then stop them all."""
    stopping = anyio.Event()
    failed = False
    lifeline, parent_end = os.pipe()  # neither end is inherited unless passed

    async def run_worker(number: int, *, task_status: TaskStatus[Process]) -> None:
        nonlocal failed
        argv = [sys.executable, "-c", _WORKER, str(number), str(listener.fileno())]
        argv += [str(lifeline), log_level, log_format, json.dumps(dataclasses.asdict(config))]
        # Leaving the block by cancellation kills the worker: none outlives this task.
        async with await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            pass_fds=(listener.fileno(), lifeline),
            start_new_session=True,
        ) as worker:
            logger.info("worker %d started (pid %d)", number, worker.pid)
            task_status.started(worker)
            status = await worker.wait()
        if not stopping.is_set():
            logger.error(
                "worker %d (pid %d) exited with status %d; stopping the others",
                number,
                worker.pid,
                status,
            )
            failed = True
            stopping.set()
        elif status not in (0, -signal.SIGTERM):  # SIGTERM: stopped while starting up
            logger.error("worker %d (pid %d) stopped with status %d", number, worker.pid, status)
            failed = True

    async with shutdown_on_signals(logger) as stop_requested, anyio.create_task_group() as outer:
        outer.start_soon(_set_after, stop_requested, stopping)
        async with anyio.create_task_group() as watchers:
            with listener:
                workers = [
                    await watchers.start(run_worker, number)
                    for number in range(1, config.workers + 1)
                ]
                port = listener.getsockname()[1]
            os.close(lifeline)
            logger.info(
                "Core listening on http://%s:%d, feed from %s (%d workers)",
                config.host,
                port,
                feed_origin(config).where,
                config.workers,
            )
            await stopping.wait()
            for worker in workers:
                if worker.returncode is None:
                    worker.terminate()
            outer.start_soon(_kill_after, STOP_TIMEOUT, workers)
        # Every worker has exited.
        outer.cancel_scope.cancel()
    os.close(parent_end)
    if failed:
        logger.error("Core stopped: a worker failed")
        return 1
    logger.info("Core stopped")
    return 0


async def _set_after(wait: Callable[[], Awaitable[None]], event: anyio.Event) -> None:
    await wait()
    event.set()


async def _kill_after(delay: float, workers: list[Process]) -> None:
    await anyio.sleep(delay)
    for worker in workers:
        if worker.returncode is None:
            logger.error(
                "worker pid %d still running %gs after SIGTERM; killing it", worker.pid, delay
            )
            worker.kill()


# --- in a worker ----------------------------------------------------------------------


def _worker_main() -> None:
    """A worker's entry point; its arguments (``sys.argv[1:]``): its number, the
    listening socket's descriptor, the lifeline's, the log level, the log format,
    the config as JSON."""
    number, listen_fd, lifeline_fd, log_level, log_format, settings = sys.argv[1:]
    # The N workers share one stderr: each line says which one wrote it (a
    # "worker N:" prefix of the text, or a "worker" key of the JSON).
    logs.configure(log_level, log_format, "core", worker=int(number))
    fields = json.loads(settings)
    config = CoreConfig(**fields | {"push": PushLimits(**fields["push"])})
    listener = socket.socket(fileno=int(listen_fd))
    tracing.configure_tracing("core", {"quotopia.worker": int(number)})
    try:
        trio.run(_serve_worker, config, listener, int(lifeline_fd))
    finally:
        tracing.shutdown_tracing()


async def _serve_worker(config: CoreConfig, listener: socket.socket, lifeline_fd: int) -> None:
    """Core's serve(), stopped by SIGTERM/SIGINT or by the end of the lifeline."""
    stop = anyio.Event()
    async with shutdown_on_signals(logger) as signalled, trio.open_nursery() as nursery:
        nursery.start_soon(_set_after, signalled, stop)
        nursery.start_soon(_watch_parent, lifeline_fd, stop)
        await serve(config, shutdown_trigger=stop.wait, listener=listener)
        nursery.cancel_scope.cancel()


async def _watch_parent(lifeline_fd: int, stop: anyio.Event) -> None:
    async with trio.lowlevel.FdStream(lifeline_fd) as lifeline:
        # Nothing is ever written: this returns when the parent is gone.
        await lifeline.receive_some()
    if not stop.is_set():
        logger.warning("the parent process is gone; shutting down")
        stop.set()
