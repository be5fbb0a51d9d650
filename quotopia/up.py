"""``quotopia up``: FT and Core as child processes, for local use.

Each child is the same command a container runs (``quotopia ft`` / ``quotopia
core``), so what you see here is what you get in Docker. Their log lines are
prefixed with the service's name. Ctrl-C or SIGTERM stops both; if one child
exits by itself, the other is stopped too and ``up`` exits non-zero.
"""

from __future__ import annotations

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
    """SIGTERM, then SIGKILL if the child is still there after STOP_TIMEOUT."""
    if process.returncode is not None:
        return
    process.terminate()
    with anyio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    process.kill()
    await process.wait()


async def _supervise(ft: list[str], core: list[str], env: dict[str, str]) -> int:
    """Start FT, then Core once FT listens; stop both on a signal or when one exits."""
    exit_code = 0
    ft_port: int | None = None
    processes: list[Process] = []
    ft_ready = anyio.Event()
    stop_all = anyio.Event()

    def watch_ft(line: bytes) -> None:
        nonlocal ft_port
        if ft_port is None and (match := FT_READY.search(line)):
            ft_port = int(match[1])
            ft_ready.set()

    async def run_child(
        name: str, argv: list[str], on_line: Callable[[bytes], None] | None = None
    ) -> None:
        nonlocal exit_code
        process = await anyio.open_process(
            argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        processes.append(process)
        async with process:
            assert process.stdout is not None
            await _forward(name, process.stdout, on_line)
            code = await process.wait()
        if not stop_all.is_set():
            _say(f"{name} exited with status {code}; stopping the rest")
            exit_code = 1
            stop_all.set()

    async def start_core() -> None:
        await ft_ready.wait()
        if not stop_all.is_set():
            await run_child("core", [*core, "--ft-addr", f"127.0.0.1:{ft_port}"])

    async def watch_signals(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop_all.is_set():
                _say(f"received {name}, already stopping")
            else:
                _say(f"received {name}, stopping ft and core")
                stop_all.set()

    # The signal receiver stays open until the very end, so a second Ctrl-C while
    # the children shut down cannot interrupt us with a KeyboardInterrupt.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as outer:
            outer.start_soon(watch_signals, signals)
            async with anyio.create_task_group() as children:
                children.start_soon(run_child, "ft", ft, watch_ft)
                children.start_soon(start_core)
                await stop_all.wait()
                ft_ready.set()  # release start_core if FT never got ready
                for process in processes:
                    children.start_soon(_stop, process)
                # The children's forwarders end by themselves once their output
                # ends, so every last log line is shown.
            outer.cancel_scope.cancel()
    return exit_code


def run_up(*, ft_port: int, core_port: int, log_level: str) -> int:
    """Run FT and Core until a signal arrives or one of them exits.

    Core starts once FT listens and is pointed at FT's real port, so ``--ft-port 0``
    works too.
    """
    me = [sys.executable, "-m", "quotopia"]
    ft = [*me, "ft", "--port", str(ft_port), "--log-level", log_level]
    core = [*me, "core", "--port", str(core_port), "--log-level", log_level]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    _say(f"starting ft on :{ft_port} and core on :{core_port} (Ctrl-C stops both)")
    return anyio.run(_supervise, ft, core, env)
