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
import signal
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# The end-to-end tests' process helpers: the same services, started and watched
# the same way, so this script measures exactly what tests/test_resilience.py checks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _procs import wait_until
from _services import DEADLINE, btc, feed, running_core, running_ft, stop

#: How often Core is polled while timing something.
POLL = 0.02


def made_after(port: int, than: datetime) -> dict[str, Any] | None:
    quote = btc(port)
    if quote is None or datetime.fromisoformat(quote["time"]) <= than:
        return None
    return quote


def one_run(cap: float) -> tuple[float, float, float, float]:
    """(kill → down, FT back → fresh, FT drain, Core drain), in seconds."""
    with running_ft() as ft, running_core(ft.port, "--backoff-cap", f"{cap:g}") as core:
        wait_until(lambda: btc(core.port), DEADLINE, interval=POLL, what="a BTC quote at Core")

        killed_at = time.monotonic()
        ft.process.signal(signal.SIGKILL)
        wait_until(
            lambda: not feed(core.port)["connected"], DEADLINE, interval=POLL, what="feed down"
        )
        kill_to_down = time.monotonic() - killed_at
        ft.process.wait(DEADLINE)
        # Core's store is frozen now: this is the last quote from the dead FT.
        last = btc(core.port)
        assert last is not None
        last_time = datetime.fromisoformat(last["time"])

        with running_ft(port=ft.port) as again:
            wait_until(
                lambda: made_after(core.port, last_time),
                DEADLINE,
                interval=POLL,
                what="a quote from the new FT",
            )
            back_to_fresh = time.monotonic() - again.ready_at
            ft_drain = stop(again)
        core.process.wait_for_line(r"feed lost: FT ended the stream", DEADLINE)
        core_drain = stop(core)
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
