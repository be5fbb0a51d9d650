"""``quotopia up``: FT, Core and the recorder as child processes, for local use.

Each child is the same command a container runs (``quotopia ft`` / ``quotopia
core`` / ``quotopia recorder``), so what you see here is what you get in Docker.
Their log lines are prefixed with the service's name. Ctrl-C, SIGTERM or SIGHUP
stops them all; if one child exits by itself, the others are stopped too and
``up`` exits non-zero.

Stopping goes in the reverse order of starting: Core and the recorder first, then
FT once both have gone, so neither sees its feed end and a clean stop logs no
warning. For that the children run in sessions of their own: a Ctrl-C in a
terminal signals the whole foreground process group, and would otherwise reach
every child at once, before ``up`` could order anything. (So a closing
terminal's SIGHUP reaches only ``up`` too, which is why ``up`` handles it.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import anyio
from anyio.abc import ByteReceiveStream, Process

__all__ = ["run_up"]

#: How long a child gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: FT's start line, which carries the port it really listens on.
FT_READY = re.compile(rb"FT listening on \S+:(\d+)")
#: Longest line forwarded in one piece; a longer one is split.
MAX_LINE = 64 * 1024


def _say(message: str) -> None:
    sys.stdout.write(f"up   | {message}\n")
    sys.stdout.flush()


async def _forward(
    name: str, stream: ByteReceiveStream, on_line: Callable[[bytes], None] | None = None
) -> None:
    """Copy a child's output to ours, one prefixed line at a time."""
    prefix = f"{name:<4} | ".encode()
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE:
            lines.append(pending)
            pending = b""
        for line in lines:
            sys.stdout.buffer.write(prefix + line + b"\n")
            if on_line is not None:
                on_line(line)
        sys.stdout.flush()
    if pending:
        sys.stdout.buffer.write(prefix + pending + b"\n")
        sys.stdout.flush()


async def _stop(process: Process) -> None:
    """SIGTERM, then SIGKILL if the child is still there after STOP_TIMEOUT; return
    once it has exited."""
    if process.returncode is not None:
        return
    # It may exit between the check and the signal: then there is nothing to stop.
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    with anyio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


async def _supervise(ft: list[str], readers: dict[str, list[str]], env: dict[str, str]) -> int:
    """Start FT, then its readers (Core, the recorder) once FT listens, each given
    ``--ft-addr``; on a signal, or when one exits, stop the readers, then FT."""
    exit_code = 0
    ft_port: int | None = None
    ft_ready = anyio.Event()
    stop_all = anyio.Event()
    readers_gone = anyio.Event()  # every reader has exited, or never will start

    def watch_ft(line: bytes) -> None:
        nonlocal ft_port
        if ft_port is None and (match := FT_READY.search(line)):
            ft_port = int(match[1])
            ft_ready.set()

    async def run_child(
        name: str,
        argv: list[str],
        stop_when: anyio.Event,
        on_line: Callable[[bytes], None] | None = None,
    ) -> None:
        """Run one child to its end, forwarding its output; stop it once
        ``stop_when`` is set."""
        nonlocal exit_code
        process = await anyio.open_process(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        async with process, anyio.create_task_group() as stopper:
            stopper.start_soon(_stop_when, stop_when, process)
            assert process.stdout is not None
            # The forwarder ends by itself once the child's output ends, so every
            # last log line is shown.
            await _forward(name, process.stdout, on_line)
            code = await process.wait()
            stopper.cancel_scope.cancel()
        if not stop_all.is_set():
            _say(f"{name} exited with status {code}; stopping the rest")
            exit_code = 1
            stop_all.set()

    async def run_reader(name: str, argv: list[str]) -> None:
        await ft_ready.wait()
        if not stop_all.is_set():
            await run_child(name, [*argv, "--ft-addr", f"127.0.0.1:{ft_port}"], stop_all)

    async def run_readers() -> None:
        try:
            async with anyio.create_task_group() as tg:
                for name, argv in readers.items():
                    tg.start_soon(run_reader, name, argv)
        finally:
            readers_gone.set()

    async def watch_signals(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop_all.is_set():
                _say(f"received {name}, already stopping")
            else:
                _say(f"received {name}, stopping {' and '.join(readers)}, then ft")
                stop_all.set()

    # The signal receiver stays open until the very end, so a second Ctrl-C while
    # the children shut down cannot interrupt us with a KeyboardInterrupt.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as outer:
            outer.start_soon(watch_signals, signals)
            async with anyio.create_task_group() as children:
                children.start_soon(run_child, "ft", ft, readers_gone, watch_ft)
                children.start_soon(run_readers)
                await stop_all.wait()
                ft_ready.set()  # release the readers if FT never got ready
            outer.cancel_scope.cancel()
    return exit_code


async def _stop_when(event: anyio.Event, process: Process) -> None:
    """Once ``event`` is set, stop ``process`` (see :func:`_stop`)."""
    await event.wait()
    await _stop(process)


def run_up(
    *,
    ft_port: int,
    core_port: int,
    log_level: str,
    log_format: str = "text",
    ft_metrics_port: int | None = None,
    recorder_metrics_port: int | None = None,
    database: str | None = None,
    recorder: bool = True,
) -> int:
    """Run FT, Core and the recorder until a signal arrives or one of them exits;
    return the exit status (0 after a signal, 1 if a child exited by itself).

    Core and the recorder start once FT listens and are pointed at FT's real port,
    so ``--ft-port 0`` works too. Every child logs at ``log_level`` in
    ``log_format``. ``None`` leaves a setting to the child's own default (and its
    environment variable): FT's and the recorder's metrics ports, and the history
    database Core reads and the recorder writes.
    """
    me = [sys.executable, "-m", "quotopia"]
    logging_flags = ["--log-level", log_level, "--log-format", log_format]
    db_flags = [] if database is None else ["--db", database]
    ft = [*me, "ft", "--port", str(ft_port), *logging_flags]
    if ft_metrics_port is not None:
        ft += ["--metrics-port", str(ft_metrics_port)]
    readers = {"core": [*me, "core", "--port", str(core_port), *db_flags, *logging_flags]}
    if recorder:
        readers["rec"] = [*me, "recorder", *db_flags, *logging_flags]
        if recorder_metrics_port is not None:
            readers["rec"] += ["--metrics-port", str(recorder_metrics_port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = "core and the recorder" if recorder else "core"
    _say(f"starting ft on :{ft_port}, then {started} (Ctrl-C stops them all)")
    return anyio.run(_supervise, ft, readers, env)
