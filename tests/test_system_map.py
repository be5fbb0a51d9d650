"""The dashboard's system map (``GET /system``), from Core's state: FT → Core
when Core reads FT's stream, FT → Kafka → Core when it reads the topic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from quotopia.core.config import PushLimits
from quotopia.core.push.hub import PushHub
from quotopia.core.store import QuoteStore
from quotopia.core.system import FRESH_SECONDS, SystemView, Upstream


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def view(upstream: Upstream, clock: Clock) -> tuple[SystemView, QuoteStore]:
    store = QuoteStore(clock=clock)
    return SystemView(store, PushHub(store, PushLimits(), clock=clock), upstream), store


def chain(snapshot: dict[str, Any]) -> list[str]:
    """The map read as the dashboard reads it: from the node no link points to."""
    nodes: list[dict[str, Any]] = snapshot["nodes"]
    links: list[dict[str, Any]] = snapshot["links"]
    targets = {link["to"] for link in links}
    (current,) = [node["id"] for node in nodes if node["id"] not in targets]
    path = [current]
    while following := [link for link in links if link["from"] == current]:
        (link,) = following
        current = link["to"]
        path += [link["kind"], current]
    return path


def by_id(snapshot: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """The map's nodes by id, or its links by ``from->to``."""
    items: list[dict[str, Any]] = snapshot[key]
    return {item["id"] if "id" in item else f"{item['from']}->{item['to']}": item for item in items}


def up(snapshot: dict[str, Any]) -> dict[str, bool]:
    """Whether each node and link is up, by node id or ``from->to``."""
    nodes, links = by_id(snapshot, "nodes"), by_id(snapshot, "links")
    return {key: item["up"] for key, item in (nodes | links).items()}


def test_fed_over_grpc_the_map_is_ft_core_clients() -> None:
    clock = Clock()
    system, store = view(Upstream("127.0.0.1:50051"), clock)
    snapshot = system.snapshot(clock.now, 0)
    assert chain(snapshot) == ["ft", "gRPC stream", "core", "HTTP, SSE, WebSocket", "clients"]
    assert by_id(snapshot, "nodes")["ft"]["address"] == "127.0.0.1:50051"
    assert by_id(snapshot, "nodes")["ft"]["up"] is False
    store.feed_up()
    snapshot = system.snapshot(clock.now, 0)
    assert by_id(snapshot, "nodes")["ft"]["up"] is True
    assert by_id(snapshot, "links")["ft->core"]["up"] is True


def test_fed_from_kafka_the_map_goes_through_the_broker() -> None:
    clock = Clock()
    system, store = view(Upstream("127.0.0.1:50051", "broker:9092", "ticks"), clock)
    snapshot = system.snapshot(clock.now, 0)
    assert chain(snapshot) == [
        "ft",
        "Kafka produce",
        "kafka",
        "topic ticks",
        "core",
        "HTTP, SSE, WebSocket",
        "clients",
    ]
    nodes = by_id(snapshot, "nodes")
    # Core never talks to FT here: it shows no address of FT's...
    assert "address" not in nodes["ft"]
    assert nodes["kafka"]["address"] == "broker:9092"
    # ... and FT is down until its quotes arrive.
    assert nodes["ft"]["up"] is False
    assert nodes["kafka"]["up"] is False

    store.feed_up()
    store.apply("BTC", 95432.12, datetime.now(UTC), 0.03, 1)
    snapshot = system.snapshot(clock.now, 0)
    assert up(snapshot) == dict.fromkeys(
        ["ft", "kafka", "core", "clients", "ft->kafka", "kafka->core", "core->clients"], True
    )
    assert by_id(snapshot, "links")["kafka->core"]["last_quote_age_seconds"] == 0

    # FT goes silent; Core's consumer is still connected to the broker.
    clock.now += FRESH_SECONDS
    assert up(system.snapshot(clock.now, 0))["ft"] is True
    clock.now += 0.5
    state = up(system.snapshot(clock.now, 0))
    assert (state["ft"], state["ft->kafka"]) == (False, False)
    assert (state["kafka"], state["kafka->core"]) == (True, True)

    store.feed_down()
    state = up(system.snapshot(clock.now, 0))
    assert (state["kafka"], state["kafka->core"]) == (False, False)


def test_the_broker_is_up_while_it_answers_core_whatever_the_feed() -> None:
    clock = Clock()
    answers = [True]
    upstream = Upstream("127.0.0.1:50051", "broker:9092", broker_answered=lambda: answers[-1])
    system, _store = view(upstream, clock)
    # No feed (FT silent), yet the broker answers Core.
    nodes = by_id(system.snapshot(clock.now, 0), "nodes")
    assert nodes["kafka"]["up"] is True
    assert nodes["ft"]["up"] is False
    answers.append(False)
    assert by_id(system.snapshot(clock.now, 0), "nodes")["kafka"]["up"] is False
