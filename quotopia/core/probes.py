"""Core's readiness: may a load balancer send it traffic now?

- ``starting`` (503): no whole snapshot from FT has arrived yet, so some prices
  would be missing.
- ``ready`` (200): serving, fed by FT.
- ``degraded`` (200): FT's feed is down, and Core keeps serving the last prices
  with their age. A stale price that says how old it is beats no answer; and
  since every Core replica reads the same FT, an outage of FT would make *all*
  of them unready at once, leaving a load balancer nothing to send to. The
  ``QuotopiaCoreFeedDown`` and ``QuotopiaQuotesStale`` alerts report the outage.
- ``draining`` (503): SIGTERM arrived; Core finishes what it has and goes.

Pure: no I/O.
"""

from __future__ import annotations

from quotopia.core.store import QuoteStore
from quotopia.telemetry.probes import Lifecycle, Phase, ProbeAnswer

__all__ = ["readiness"]


def readiness(lifecycle: Lifecycle, store: QuoteStore) -> ProbeAnswer:
    """The answer of ``GET /readyz``: its status code and JSON body."""
    feed = store.feed_status()
    if lifecycle.phase is Phase.DRAINING:
        return ProbeAnswer(503, {"status": "draining", "feed": feed})
    if lifecycle.phase is Phase.STARTING or not store.has_snapshot:
        return ProbeAnswer(503, {"status": "starting", "feed": feed})
    if not store.connected:
        return ProbeAnswer(200, {"status": "degraded", "feed": feed})
    return ProbeAnswer(200, {"status": "ready", "feed": feed})
