"""The system map: Quotopia's services and the links between them, as Core sees
them now, for the dashboard's live diagram (``GET /system``).

The map is data, not a picture: a list of nodes and a list of links, each with its
state. The dashboard draws whatever it is given, so a service that joins later (a
broker, a history store) joins the map by being added here.

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from quotopia.core.push.hub import Kind, PushHub
from quotopia.core.store import QuoteStore

__all__ = ["FRESH_SECONDS", "RateMeter", "SystemView", "Upstream"]

#: With Core fed from Kafka, FT counts as up while its latest quote is at most
#: this old: the age at which the ``QuotopiaQuotesStale`` alert fires.
FRESH_SECONDS = 10.0


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


@dataclass(frozen=True)
class Upstream:
    """Where Core's feed comes from: FT's gRPC stream at ``ft_addr``, or, when
    ``kafka`` is set, the Kafka ``topic`` FT publishes to. ``broker_answered()``
    says whether the broker answered Core's latest attempt to reach it (without
    it, the broker counts as up while Core's feed is)."""

    ft_addr: str = "?"
    kafka: str | None = None
    topic: str = "quotes"
    broker_answered: Callable[[], bool] | None = None


@dataclass
class SystemView:
    """What ``GET /system`` answers, from Core's state.

    Fed over gRPC, the map is FT → Core → clients and Core knows FT's state from
    its stream. Fed from Kafka, it is FT → Kafka → Core → clients: Core's feed is
    the link from the broker; the broker is up while it answers Core; and FT,
    which Core never talks to, counts as up while its quotes arrive fresh
    (:data:`FRESH_SECONDS`). So an FT that stops publishing turns FT and Core's
    feed red, and leaves the broker green.
    """

    store: QuoteStore
    hub: PushHub
    upstream: Upstream = field(default_factory=Upstream)
    requests: RateMeter = field(default_factory=RateMeter)

    def snapshot(self, now: float, answered: int) -> dict[str, object]:
        """The map at ``now`` (a monotonic clock), Core having answered
        ``answered`` requests so far."""
        store = self.store
        feed = store.feed_status()
        push = {kind.value: self.hub.connections(kind) for kind in Kind}
        feed_link = {
            "up": store.connected,
            "last_quote_age_seconds": feed["last_update_age_seconds"],
            "reconnects": feed["reconnects"],
        }
        core: dict[str, object] = {
            "id": "core",
            "name": "Core",
            "role": "HTTP API, event stream, WebSocket",
            "up": True,
            "requests_per_second": round(self.requests.rate(now, answered), 2),
            "symbols": len(store.latest),
        }
        clients: dict[str, object] = {
            "id": "clients",
            "name": "Clients",
            "role": "browsers, curl, grpcurl",
            "up": True,
            "push_connections": push,
        }
        served = {
            "from": "core",
            "to": "clients",
            "kind": "HTTP, SSE, WebSocket",
            "up": True,
            "push_connections": sum(push.values()),
        }
        upstream = self.upstream
        ft: dict[str, object] = {
            "id": "ft",
            "name": "FT",
            "role": "feed / ticker: the market's random walk",
        }
        if upstream.kafka is None:
            ft |= {"address": upstream.ft_addr, "up": store.connected}
            return {
                "nodes": [ft, core, clients],
                "links": [{"from": "ft", "to": "core", "kind": "gRPC stream", **feed_link}, served],
            }
        age = feed["last_update_age_seconds"]
        fresh = isinstance(age, float | int) and age <= FRESH_SECONDS
        reached = upstream.broker_answered
        broker = {
            "id": "kafka",
            "name": "Kafka",
            "role": f"the event log: topic {upstream.topic}",
            "address": upstream.kafka,
            "up": store.connected if reached is None else reached(),
        }
        return {
            "nodes": [ft | {"up": fresh}, broker, core, clients],
            "links": [
                {"from": "ft", "to": "kafka", "kind": "Kafka produce", "up": fresh},
                {"from": "kafka", "to": "core", "kind": f"topic {upstream.topic}", **feed_link},
                served,
            ],
        }
