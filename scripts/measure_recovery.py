"""Measure how Core rides out an FT crash, and how fast both services drain.

Each run starts real ``python -m quotopia`` processes on OS-assigned ports:

1. FT, then Core (``--backoff-cap``, default 1 s); wait for a BTC quote at Core.
2. SIGKILL FT; poll Core's ``/health`` every 20 ms: **kill → down** is the time
   until ``feed.connected`` is false.
3. Restart FT on the same port at once (as a supervisor would); poll
   ``/quotes/BTC``: **FT back → fresh** is from the new FT's "listening" line to
   the first quote it made.
4. SIGTERM FT while Core reads its stream: **FT drain** is until FT exits 0.
5. SIGTERM Core: **Core drain** is until Core exits 0.

Every duration is an upper bound: it includes up to one poll interval and one
HTTP round trip. Usage::

    python scripts/measure_recovery.py [--runs 5] [--backoff-cap 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 20.0
POLL = 0.02
FT_READY = r"FT listening on 127\.0\.0\.1:(\d+) \("
CORE_READY = r"Core listening on http://127\.0\.0\.1:(\d+),"

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Service:
    """``python -m quotopia *args``; its stderr read line by line, each line timed.

    Leaving the ``with`` block kills the process if it still runs and reaps it.
    """

    def __init__(self, *args: str) -> None:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("FT_", "CORE_")) and name != "LOG_LEVEL"
        }
        env["PYTHONUNBUFFERED"] = "1"
        self.args = args
        self._popen = subprocess.Popen(
            [sys.executable, "-m", "quotopia", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
        self._lines: list[tuple[float, str]] = []
        self._closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._popen.poll() is None:
            self._popen.kill()
        self._popen.wait(DEADLINE)
        self._reader.join(DEADLINE)
        if self._popen.stderr is not None:
            self._popen.stderr.close()

    def _read(self) -> None:
        assert self._popen.stderr is not None
        try:
            for line in self._popen.stderr:
                read_at = time.monotonic()
                with self._changed:
                    self._lines.append((read_at, line.rstrip("\n")))
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._closed = True
                self._changed.notify_all()

    def wait_for(self, pattern: str) -> tuple[re.Match[str], float]:
        """The first line matching ``pattern``, and when it was read."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + DEADLINE
        with self._changed:
            while True:
                for read_at, line in self._lines:
                    if found := regex.search(line):
                        return found, read_at
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    break
                self._changed.wait(remaining)
        log = "\n".join(line for _, line in self._lines)
        raise RuntimeError(f"quotopia {' '.join(self.args)}: no line like {pattern!r}\n{log}")

    def signal(self, signum: signal.Signals) -> None:
        self._popen.send_signal(signum)

    def wait(self) -> int:
        return self._popen.wait(DEADLINE)

    def stop(self) -> float:
        """SIGTERM; return the seconds until the process exited with status 0."""
        signalled = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.wait()
        took = time.monotonic() - signalled
        if code != 0:
            raise RuntimeError(f"quotopia {' '.join(self.args)} exited with status {code}")
        return took


def wait_until(probe: Callable[[], T | None], what: str) -> T:
    deadline = time.monotonic() + DEADLINE
    while (result := probe()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {DEADLINE}s waiting for {what}")
        time.sleep(POLL)
    return result


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with _http.open(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def connected(port: int) -> bool:
    status, body = get(port, "/health")
    return status == 200 and bool(body["feed"]["connected"])


def btc(port: int) -> dict[str, Any] | None:
    status, body = get(port, "/quotes/BTC")
    return body if status == 200 else None


def made_after(port: int, than: datetime) -> dict[str, Any] | None:
    quote = btc(port)
    if quote is None or datetime.fromisoformat(quote["time"]) <= than:
        return None
    return quote


def ft_args(port: int) -> list[str]:
    return ["ft", "--host", "127.0.0.1", "--port", str(port), "--tick-interval", "0.2"]


def one_run(cap: float) -> tuple[float, float, float, float]:
    """(kill → down, FT back → fresh, FT drain, Core drain), in seconds."""
    with Service(*ft_args(0)) as ft:
        port = int(ft.wait_for(FT_READY)[0][1])
        core_args = ["--host", "127.0.0.1", "--port", "0", "--ft-addr", f"127.0.0.1:{port}"]
        with Service("core", *core_args, "--backoff-cap", f"{cap:g}") as core:
            core_port = int(core.wait_for(CORE_READY)[0][1])
            wait_until(lambda: btc(core_port), "a BTC quote at Core")

            killed_at = time.monotonic()
            ft.signal(signal.SIGKILL)
            wait_until(lambda: True if not connected(core_port) else None, "the feed down")
            kill_to_down = time.monotonic() - killed_at
            ft.wait()
            # Core's store is frozen now: this is the last quote from the dead FT.
            last = btc(core_port)
            assert last is not None
            last_time = datetime.fromisoformat(last["time"])

            with Service(*ft_args(port)) as again:
                back_at = again.wait_for(FT_READY)[1]
                wait_until(lambda: made_after(core_port, last_time), "a quote from the new FT")
                back_to_fresh = time.monotonic() - back_at
                ft_drain = again.stop()
            core.wait_for(r"feed lost: FT ended the stream")
            core_drain = core.stop()
    return kill_to_down, back_to_fresh, ft_drain, core_drain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backoff-cap", type=float, default=1.0)
    args = parser.parse_args()

    columns = ("kill → down", "FT back → fresh", "FT drain", "Core drain")
    results = []
    for number in range(1, args.runs + 1):
        results.append(one_run(args.backoff_cap))
        print(f"run {number}/{args.runs} done", file=sys.stderr, flush=True)

    print(f"Core --backoff-cap {args.backoff_cap:g}; FT --tick-interval 0.2; seconds")
    width = max(len(c) for c in columns)
    print(f"{'run':<8}" + "".join(f"{c:>{width + 2}}" for c in columns))
    for number, row in enumerate(results, 1):
        print(f"{number:<8}" + "".join(f"{v:>{width + 2}.3f}" for v in row))
    medians = [statistics.median(column) for column in zip(*results, strict=True)]
    print(f"{'median':<8}" + "".join(f"{v:>{width + 2}.3f}" for v in medians))
    worst = [max(column) for column in zip(*results, strict=True)]
    print(f"{'max':<8}" + "".join(f"{v:>{width + 2}.3f}" for v in worst))


if __name__ == "__main__":
    main()
