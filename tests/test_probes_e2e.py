"""Liveness, readiness, version and request metrics on real FT and Core processes.

Readiness is what a load balancer acts on, so each state is reached the way it
happens in life: Core before any FT (starting), fed (ready), FT killed (degraded:
still 200), SIGTERM with ``--shutdown-delay`` (draining, while requests are still
answered). The request metrics are checked for what they promise: the fast path is
counted like any request, and nothing a client sends becomes a label value.
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from typing import Any

import pytest
from _procs import wait_until
from _services import DEADLINE, ft_metrics_port, http_get, running_core, running_ft, scrape

pytestmark = pytest.mark.e2e


def readyz(port: int) -> tuple[int, str]:
    status, body = http_get(port, "/readyz")
    return status, body["status"]


def until_ready(port: int, wanted: tuple[int, str]) -> None:
    wait_until(lambda: readyz(port) == wanted, DEADLINE, what=f"/readyz {wanted}")


def test_core_readiness_from_start_to_drain() -> None:
    with running_ft() as ft:
        ft_port = ft.port
        with running_core(ft.port, "--shutdown-delay", "3") as core:
            until_ready(core.port, (200, "ready"))
            assert http_get(core.port, "/livez") == (200, {"status": "alive"})
            ft.process.kill()
            # A stale price with its age beats no answer: still ready, but degraded.
            until_ready(core.port, (200, "degraded"))
            status, body = http_get(core.port, "/readyz")
            assert body["feed"]["connected"] is False

            with running_core(ft_port) as orphan:
                # No FT has ever answered this one: nothing to serve yet.
                assert readyz(orphan.port) == (503, "starting")
                assert http_get(orphan.port, "/livez") == (200, {"status": "alive"})

            signalled = time.monotonic()
            core.process.signal(signal.SIGTERM)
            until_ready(core.port, (503, "draining"))
            # Draining, not gone: requests are still answered until the delay is over.
            status, _ = http_get(core.port, "/quotes")
            assert status == 200
            assert time.monotonic() - signalled < 3
            assert core.process.wait(DEADLINE) == 0, core.process.output()
            assert time.monotonic() - signalled >= 3


def test_ft_readiness_and_liveness_on_its_metrics_port() -> None:
    with running_ft() as ft:
        port = ft_metrics_port(ft)
        until_ready(port, (200, "ready"))
        assert http_get(port, "/livez") == (200, {"status": "alive"})
        assert http_get(port, "/nope") == (404, {"error": "not found", "path": "/nope"})
        found = scrape(port)
        assert found[("quotopia_ft_ready", ())] == 1
        assert found[("quotopia_ft_ticks_total", ())] >= 0


def test_version_says_what_runs() -> None:
    import platform

    from quotopia import __version__

    with running_ft() as ft, running_core(ft.port) as core:
        status, body = http_get(core.port, "/version")
    assert status == 200
    assert body["version"] == __version__
    assert body["python_version"] == platform.python_version()
    assert body["commit"] is None or re.fullmatch(r"[0-9a-f]{7,40}", body["commit"])


def requests_total(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[tuple[str, str, str], float]:
    result = {}
    for (name, labels), value in found.items():
        if name == "quotopia_core_http_requests_total":
            named = dict(labels)
            result[(named["route"], named["method"], named["status"])] = value
    return result


def test_requests_are_counted_by_route_template_and_nothing_typed_becomes_a_label() -> None:
    with running_ft() as ft, running_core(ft.port) as core:
        wait_until(lambda: http_get(core.port, "/quotes/BTC")[0] == 200, DEADLINE, what="BTC")
        before = requests_total(scrape(core.port))
        for _ in range(7):
            assert http_get(core.port, "/quotes")[0] == 200  # the fast path
        for n in range(5):
            assert http_get(core.port, f"/quotes/NOPE{n}")[0] == 404
            assert http_get(core.port, f"/secret-{n}")[0] == 404
        request = urllib.request.Request(f"http://127.0.0.1:{core.port}/quotes", method="BREW")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(request, timeout=DEADLINE)
        refused.value.close()
        found = scrape(core.port)
    after = requests_total(found)

    def added(key: tuple[str, str, str]) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert added(("/quotes", "GET", "200")) == 7
    assert added(("/quotes/{symbol}", "GET", "404")) == 5
    assert added(("unmatched", "GET", "404")) == 5
    assert added(("/quotes", "other", "405")) == 1
    labels = {value for (_, pairs) in found for _, value in pairs}
    assert not {v for v in labels if "NOPE" in v or "secret" in v or v == "BREW"}
    routes = {route for route, _, _ in after}
    assert routes <= {
        "/health",
        "/livez",
        "/readyz",
        "/version",
        "/metrics",
        "/quotes",
        "/quotes/{symbol}",
        "unmatched",
    }
    # Every symbol label is one FT serves.
    symbols = {dict(pairs)["symbol"] for (_, pairs) in found if "symbol" in dict(pairs)}
    assert symbols == {"SBER", "BTC", "ETH"}
    assert found[("quotopia_core_feed_connected", ())] == 1


def test_core_measures_the_feed_latency_of_updates() -> None:
    latency = ("quotopia_core_feed_latency_seconds_count", ())
    with running_ft() as ft, running_core(ft.port) as core:
        # The snapshot is not measured (its quotes are a tick old); updates are.
        wait_until(lambda: scrape(core.port).get(latency, 0) >= 3, DEADLINE, what="updates")
        found = scrape(core.port)
    assert found[("quotopia_core_feed_latency_seconds_sum", ())] / found[latency] < 1.0


def test_disconnects_are_counted_by_reason() -> None:
    with running_ft() as ft:
        port = ft_metrics_port(ft)
        with running_core(ft.port) as core:
            delivered = ("quotopia_ft_delivery_latency_seconds_count", ())
            # A tick written to Core's stream is one delivery (the snapshot is not).
            wait_until(lambda: scrape(port)[delivered] > 0, DEADLINE, what="a delivery")
            assert scrape(port)[("quotopia_ft_subscribers", ())] == 1
            core.process.terminate(DEADLINE)

        def normal() -> Any:
            found = scrape(port)
            key = ("quotopia_ft_subscriber_disconnects_total", (("reason", "normal"),))
            return found[key] == 1 and found[("quotopia_ft_subscribers", ())] == 0

        wait_until(normal, DEADLINE, what="one normal disconnect")
        found = scrape(port)
        assert found[("quotopia_ft_subscriber_connects_total", ())] == 1
