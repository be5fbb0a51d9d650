"""Core's metrics: HTTP requests, and the feed as the store sees it.

Requests are counted by :class:`MeasureRequests`, the outermost layer of Core's
ASGI stack, so the fast path of ``GET /quotes`` and ``GET /quotes/{symbol}``
(:class:`~quotopia.core.app.PreparedQuotes`) is counted like every other request.
Labels stay bounded: the route is a template of the app's url map
(``/quotes/{symbol}``, never the symbol someone typed), or ``unmatched``; the
method is one of :data:`METHODS` or ``other``.

The feed's metrics are read from the :class:`~quotopia.core.store.QuoteStore` when
Prometheus scrapes (ages are computed then), so the feed consumer does no extra
work per quote. The catalogue is in docs/observability.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
    WebsocketScope,
)
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map

from quotopia.core.push.hub import CloseReason, Kind, PushHub
from quotopia.core.store import QuoteStore
from quotopia.telemetry import tracing
from quotopia.telemetry.metrics import new_registry

__all__ = ["METHODS", "UNMATCHED", "CoreMetrics", "MeasureRequests", "RouteTemplates"]

#: Methods that get a label value of their own; any other is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: The route label of a request that matches no route (a 404 for an unknown path).
UNMATCHED = "unmatched"
#: The status label of a request whose client left before it was answered
#: (nginx's "client closed request").
CLIENT_GONE = 499

_tracer = tracing.tracer("quotopia.core")

#: Request durations, in seconds: Core answers in about a millisecond when idle,
#: tens of milliseconds under load.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


#: Routes whose responses last as long as the client stays: counted, but not
#: timed (hours-long "requests" would swamp the latency histogram and its alert).
STREAMING_ROUTES = frozenset({"/quotes/stream", "/ws"})


class CoreMetrics(Collector):
    """Core's registry: request metrics, and a collector over the store and the
    push hub (if any). ``rejected`` counts the feed's undecodable records (the
    Kafka source's); without it, that counter stays at 0."""

    def __init__(
        self,
        store: QuoteStore,
        ready: Callable[[], bool],
        hub: PushHub | None = None,
        rejected: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._ready = ready
        self._hub = hub
        self._rejected = rejected
        self.registry: CollectorRegistry = new_registry("core")
        self.requests = Counter(
            "quotopia_core_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "quotopia_core_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        #: Requests answered so far, all routes (for the dashboard's request rate).
        self.answered = 0
        self.registry.register(self)

    def observe_request(self, route: str, method: str, status: int, seconds: float | None) -> None:
        """Count a request; time it too, unless ``seconds`` is None."""
        if method not in METHODS:
            method = "other"  # before it is a key: a client may send any word
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            # labels() costs a lock and a dict lookup by label values; a request
            # costs a dict lookup here. Bounded: routes x methods x statuses.
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route, method),
            )
        counter, histogram = children
        counter.inc()
        self.answered += 1
        if seconds is not None:
            histogram.observe(seconds)

    def collect(self) -> Iterable[Metric]:
        store = self._store
        yield GaugeMetricFamily(
            "quotopia_core_feed_connected",
            "1 while a stream from FT is open, else 0.",
            value=int(store.connected),
        )
        yield CounterMetricFamily(
            "quotopia_core_feed_reconnects",
            "Times the feed was re-established after a loss.",
            value=store.reconnects,
        )
        yield CounterMetricFamily(
            "quotopia_core_feed_rejected",
            "Feed records skipped because they hold no readable quote.",
            value=self._rejected() if self._rejected is not None else 0,
        )
        received = CounterMetricFamily(
            "quotopia_core_quotes_received", "Quotes applied to the store.", labels=["symbol"]
        )
        age = GaugeMetricFamily(
            "quotopia_core_quote_age_seconds",
            "Age of each symbol's latest quote (since Core received it), at scrape time.",
            labels=["symbol"],
        )
        price = GaugeMetricFamily("quotopia_core_price", "Latest price.", labels=["symbol"])
        for quote in store.latest:
            received.add_metric([quote.symbol], store.received.get(quote.symbol, 0))
            age.add_metric([quote.symbol], store.age(quote))
            price.add_metric([quote.symbol], quote.price)
        yield received
        yield age
        yield price
        yield store.feed_latency.family(
            "quotopia_core_feed_latency_seconds",
            "From a quote's generation at FT to its arrival in Core's store.",
        )
        yield GaugeMetricFamily(
            "quotopia_core_ready", "1 when /readyz answers 200.", value=int(self._ready())
        )
        if self._hub is not None:
            yield from _push_families(self._hub)


