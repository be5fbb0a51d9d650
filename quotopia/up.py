"""``quotopia up``: FT and Core as child processes, for local use.

Each child is the same command a container runs (``quotopia ft`` / ``quotopia
core``), so what you see here is what you get in Docker. Their log lines are
prefixed with the service's name. Ctrl-C or SIGTERM stops both; if one child
exits by itself, the other is stopped too and ``up`` exits non-zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import ByteReceiveStream, Process

__all__ = ["run_up"]

#: How long a child gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Longest line forwarded in one piece; a longer one is split.
MAX_LINE = 64 * 1024


def _say(message: str) -> None:
    sys.stdout.write(f"up   | {message}\n")
    sys.stdout.flush()


async def _forward(name: str, stream: ByteReceiveStream) -> None:
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


async def _supervise(commands: dict[str, Sequence[str]], env: dict[str, str]) -> int:
    exit_code = 0
    async with anyio.create_task_group() as tg:
        processes: dict[str, Process] = {}
        stop_all = anyio.Event()

        async def run_child(name: str) -> None:
            nonlocal exit_code
            process = await anyio.open_process(
                commands[name], env=env, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
            processes[name] = process
            async with process:
                assert process.stdout is not None
                await _forward(name, process.stdout)
                code = await process.wait()
            if not stop_all.is_set():
                _say(f"{name} exited with status {code}; stopping the rest")
                exit_code = 1
                stop_all.set()

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    _say(f"received {signal.Signals(signum).name}, stopping ft and core")
                    stop_all.set()
                    return

        tg.start_soon(watch_signals)
        for name in commands:
            tg.start_soon(run_child, name)
        await stop_all.wait()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as stoppers:
                for process in processes.values():
                    stoppers.start_soon(_stop, process)
        tg.cancel_scope.cancel()
    return exit_code


def run_up(*, ft_port: int, core_port: int, log_level: str) -> int:
    """Run FT and Core until a signal arrives or one of them exits."""
    me = [sys.executable, "-m", "quotopia"]
    commands: dict[str, Sequence[str]] = {
        "ft": [*me, "ft", "--port", str(ft_port), "--log-level", log_level],
        "core": [*me, "core", "--port", str(core_port), "--log-level", log_level],
    }
    env = dict(os.environ)
    env.setdefault("FT_ADDR", f"127.0.0.1:{ft_port}")
    env["PYTHONUNBUFFERED"] = "1"
    _say(f"starting ft on :{ft_port} and core on :{core_port} (Ctrl-C stops both)")
    return anyio.run(_supervise, commands, env)
