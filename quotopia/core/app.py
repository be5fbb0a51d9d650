"""Core's HTTP API: quart-trio routes over a :class:`QuoteStore`, and a fast path.

Every response of the API is JSON, errors included: an unknown path is a 404 JSON
body, a wrong method a 405 JSON body, never an HTML page. (The one page is the docs,
``GET /docs``; ``GET /openapi.json`` describes the API: see
:mod:`quotopia.core.openapi`.)

:func:`create_app` is the whole API. :class:`PreparedQuotes`, in front of it,
answers the two hot requests (``GET /quotes`` and ``GET /quotes/<symbol>``) with
the store's prepared bytes, as the app would, and hands everything else to it.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from quart import Response, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from quotopia.core.config import PushLimits
from quotopia.core.history import (
    HistoryReader,
    HistoryUnavailable,
    candles_body,
    page_body,
    storable,
)
from quotopia.core.metrics import CoreMetrics
from quotopia.core.openapi import (
    STATIC_FOLDER,
    Alive,
    BadParameter,
    CandleParameters,
    Candles,
    Health,
    HistoryPage,
    HistoryParameters,
    HistoryUnavailableBody,
    MetricsText,
    NotReady,
    Page,
    Prices,
    Quote,
    QuoteNotFound,
    Ready,
    RecentQuotes,
    SymbolNotFound,
    SystemMap,
    UpgradeRequired,
    Version,
    document_query,
    document_stream,
    documented,
    serve_docs,
)
from quotopia.core.probes import readiness
from quotopia.core.push.hub import PushHub
from quotopia.core.push.sse import SseStream
from quotopia.core.push.ws import serve_websocket
from quotopia.core.store import QuoteStore
from quotopia.core.system import SystemView, Upstream
from quotopia.history.request import ParameterError, candle_query, history_query
from quotopia.telemetry.metrics import build_info, exposition
from quotopia.telemetry.probes import LIVE, Lifecycle, ProbeAnswer

__all__ = ["PreparedQuotes", "create_app"]

logger = logging.getLogger("quotopia.core")

#: The dashboard's page; its script and styles are static files beside it.
DASHBOARD_PAGE = STATIC_FOLDER / "dashboard" / "index.html"


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _probe(answer: ProbeAnswer) -> Response:
    return _json(answer.body, answer.status)


def create_app(
    store: QuoteStore,
    metrics: CoreMetrics | None = None,
    lifecycle: Lifecycle | None = None,
    hub: PushHub | None = None,
    *,
    upstream: Upstream | None = None,
    history: HistoryReader | None = None,
) -> QuartTrio:
    """Build the app. It only reads ``store``; the feed consumer writes it.

    ``lifecycle`` is Core's phase (starting, serving, draining), for ``/readyz``;
    without one, the app counts as serving. ``hub`` serves the push routes (SSE
    and WebSocket); without one, a hub of the app's own with the default limits,
    whose watcher (heartbeats, slow clients) is not running. ``metrics`` is what
    ``/metrics`` shows; without it, a registry of the app's own. ``upstream`` is
    where Core's feed comes from, for the system map. ``history`` is the history
    database the history routes read; without one, they answer 503.
    """
    if lifecycle is None:
        lifecycle = Lifecycle()
        lifecycle.serving()
    serving = lifecycle
    if hub is None:
        hub = PushHub(store, PushLimits())
    push = hub
    if metrics is None:
        metrics = CoreMetrics(store, ready=lambda: readiness(serving, store).ok, hub=push)
    registry = metrics.registry
    stored = history if history is not None else HistoryReader(None)
    measured = metrics
    system = SystemView(store, push, upstream or Upstream())
    info = build_info("core")
    version = {
        "version": info["version"],
        "commit": info["commit"] or None,
        "python_version": info["python_version"],
    }
    # The static folder (the docs page's assets) comes with serve_docs, below.
    app = QuartTrio("quotopia.core", static_folder=None)
    # No automatic OPTIONS (an empty text/html 200): OPTIONS gets the JSON 405.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No "//" → "/" redirect: routing redirects skip the error handlers (an HTML 308).
    app.url_map.merge_slashes = False
    serve_docs(app)
    dashboard = DASHBOARD_PAGE.read_bytes()

    @app.before_request
    async def refuse_a_body_too_large() -> None:
        # The routes never read a body, so Quart's MAX_CONTENT_LENGTH check never runs.
        limit = app.config["MAX_CONTENT_LENGTH"]
        if limit is not None and (request.content_length or 0) > limit:
            raise RequestEntityTooLarge()

    @app.get("/")
    @documented("dashboard", {200: Page}, name="dashboard")
    async def dashboard_page() -> Response:
        """The live dashboard: prices, charts and the system map, pushed as they change."""
        return Response(dashboard, content_type="text/html; charset=utf-8")

    @app.get("/system")
    @documented("dashboard", {200: SystemMap}, name="system_map")
    async def system_map() -> Response:
        """Quotopia's services and the links between them, with their state now."""
        return _json(system.snapshot(time.monotonic(), measured.answered))

    @app.get("/health")
    @documented("health", {200: Health})
    async def health() -> Response:
        """Core's health and its feed's.

        Always 200 while Core answers: a feed that is down shows as
        `"connected": false`.
        """
        return _json(
            {"status": "healthy", "time": _rfc3339(datetime.now(UTC)), "feed": store.feed_status()}
        )

    @app.get("/livez")
    @documented("health", {200: Alive})
    async def livez() -> Response:
        """Liveness: Core's process and event loop answer."""
        return _probe(LIVE)

    @app.get("/readyz")
    @documented("health", {200: Ready, 503: NotReady})
    async def readyz() -> Response:
        """Readiness: should a load balancer send Core traffic now?

        503 while Core starts (no whole snapshot from FT yet) and while it drains
        after SIGTERM. FT being down is 200 `degraded`: Core serves the last prices.
        """
        return _probe(readiness(serving, store))

    @app.get("/version")
    @documented("service", {200: Version}, name="version")
    async def version_info() -> Response:
        """The build of Core: version, git commit and Python version."""
        return _json(version)

    @app.get("/metrics")
    @documented("service", {200: MetricsText}, name="metrics")
    async def metrics_text() -> Response:
        """Prometheus metrics: requests, the feed, the process.

        The catalogue is in docs/observability.md.
        """
        body, content_type = exposition(registry, request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    @app.get("/quotes")
    @documented("quotes", {200: Prices})
    async def quotes() -> Response:
        """The latest price of every symbol."""
        return Response(store.quotes_json(), content_type="application/json")

    @app.get("/quotes/stream")
    @document_stream
    async def quote_stream() -> Response:
        """Server-Sent Events: a snapshot, then every quote as Core receives it.

        Events: `snapshot` (the latest quote of each symbol), `quote` (one per
        update), `feed` (the feed's state, at the start and on every change),
        `reset` (a `Last-Event-ID` that could not be resumed), and a comment
        heartbeat every 15 s. Send back the last event's id as `Last-Event-ID`
        (browsers do) to resume without loss or duplicates while Core holds the
        events (the last 600 per symbol). The protocol is in docs/push.md.
        """
        selected = _selected_symbols(store, request.args.getlist("symbols"))
        if isinstance(selected, Response):
            return selected
        # The header (a browser's reconnect) wins: it is newer than the URL.
        last_event_id = request.headers.get("Last-Event-ID", request.args.get("last_event_id"))
        body = SseStream(
            push,
            selected,
            last_event_id,
            request.scope.get("client"),
            request.scope.get("http_version", "1.1"),
        )
        response = Response(body, content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        # nginx buffers responses unless told not to; a stream must not wait.
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None  # Quart's default ends a response after 60 s
        return response

    @app.get("/ws")
    @documented("push", {426: UpgradeRequired}, name="websocket")
    async def websocket_without_upgrade() -> Response:
        """A WebSocket: subscribe to symbols and receive their quotes as JSON.

        Connect with a WebSocket client (`new WebSocket("ws://HOST:8080/ws")`,
        `websocat`, `python -m websockets`), then send
        `{"op": "subscribe", "symbols": ["BTC"]}`. The protocol (operations,
        messages, errors and close codes) is in docs/push.md. A plain HTTP request
        gets 426.
        """
        response = _json(
            {
                "error": "upgrade required",
                "detail": "/ws is a WebSocket: connect with a WebSocket client",
            },
            426,
        )
        response.headers["Upgrade"] = "websocket"
        response.headers["Connection"] = "Upgrade"
        return response

    @app.websocket("/ws")
    async def quote_socket() -> None:
        await serve_websocket(
            push,
            websocket.scope.get("client"),
            websocket.accept,
            websocket.receive,
            websocket.send,
            websocket.close,
        )

    @app.get("/quotes/<symbol>/recent")
    @documented("quotes", {200: RecentQuotes, 404: SymbolNotFound})
    async def recent_quotes(symbol: str) -> Response:
        """The quotes of one symbol Core still holds (the last 600), oldest first.

        What the dashboard's charts start from; resume the event stream after
        `last_event_id` to continue without a gap.
        """
        found = store.get(symbol)
        if found is None:
            return _json({"error": "not found", "symbol": symbol}, 404)
        recent = store.recent
        held = ", ".join(event.json for event in recent.of(found.symbol))
        head = json.dumps({"symbol": found.symbol, "last_event_id": recent.full_id(recent.last_id)})
        body = head[:-1] + ', "quotes": [' + held + "]}"
        return Response(body, content_type="application/json")

    @app.get("/quotes/<symbol>/history")
    @document_query(HistoryParameters)
    @documented(
        "history",
        {200: HistoryPage, 400: BadParameter, 404: SymbolNotFound, 503: HistoryUnavailableBody},
    )
    async def quote_history(symbol: str) -> Response:
        """A symbol's stored quotes, a page at a time, from the history database.

        Newest first (`order=desc`, the default) or oldest first (`order=asc`),
        `limit` per page (100 unless asked, at most 1000), within `from` (inclusive)
        and `to` (exclusive) if given. For the next page, send `next_cursor` back as
        `cursor` with the same `order`; `null` means this page is the last. Pages
        are keyset pages: quotes stored meanwhile never shift them, and no quote
        comes twice.
        """
        name, known = _symbol(store, symbol)
        try:
            query = history_query(name, _arguments(("from", "to", "limit", "order", "cursor")))
        except ParameterError as error:
            return _bad_parameter(error)
        if not known and not storable(name):
            return _json({"error": "not found", "symbol": symbol}, 404)
        try:
            page = await stored.page(query, known=known)
        except HistoryUnavailable as unavailable:
            return _history_unavailable(unavailable)
        if page is None:
            return _json({"error": "not found", "symbol": symbol}, 404)
        return _json(page_body(query, *page))

    @app.get("/quotes/<symbol>/candles")
    @document_query(CandleParameters)
    @documented(
        "history",
        {200: Candles, 400: BadParameter, 404: SymbolNotFound, 503: HistoryUnavailableBody},
    )
    async def quote_candles(symbol: str) -> Response:
        """Open, high, low and close of a symbol's stored quotes, per interval.

        `interval` is one of `1s`, `1m`, `5m`, `1h`, `1d`; buckets are aligned to
        whole intervals since the Unix epoch (UTC). The window is `from` (rounded
        down to an interval) to `to` (rounded up; default: now), at most 1000
        intervals; without `from`, the 60 intervals up to `to`. Intervals without
        quotes have no candle. Oldest first.
        """
        name, known = _symbol(store, symbol)
        try:
            query = candle_query(
                name, _arguments(("interval", "from", "to")), time.time_ns() // 1000
            )
        except ParameterError as error:
            return _bad_parameter(error)
        if not known and not storable(name):
            return _json({"error": "not found", "symbol": symbol}, 404)
        try:
            found = await stored.candles(query, known=known)
        except HistoryUnavailable as unavailable:
            return _history_unavailable(unavailable)
        if found is None:
            return _json({"error": "not found", "symbol": symbol}, 404)
        return _json(candles_body(query, found))

    @app.get("/quotes/<symbol>")
    @documented("quotes", {200: Quote, 404: QuoteNotFound})
    async def quote(symbol: str) -> Response:
        """The latest quote of one symbol, matched case-insensitively.

        The answer names the canonical symbol. `age_seconds` grows while FT is
        down and Core serves the last known price.
        """
        body = store.quote_json(symbol)
        if body is None:
            return _json({"error": "not found", "symbol": symbol}, 404)
        return Response(body, content_type="application/json")

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = error.code or 500
        body: dict[str, object] = {"error": (error.name or "error").lower(), "path": _path()}
        if has_websocket_context():
            # A WebSocket handshake to a path that is no WebSocket route.
            body["detail"] = "WebSocket connections go to /ws"
        response = _json(body, code)
        if code == 405 and error.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        method = "WEBSOCKET" if has_websocket_context() else request.method
        logger.error("unhandled error on %s %s", method, _path(), exc_info=error)
        return _json({"error": "internal server error"}, 500)

    return app


def _path() -> str:
    """The path of the request being answered: an HTTP request, or a WebSocket
    handshake (a handshake to a path that is no WebSocket route gets the same JSON
    errors as any request)."""
    return websocket.path if has_websocket_context() else request.path


def _symbol(store: QuoteStore, symbol: str) -> tuple[str, bool]:
    """``symbol`` canonically spelled, and whether the store has it. A symbol the
    store does not have is looked for in the database in upper case, as FT spells
    every symbol."""
    found = store.get(symbol)
    return (symbol.upper(), False) if found is None else (found.symbol, True)


def _arguments(names: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters (the first value of each); an unknown one is a
    :class:`ParameterError`, so that a typo (``form=``) is not silently ignored."""
    for name in request.args:
        if name not in names:
            raise ParameterError(name, f"unknown parameter: this route takes {', '.join(names)}")
    return request.args.to_dict()


def _bad_parameter(error: ParameterError) -> Response:
    return _json(
        {"error": "bad parameter", "parameter": error.parameter, "detail": error.detail}, 400
    )


def _history_unavailable(unavailable: HistoryUnavailable) -> Response:
    return _json({"error": "history unavailable", "detail": unavailable.detail}, 503)


def _selected_symbols(store: QuoteStore, values: list[str]) -> list[str] | Response | None:
    """The symbols a ``?symbols=BTC,eth`` parameter selects, canonically spelled
    (None: every symbol), or the error response."""
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        return _json({"error": "no symbols", "detail": "symbols= names no symbol"}, 400)
    if not store.has_snapshot:
        response = _json(
            {"error": "no quotes yet", "detail": "Core has no quotes from FT yet; retry soon"}, 503
        )
        response.headers["Retry-After"] = "1"
        return response
    selected: list[str] = []
    unknown: list[str] = []
    for name in names:
        found = store.get(name)
        if found is None:
            unknown.append(name)
        elif found.symbol not in selected:
            selected.append(found.symbol)
    if unknown:
        return _json({"error": "unknown symbol", "symbols": unknown}, 400)
    return selected


class PreparedQuotes:
    """The app, with ``GET /quotes`` and ``GET /quotes/<symbol>`` answered directly.

    Why: these two are nearly all of Core's traffic, and their bodies are ready
    in the store. Through Quart, each request also costs a nursery with two tasks, a
    request context, routing and a response object: about half of Core's CPU time
    per request. Answered here, a request costs what hypercorn itself costs.

    It answers only requests whose answer it can give exactly as the app would
    (tests/test_core_app.py compares the bytes on the wire): a ``GET`` of
    ``/quotes``, or of ``/quotes/<symbol>`` for a symbol the store has, with no
    request body. Everything else (other methods and paths, HEAD, unknown symbols,
    requests with a body, every error) goes to the app unchanged, and so do
    lifespan and websocket events.
    """

    def __init__(self, app: ASGIFramework, store: QuoteStore) -> None:
        self._app = app
        self._store = store

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        body = self._prepared(scope) if scope["type"] == "http" else None
        if body is None:
            await self._app(scope, receive, send)
            return
        # The headers Quart sends for a Response(body, content_type=...), in its order.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ],
                "trailers": False,
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _prepared(self, scope: HTTPScope) -> bytes | None:
        """The body the app would answer ``scope`` with, or None to let it answer."""
        if scope["method"] != "GET" or scope.get("root_path", ""):
            return None
        path = scope["path"]
        if path == "/quotes":
            body: bytes | None = self._store.quotes_json()
        elif path == "/quotes/stream":
            return None  # a route of its own, even if FT ever streams a symbol "STREAM"
        elif path.startswith("/quotes/"):
            symbol = path[len("/quotes/") :]
            # The route's <symbol> is one non-empty path segment. None for an unknown
            # symbol: the app writes its 404.
            body = self._store.quote_json(symbol) if symbol and "/" not in symbol else None
        else:
            return None
        if body is None or _has_body(scope):
            return None
        return body


def _has_body(scope: HTTPScope) -> bool:
    """Does the request announce a body? (The app may refuse it as too large.)"""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
        for name, value in scope["headers"]
    )