def _push_families(hub: PushHub) -> Iterable[Metric]:
    connections = GaugeMetricFamily(
        "quotopia_core_push_connections",
        "Push connections open now, by kind (sse, ws).",
        labels=["kind"],
    )
    sent = CounterMetricFamily(
        "quotopia_core_push_events_sent", "Quote events written to push clients.", labels=["kind"]
    )
    conflated = CounterMetricFamily(
        "quotopia_core_push_conflated",
        "Quote events skipped for push clients that fell behind (only the newest per "
        "symbol was sent).",
        labels=["kind"],
    )
    for kind in Kind:
        connections.add_metric([kind.value], hub.connections(kind))
        sent.add_metric([kind.value], hub.events_sent[kind])
        conflated.add_metric([kind.value], hub.conflated[kind])
    closed = CounterMetricFamily(
        "quotopia_core_push_closed",
        "Push connections ended, by kind and reason (client, slow, shutdown, limit, error).",
        labels=["kind", "reason"],
    )
    for kind in Kind:
        for reason in CloseReason:
            closed.add_metric([kind.value, reason.value], hub.closed[kind, reason])
    yield connections
    yield sent
    yield conflated
    yield closed


class RouteTemplates:
    """The route template of a request path, from a werkzeug url map.

    ``/quotes/<symbol>`` is shown as ``/quotes/{symbol}``, as in the OpenAPI
    document. The two hot routes are recognised without werkzeug.
    """

    def __init__(self, url_map: Map) -> None:
        self._adapter = url_map.bind("localhost")

    def __call__(self, path: str, method: str) -> str:
        if path == "/quotes" or path == "/quotes/stream":
            return path
        if path.startswith("/quotes/") and "/" not in path[8:] and len(path) > 8:
            return "/quotes/{symbol}"
        try:
            rule, _ = self._adapter.match(path, method, return_rule=True)
        except MethodNotAllowed as error:
            # The path exists, with other methods: name it by one of them.
            allowed = sorted(error.valid_methods or ())
            if not allowed:
                return UNMATCHED
            rule, _ = self._adapter.match(path, allowed[0], return_rule=True)
        except NotFound:
            return UNMATCHED
        except Exception:  # a redirect or a malformed path: not a route of ours
            return UNMATCHED
        return _template(rule.rule)


def _template(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


class MeasureRequests:
    """The app, with every HTTP request counted and timed in :class:`CoreMetrics`.

    A request is observed when the app returns: its status is the one the app
    sent, or :data:`CLIENT_GONE` if it sent none (the client left, and hypercorn
    cancelled the request). A WebSocket handshake is a request too (a ``GET``):
    101 if accepted, else the status of the answer; like the event stream, it is
    counted but not timed (:data:`STREAMING_ROUTES`).
    """

    def __init__(self, app: ASGIFramework, metrics: CoreMetrics, routes: RouteTemplates) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = routes

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = CLIENT_GONE

        async def send_and_note_status(message: ASGISendEvent) -> None:
            nonlocal status
            if (
                message["type"] == "http.response.start"
                or message["type"] == "websocket.http.response.start"
            ):
                status = message["status"]
            elif message["type"] == "websocket.accept":
                status = 101
            await send(message)

        method = scope["method"] if scope["type"] == "http" else "GET"
        try:
            if tracing.enabled():
                await self._traced(scope, receive, send_and_note_status, method, lambda: status)
            else:
                await self._app(scope, receive, send_and_note_status)
        finally:
            route = self._routes(scope["path"], method)
            self._metrics.observe_request(
                route,
                method,
                status,
                None if route in STREAMING_ROUTES else time.perf_counter() - started,
            )

    async def _traced(
        self,
        scope: HTTPScope | WebsocketScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        method: str,
        status: Callable[[], int],
    ) -> None:
        """The request in a SERVER span named ``METHOD ROUTE`` (the route template,
        as the metrics label it), continuing the caller's trace if it sent one."""
        route = self._routes(scope["path"], method)
        attributes = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope["scheme"],
        }
        if route != UNMATCHED:
            attributes["http.route"] = route
        with _tracer.start_as_current_span(
            # A path that matches no route is named by its method alone (semconv).
            method if route == UNMATCHED else f"{method} {route}",
            context=tracing.context_from_http_headers(scope["headers"]),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            try:
                await self._app(scope, receive, send)
            finally:
                code = status()
                if code != CLIENT_GONE:
                    span.set_attribute("http.response.status_code", code)
                if code >= 500:
                    span.set_attribute("error.type", str(code))
                    span.set_status(StatusCode.ERROR)
