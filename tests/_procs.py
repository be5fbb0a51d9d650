"""Real quotopia processes for end-to-end tests: start, watch the logs, stop.

A :class:`QuotopiaProcess` runs ``python -m quotopia ...`` with its stdout and
stderr each read by a thread into a list of lines, so a test can wait for a log
line with a deadline instead of sleeping and hoping. Use it as a context manager:
whatever happens in the test, the process is killed and reaped on exit.

Each line is stamped with the (monotonic) time it was read, so a test can time an
event from the moment the process announced it (:meth:`~QuotopiaProcess.wait_for_line_at`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, NoReturn, TypeVar

import pytest
from _waiting import wait_until

__all__ = [
    "QuotopiaProcess",
    "clean_env",
    "missing_server",
    "wait_until",
]

T = TypeVar("T")

#: Environment variables the CLI reads; a test must not inherit them by accident.
# OTEL_: a developer's tracing settings are not the test's.
_CLI_ENV_PREFIXES = ("FT_", "CORE_", "QUOTOPIA_", "RECORDER_", "OTEL_")
_CLI_ENV_NAMES = ("LOG_LEVEL", "LOG_FORMAT")


def clean_env(**overrides: str) -> dict[str, str]:
    """The current environment without quotopia's settings, plus ``overrides``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_CLI_ENV_PREFIXES) and name not in _CLI_ENV_NAMES
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def missing_server(message: str, *, in_ci: str | None = None) -> NoReturn:
    """End a test whose server or tool is missing: skip it with ``message``.

    In CI (``CI=true``) fail it instead (with ``in_ci``, if given), since there a
    skip would mean the checks silently never run: ``.ci/run`` installs them all.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(in_ci or message)
    pytest.skip(message)


class _LineReader:
    """A thread that reads one pipe to its end, keeping every line."""

    def __init__(self, pipe: IO[str], changed: threading.Condition) -> None:
        self._pipe = pipe
        self._changed = changed
        self.lines: list[str] = []
        #: When each line was read (``time.monotonic()``), index for index.
        self.times: list[float] = []
        self.closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._pipe:
                read_at = time.monotonic()
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self.times.append(read_at)
                    self._changed.notify_all()
        finally:
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class QuotopiaProcess:
    """``python -m quotopia *args``, with its output captured line by line.

    ``python_args`` replaces ``-m quotopia`` to run another Python program the same
    way (``("-c", SCRIPT)``, say). ``width`` cuts longer lines in :meth:`output`, for
    processes that log huge lines. ``new_session`` starts it in a session (and
    process group) of its own, whose id is its pid: ``os.killpg(process.pid, ...)``
    then signals it as a terminal's Ctrl-C would, with everything in its group.

    Resource handling: leaving the ``with`` block kills the process if it is still
    running, reaps it and closes its pipes.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        python_args: Sequence[str] = ("-m", "quotopia"),
        width: int | None = None,
        new_session: bool = False,
    ) -> None:
        self.args: tuple[str, ...] = args
        self.python_args: tuple[str, ...] = tuple(python_args)
        self.width = width
        self.started_at = time.monotonic()
        self._changed = threading.Condition()
        self._popen = subprocess.Popen(
            [sys.executable, *self.python_args, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=clean_env() if env is None else env,
            start_new_session=new_session,
        )
        assert self._popen.stdout is not None
        assert self._popen.stderr is not None
        self._stdout = _LineReader(self._popen.stdout, self._changed)
        self._stderr = _LineReader(self._popen.stderr, self._changed)

    def __enter__(self) -> QuotopiaProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    @property
    def stderr_lines(self) -> list[str]:
        with self._changed:
            return list(self._stderr.lines)

    @property
    def stdout_lines(self) -> list[str]:
        with self._changed:
            return list(self._stdout.lines)

    def rss_bytes(self) -> int:
        """The process's resident set size now (Linux: ``VmRSS`` in /proc)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    kib = int(line.split()[1])
                    return kib * 1024
        raise AssertionError(f"no VmRSS for pid {self.pid} (a zombie?)")

    def output(self) -> str:
        """Everything captured so far, for assertion messages."""
        out, err = self.stdout_lines, self.stderr_lines
        if self.width is not None:
            out, err = ([_cut(line, self.width) for line in lines] for lines in (out, err))
        if self.python_args == ("-m", "quotopia"):
            command = f"quotopia {' '.join(self.args)}"
        else:
            command = _cut(" ".join(("python", *self.python_args, *self.args)), 120)
        parts = [f"$ {command} (exit status {self.returncode})"]
        if out:
            parts += ["--- stdout ---", *out]
        if err:
            parts += ["--- stderr ---", *err]
        return "\n".join(parts)

    def wait_for_line(
        self, pattern: str, timeout: float, *, stream: str = "stderr", start: int = 0
    ) -> re.Match[str]:
        """Wait for a line of ``stream`` (from index ``start`` on) to match ``pattern``.

        Raises :class:`AssertionError` with the captured output if ``timeout`` seconds
        pass, or the stream ends, without a match.
        """
        return self.wait_for_line_at(pattern, timeout, stream=stream, start=start)[0]

    def wait_for_line_at(
        self, pattern: str, timeout: float, *, stream: str = "stderr", start: int = 0
    ) -> tuple[re.Match[str], float]:
        """Like :meth:`wait_for_line`, plus when the line was read (``time.monotonic()``).

        A line is read within moments of being written (the pipe is unbuffered), so
        this times an event from when the process announced it, not from when the
        test got round to looking.
        """
        regex = re.compile(pattern)
        reader = self._stderr if stream == "stderr" else self._stdout
        deadline = time.monotonic() + timeout
        checked = start
        with self._changed:
            while True:
                for index in range(checked, len(reader.lines)):
                    found = regex.search(reader.lines[index])
                    if found:
                        return found, reader.times[index]
                checked = max(checked, len(reader.lines))
                remaining = deadline - time.monotonic()
                if reader.closed or remaining <= 0:
                    why = "the stream ended" if reader.closed else f"{timeout}s passed"
                    break
                self._changed.wait(remaining)
        raise AssertionError(f"{why} without a line matching {pattern!r}\n{self.output()}")

    def signal(self, signum: signal.Signals) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit, then for its output to be read in full."""
        try:
            code = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout}s later\n{self.output()}") from None
        self._stdout.join(timeout)
        self._stderr.join(timeout)
        return code

    def terminate(self, timeout: float) -> int:
        """SIGTERM, then wait up to ``timeout`` seconds; return the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        return self.wait(timeout)

    def close(self) -> None:
        """Kill the process if it still runs, reap it, close its pipes."""
        try:
            if self._popen.poll() is None:
                self._popen.kill()
            self._popen.wait(10)
            self._stdout.join(10)
            self._stderr.join(10)
        finally:
            for pipe in (self._popen.stdout, self._popen.stderr):
                if pipe is not None:
                    pipe.close()


def _cut(line: str, width: int) -> str:
    return line if len(line) <= width else f"{line[:width]}... ({len(line)} characters)"
