"""Waiting with a deadline, without pytest: shared by the test harnesses and by
the benchmark (scripts/bench), which starts the same servers with no pytest."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DEADLINE", "wait_until"]

T = TypeVar("T")

#: Bound on anything that should take a second or two, on a noisy 2-core machine.
DEADLINE = 20.0


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something other than None or False; return that.

    Raises :class:`AssertionError` naming ``what`` if ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
