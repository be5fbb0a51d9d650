"""The system map: Quotopia's services and the links between them, as Core sees
them now, for the dashboard's live diagram (``GET /system``).

The map is data, not a picture: a list of nodes and a list of links, each with its
state. The dashboard draws whatever it is given, so a service that joins later (a
broker, a history store) joins the map by being added here.

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from quotopia.core.push.hub import Kind, PushHub
from quotopia.core.store import QuoteStore

__all__ = ["RateMeter", "SystemView"]


class RateMeter:
    """Events per second over the last ``window`` seconds, from a running count.

    ``rate(now, count)`` records the count (at most one sample per ``resolution``
    seconds) and answers the rate between the oldest sample in the window and now.
    """

    def __init__(self, window: float = 10.0, resolution: float = 0.5) -> None:
        self._window = window
        self._resolution = resolution
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, now: float, count: int) -> float:
        samples = self._samples
        if not samples or now - samples[-1][0] >= self._resolution:
            samples.append((now, count))
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()
        first_time, first_count = samples[0]
        elapsed = now - first_time
        return 0.0 if elapsed <= 0 else max(0, count - first_count) / elapsed


@dataclass
class SystemView:
    """What ``GET /system`` answers, from Core's state."""

    store: QuoteStore
    hub: PushHub
    ft_addr: str
    requests: RateMeter = field(default_factory=RateMeter)

    def snapshot(self, now: float, answered: int) -> dict[str, object]:
        """The map at ``now`` (a monotonic clock), Core having answered
        ``answered`` requests so far."""
        store = self.store
        feed = store.feed_status()
        push = {kind.value: self.hub.connections(kind) for kind in Kind}
        return {
            "nodes": [
                {
                    "id": "ft",
                    "name": "FT",
                    "role": "feed / ticker: the market's random walk",
                    "address": self.ft_addr,
                    "up": store.connected,
                },
                {
                    "id": "core",
                    "name": "Core",
                    "role": "HTTP API, event stream, WebSocket",
                    "up": True,
                    "requests_per_second": round(self.requests.rate(now, answered), 2),
                    "symbols": len(store.latest),
                },
                {
                    "id": "clients",
                    "name": "Clients",
                    "role": "browsers, curl, grpcurl",
                    "up": True,
                    "push_connections": push,
                },
            ],
            "links": [
                {
                    "from": "ft",
                    "to": "core",
                    "kind": "gRPC stream",
                    "up": store.connected,
                    "last_quote_age_seconds": feed["last_update_age_seconds"],
                    "reconnects": feed["reconnects"],
                },
                {
                    "from": "core",
                    "to": "clients",
                    "kind": "HTTP, SSE, WebSocket",
                    "up": True,
                    "push_connections": sum(push.values()),
                },
            ],
        }
