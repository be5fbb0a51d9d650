"""Liveness and readiness, as every Quotopia service answers them.

- ``GET /livez``: the process and its event loop answer. Nothing else is checked:
  a failing liveness probe gets a container restarted, and restarting cures neither
  a missing FT nor a slow database.
- ``GET /readyz``: the service should get traffic now. ``503`` while it starts
  (before it has anything to serve) and while it drains after SIGTERM, so that a
  load balancer stops sending before the process goes.

The body always says why, e.g. ``{"status": "draining"}``. Pure: no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["LIVE", "Lifecycle", "Phase", "ProbeAnswer"]


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """An HTTP status and a JSON body."""

    status: int
    body: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200


LIVE = ProbeAnswer(200, {"status": "alive"})


class Lifecycle:
    """A service's phase: starting, then serving, then draining; never back."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING

    def serving(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.SERVING

    def draining(self) -> None:
        self.phase = Phase.DRAINING

    def readiness(self) -> ProbeAnswer:
        """200 ``ready`` while serving, else 503 with the phase."""
        if self.phase is Phase.SERVING:
            return ProbeAnswer(200, {"status": "ready"})
        return ProbeAnswer(503, {"status": self.phase.value})
