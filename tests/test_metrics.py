"""The metrics and probes, as pure pieces: histogram, lag, collectors, routes, readiness.

What a real Prometheus makes of them is checked in tests/test_observability_e2e.py;
here each piece is checked against what it must say for known inputs.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.routing import Map, Rule

from quotopia import __version__
from quotopia.core.metrics import UNMATCHED, CoreMetrics, RouteTemplates
from quotopia.core.probes import readiness
from quotopia.core.store import QuoteStore
from quotopia.ft.broadcast import Broadcaster
from quotopia.ft.metrics import Disconnect, FTMetrics
from quotopia.ft.wire import EncodedQuote
from quotopia.telemetry.metrics import LATENCY_BUCKETS, FastHistogram, exposition
from quotopia.telemetry.probes import Lifecycle


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- FastHistogram ------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=200))
def test_fast_histogram_buckets_are_cumulative_counts_at_or_below_each_bound(
    values: list[float],
) -> None:
    histogram = FastHistogram()
    for value in values:
        histogram.observe(value)
    buckets = dict(histogram.buckets())
    for bound in LATENCY_BUCKETS:
        assert buckets[repr(bound)] == sum(v <= bound for v in values)
    assert buckets["+Inf"] == histogram.count == len(values)
    assert histogram.sum == pytest.approx(math.fsum(values))


def test_fast_histogram_needs_increasing_buckets() -> None:
    with pytest.raises(ValueError, match="increasing"):
        FastHistogram((0.1, 0.01))


def test_fast_histogram_exposes_a_prometheus_histogram() -> None:
    histogram = FastHistogram((0.5, 1.0))
    histogram.observe(0.2)
    histogram.observe(0.7)
    family = histogram.family("x_seconds", "doc")
    found = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert found == {
        ("x_seconds_bucket", "0.5"): 1,
        ("x_seconds_bucket", "1.0"): 2,
        ("x_seconds_bucket", "+Inf"): 2,
        ("x_seconds_count", None): 2,
        ("x_seconds_sum", None): pytest.approx(0.9),
    }


# --- FT -----------------------------------------------------------------------------


def encoded(symbol: str, price: float, at: float = 0.0) -> EncodedQuote:
    return EncodedQuote(symbol, b"\x00\x00\x00\x00\x00", price, at, b"")


@pytest.mark.anyio
async def test_lag_of_subscribers_that_keep_up_is_zero() -> None:
    broadcaster: Broadcaster[EncodedQuote] = Broadcaster(buffer_size=2)
    with broadcaster.subscribe():
        broadcaster.publish((encoded("A", 1),), now=10.0)
        lag = broadcaster.lag(11.0)
    assert (lag.behind, lag.max_backlog, lag.max_behind_seconds) == (0, 1, 0.0)


@pytest.mark.anyio
async def test_lag_counts_the_subscribers_behind_and_the_longest_wait() -> None:
    broadcaster: Broadcaster[EncodedQuote] = Broadcaster(buffer_size=1)
    with broadcaster.subscribe(), broadcaster.subscribe() as reading:
        broadcaster.publish((encoded("A", 1),), now=10.0)
        reading.updates.receive_nowait()
        broadcaster.publish((encoded("A", 2),), now=11.0)  # the first one is now full
        reading.updates.receive_nowait()
        broadcaster.publish((encoded("A", 3),), now=12.0)
        lag = broadcaster.lag(15.0)
    # One subscriber is behind since 11.0: its buffered tick plus a conflated batch.
    assert (lag.behind, lag.max_backlog, lag.max_behind_seconds) == (1, 2, 4.0)


@pytest.mark.anyio
async def test_ft_metrics_say_what_the_broadcaster_and_the_handlers_counted() -> None:
    broadcaster: Broadcaster[EncodedQuote] = Broadcaster(buffer_size=1)
    metrics = FTMetrics(broadcaster, ready=lambda: True, clock=lambda: 20.0)
    with broadcaster.subscribe():
        for n in range(3):
            tick = (encoded("A", 100 + n), encoded("B", 5))
            broadcaster.publish(tick, now=10.0 + n)
            metrics.tick(tick)
        metrics.connects += 1
        metrics.disconnects[Disconnect.SLOW_CONSUMER] += 2
        metrics.delivery_latency.observe(0.003)
        body, content_type = exposition(metrics.registry, "")
    assert content_type.startswith("text/plain; version=0.0.4")
    found = samples(body.decode())
    assert found[("quotopia_ft_ticks_total", ())] == 3
    assert found[("quotopia_ft_quotes_published_total", (("symbol", "A"),))] == 3
    assert found[("quotopia_ft_price", (("symbol", "A"),))] == 102
    assert found[("quotopia_ft_subscribers", ())] == 1
    assert found[("quotopia_ft_subscriber_connects_total", ())] == 1
    for reason in Disconnect:
        expected = 2 if reason is Disconnect.SLOW_CONSUMER else 0
        key = ("quotopia_ft_subscriber_disconnects_total", (("reason", reason.value),))
        assert found[key] == expected
    # The second tick filled the buffer, the third was conflated into a pending batch.
    assert found[("quotopia_ft_subscribers_behind", ())] == 1
    assert found[("quotopia_ft_subscriber_backlog_max_ticks", ())] == 2
    assert found[("quotopia_ft_subscriber_behind_max_seconds", ())] == 9.0  # since 11.0
    assert found[("quotopia_ft_delivery_latency_seconds_count", ())] == 1
    assert found[("quotopia_ft_ready", ())] == 1
    build = (
        ("python_version", platform.python_version()),
        ("service", "ft"),
        ("version", __version__),
    )
    assert found[("quotopia_build_info", build)] == 1
    assert ("process_resident_memory_bytes", ()) in found


def test_ft_metrics_negotiate_openmetrics_for_prometheus() -> None:
    metrics = FTMetrics(Broadcaster(), ready=lambda: False)
    body, content_type = exposition(metrics.registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# --- Core ---------------------------------------------------------------------------


@dataclass
class Clocks:
    monotonic: float = 100.0
    wall: float = 1_800_000_000.0


def store_with(clocks: Clocks) -> QuoteStore:
    return QuoteStore(clock=lambda: clocks.monotonic, wall_clock=lambda: clocks.wall)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_store_is_not_ready_before_the_whole_announced_snapshot() -> None:
    clocks = Clocks()
    store = store_with(clocks)
    store.feed_up(snapshot_size=2)
    store.apply("A", 1.0, at(clocks.wall - 5), 0.0, 1)
    assert not store.has_snapshot
    store.apply("B", 1.0, at(clocks.wall - 5), 0.0, 1)
    assert store.has_snapshot
    # Snapshot quotes are old: they are no measure of the feed's latency.
    assert store.feed_latency.count == 0
    store.apply("A", 1.0, at(clocks.wall - 0.004), 0.0, 2)
    assert store.feed_latency.count == 1
    assert store.feed_latency.sum == pytest.approx(0.004, abs=1e-5)  # µs datetimes


def test_store_without_a_snapshot_size_is_ready_at_the_first_quote() -> None:
    store = store_with(Clocks())
    store.feed_up()
    assert not store.has_snapshot
    store.apply("A", 1.0, None, 0.0, 1)
    assert store.has_snapshot


def test_readiness_through_a_life() -> None:
    store = store_with(Clocks())
    lifecycle = Lifecycle()
    assert readiness(lifecycle, store).body["status"] == "starting"
    lifecycle.serving()
    answer = readiness(lifecycle, store)
    assert (answer.status, answer.body["status"]) == (503, "starting")
    store.feed_up(snapshot_size=1)
    store.apply("A", 1.0, None, 0.0, 1)
    answer = readiness(lifecycle, store)
    assert (answer.status, answer.body["status"]) == (200, "ready")
    store.feed_down()
    answer = readiness(lifecycle, store)
    assert (answer.status, answer.body["status"]) == (200, "degraded")
    assert answer.body["feed"] == store.feed_status()
    lifecycle.draining()
    lifecycle.serving()  # never back
    answer = readiness(lifecycle, store)
    assert (answer.status, answer.body["status"]) == (503, "draining")


def test_core_metrics_read_the_store_at_scrape_time() -> None:
    clocks = Clocks()
    store = store_with(clocks)
    metrics = CoreMetrics(store, ready=lambda: False)
    store.feed_up(snapshot_size=0)
    store.apply("BTC", 95000.5, at(clocks.wall), 0.1, 1)
    store.apply("BTC", 95001.0, at(clocks.wall), 0.1, 2)
    store.feed_down()
    store.feed_up()
    clocks.monotonic += 7.5
    metrics.observe_request("/quotes", "GET", 200, 0.002)
    metrics.observe_request("/quotes", "BREW", 405, 0.002)
    found = samples(exposition(metrics.registry, "")[0].decode())
    assert found[("quotopia_core_feed_connected", ())] == 1
    assert found[("quotopia_core_feed_reconnects_total", ())] == 1
    assert found[("quotopia_core_quotes_received_total", (("symbol", "BTC"),))] == 2
    assert found[("quotopia_core_quote_age_seconds", (("symbol", "BTC"),))] == 7.5
    assert found[("quotopia_core_price", (("symbol", "BTC"),))] == 95001.0
    assert found[("quotopia_core_feed_latency_seconds_count", ())] == 2
    assert found[("quotopia_core_ready", ())] == 0
    requests = "quotopia_core_http_requests_total"
    assert found[(requests, (("method", "GET"), ("route", "/quotes"), ("status", "200")))] == 1
    # A method nobody defined is no label value of its own.
    assert found[(requests, (("method", "other"), ("route", "/quotes"), ("status", "405")))] == 1


ROUTES = RouteTemplates(
    Map([Rule("/health", methods=["GET"]), Rule("/quotes/<symbol>/history", methods=["GET"])])
)


@pytest.mark.parametrize(
    ("path", "method", "route"),
    [
        ("/quotes", "GET", "/quotes"),
        ("/quotes/btc", "GET", "/quotes/{symbol}"),
        ("/quotes/DOGE", "POST", "/quotes/{symbol}"),
        ("/quotes/", "GET", UNMATCHED),
        ("/health", "GET", "/health"),
        ("/health", "DELETE", "/health"),
        ("/quotes/x/history", "GET", "/quotes/{symbol}/history"),
        ("/nope", "GET", UNMATCHED),
        ("/%ff/../..", "GET", UNMATCHED),
    ],
)
def test_route_templates(path: str, method: str, route: str) -> None:
    assert ROUTES(path, method) == route


@given(st.text(max_size=40))
def test_no_path_becomes_a_label_value(path: str) -> None:
    assert ROUTES("/" + path, "GET") in {
        "/quotes",
        "/quotes/{symbol}",
        "/health",
        "/quotes/{symbol}/history",
        UNMATCHED,
    }
