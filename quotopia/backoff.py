"""The reconnect policy: exponential backoff with jitter. Pure: no clock, no I/O.

The first delay is about ``initial`` seconds, each failure doubles it up to ``cap``,
and :meth:`Backoff.reset` starts over (Core resets after a stream that delivered
data). Jitter spreads reconnecting clients out so they do not all hit a restarted
FT in the same instant.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with "equal jitter".

    The n-th delay (n = 0, 1, ...) has a *base* of ``min(cap, initial * 2**n)``; the
    delay itself is drawn uniformly from ``[base * (1 - jitter), base]``, so it never
    exceeds the cap and never drops below ``(1 - jitter)`` of the base.
    """

    def __init__(
        self,
        initial: float = 0.1,
        cap: float = 5.0,
        *,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"need 0 < initial <= cap, got initial={initial}, cap={cap}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._failures = 0

    @property
    def base(self) -> float:
        """The un-jittered delay the next call to :meth:`next_delay` is drawn around."""
        # Stop doubling once past the cap: 2**n would overflow a float eventually.
        if self._failures >= 64:
            return self.cap
        return min(self.cap, self.initial * 2.0**self._failures)

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count one more failure."""
        base = self.base
        self._failures += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start over from ``initial``: the last connection was a success."""
        self._failures = 0
