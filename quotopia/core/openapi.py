"""Core's OpenAPI 3.1 description, generated from the routes, and its docs page.

:func:`serve_docs` puts quart-schema on the app: ``GET /openapi.json`` is the
document, built from the routes' docstrings and :func:`documented` decorations;
``GET /docs`` is Swagger UI, whose assets Core serves itself from
``static/swagger-ui/`` (vendored, see its README), so the page works offline.

The models below only *describe* the bodies: the routes write their JSON
themselves (the two hot ones as prepared bytes, see :mod:`quotopia.core.store`),
and tests/test_openapi.py checks that real answers match these schemas. Every
model forbids extra members, so the schemas say exactly which members there are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel
from quart import Quart
from quart_schema import (
    QuartSchema,
    document_headers,
    document_querystring,
    document_response,
    operation_id,
    tag,
)
from quart_schema.openapi import Info, OpenAPIProvider, Tag
from quart_schema.typing import Model
from werkzeug.routing import BaseConverter, Rule

from quotopia import __version__

__all__ = [
    "STATIC_FOLDER",
    "TAGS",
    "Alive",
    "BadParameter",
    "Candle",
    "CandleParameters",
    "Candles",
    "CoreOpenAPI",
    "EventStream",
    "Feed",
    "Health",
    "HistoryPage",
    "HistoryParameters",
    "HistoryUnavailableBody",
    "InternalError",
    "MapLink",
    "MapNode",
    "MethodNotAllowed",
    "MetricsText",
    "NoQuotesYet",
    "NotReady",
    "Page",
    "PathNotFound",
    "Prices",
    "Quote",
    "QuoteNotFound",
    "Ready",
    "RecentQuotes",
    "StreamHeaders",
    "StreamQuery",
    "StreamedQuote",
    "SymbolNotFound",
    "SystemMap",
    "TooLarge",
    "UnknownSymbols",
    "UpgradeRequired",
    "Version",
    "document_query",
    "document_stream",
    "documented",
    "serve_docs",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Core's static files: only the docs page's assets.
STATIC_FOLDER = Path(__file__).parent / "static"
_SWAGGER_UI = "static/swagger-ui"

TAGS = [
    Tag(name="quotes", description="The latest prices, as FT's feed brought them."),
    Tag(name="health", description="Liveness, readiness and the state of the feed."),
    Tag(name="history", description="Stored quotes and candles, from the history database."),
    Tag(name="push", description="Every quote as Core receives it: Server-Sent Events."),
    Tag(name="dashboard", description="The live dashboard and the system map it draws."),
    Tag(name="service", description="Build information and Prometheus metrics."),
]

DESCRIPTION = """\
Core keeps the latest quote of every symbol that FT streams, and serves it over HTTP.

Every response is JSON (`application/json`), errors included, except `/metrics`
(Prometheus' text format), the event stream (`/quotes/stream`) and the docs page
(`/docs`). A path not listed here answers `404 {"error": "not found", "path": ...}`;
a method other than `GET` or `HEAD` answers `405 {"error": "method not allowed",
"path": ...}` with an `Allow` header.

A WebSocket at `/ws` speaks a small JSON protocol (subscribe, unsubscribe, list,
ping), described in docs/push.md: OpenAPI has no words for WebSockets.
"""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Feed(_Body):
    """The feed from FT, as Core sees it."""

    connected: bool = Field(description="Is a stream from FT open now?")
    last_update_age_seconds: float | None = Field(
        ge=0, description="Seconds since the last quote arrived (`null` before the first)."
    )
    reconnects: int = Field(ge=0, description="How often the feed was re-established.")


class Health(_Body):
    """Core answers; how its feed is doing."""

    status: Literal["healthy"]
    time: datetime = Field(description="Now, in RFC 3339, UTC, whole seconds.")
    feed: Feed


class Alive(_Body):
    """The process and its event loop answer."""

    status: Literal["alive"]


class Ready(_Body):
    """Send traffic: Core serves prices (`degraded`: the last known ones, FT being down)."""

    status: Literal["ready", "degraded"]
    feed: Feed


class NotReady(_Body):
    """Send no traffic: Core has no whole snapshot yet (`starting`), or is stopping
    (`draining`)."""

    status: Literal["starting", "draining"]
    feed: Feed


class Version(_Body):
    """What build of Core this is."""

    version: str = Field(description="Quotopia's version.")
    commit: str | None = Field(description="The git commit, `null` when unknown.")
    python_version: str


class Prices(RootModel[dict[str, float]]):
    """The latest price of every symbol, by canonical symbol (`{}` before the first quote)."""


class Quote(_Body):
    """A symbol's latest quote."""

    symbol: str = Field(description="The canonical symbol, e.g. `BTC`.")
    price: float
    time: datetime | None = Field(
        description="When FT generated the price: RFC 3339, UTC, milliseconds; `null` if FT "
        "sent none."
    )
    change_percent: float = Field(
        description="Change from the previous price, in percent, to 4 places."
    )
    sequence: int = Field(
        ge=0, le=2**64 - 1, description="Per-symbol sequence number: a gap is a lost update."
    )
    age_seconds: float = Field(ge=0, description="Seconds since Core received the quote.")


class SymbolNotFound(_Body):
    """Core has no quote of this symbol."""

    error: Literal["not found"]
    symbol: str = Field(description="The symbol as requested.")


class PathNotFound(_Body):
    """No such path."""

    error: Literal["not found"]
    path: str


class QuoteNotFound(RootModel[SymbolNotFound | PathNotFound]):
    """An unknown symbol; or a path that is no symbol (one with a `/` in it)."""


class MethodNotAllowed(_Body):
    """A method other than GET or HEAD: the `Allow` header lists those the path takes."""

    error: Literal["method not allowed"]
    path: str


class AllowHeader(BaseModel):
    allow: str = Field(description="The methods the path takes, e.g. `GET, HEAD`.")


class TooLarge(_Body):
    """The request announced a body over 16 MiB."""

    error: Literal["request entity too large"]
    path: str


class InternalError(_Body):
    """A bug: Core's log has the traceback."""

    error: Literal["internal server error"]


class TextBody(RootModel[str]):
    """A body that is text, not JSON, in one of :attr:`media_types`."""

    media_types: ClassVar[tuple[str, ...]] = ("text/plain",)


class EventStream(TextBody):
    """Server-Sent Events (`text/event-stream`), until the client leaves or Core stops."""

    media_types = ("text/event-stream",)


class StreamQuery(BaseModel):
    symbols: str | None = Field(
        default=None,
        description="Comma-separated symbols to stream, in any case (`BTC,eth`); all if absent.",
        examples=["BTC,ETH"],
    )
    last_event_id: str | None = Field(
        default=None,
        description="Resume after this event id, as the `Last-Event-ID` header does (which "
        "wins if both are given): for a first connection that already holds quotes.",
    )


class StreamHeaders(BaseModel):
    last_event_id: str | None = Field(
        default=None,
        description="The id of the last event received, to resume after it (browsers "
        "send it by themselves when they reconnect).",
    )


class UnknownSymbols(_Body):
    """A symbol Core has no quotes of, or `symbols=` naming none."""

    error: Literal["unknown symbol", "no symbols"]
    symbols: list[str] | None = Field(default=None, description="The unknown symbols.")
    detail: str | None = None


class NoQuotesYet(_Body):
    """Core has no quotes from FT yet, so it cannot tell which symbols exist."""

    error: Literal["no quotes yet"]
    detail: str


class StreamedQuote(_Body):
    """A quote as the push protocols and the recent history carry it."""

    symbol: str
    price: float
    time: datetime | None
    change_percent: float
    sequence: int = Field(ge=0, le=2**64 - 1)


class RecentQuotes(_Body):
    """The quotes of one symbol Core still holds (its last 600), oldest first."""

    symbol: str = Field(description="The canonical symbol.")
    last_event_id: str = Field(
        description="Resume the event stream after this (`/quotes/stream?last_event_id=`) "
        "to miss nothing that came after these."
    )
    quotes: list[StreamedQuote]


INTERVAL_NAMES = Literal["1s", "1m", "5m", "1h", "1d"]

_TIME_TEXT = "RFC 3339 with a UTC offset (`2026-12-02T18:00:00Z`) or Unix seconds (`1764698400.25`)"


class HistoryQuote(_Body):
    """A stored quote: the fields of the push protocols' quotes, and the FT run's id."""

    symbol: str
    price: float
    time: datetime = Field(description="When FT generated the price: RFC 3339, UTC, milliseconds.")
    change_percent: float
    sequence: int = Field(ge=0, le=2**63 - 1, description="FT's sequence number in its run.")
    run_id: str = Field(
        pattern=r"^[1-9][0-9]{0,18}$",
        description="Which FT run generated the quote (a 63-bit number, in decimal: more "
        "than a JavaScript number holds). `(run_id, sequence)` names a quote for good.",
    )


class HistoryPage(_Body):
    """One page of a symbol's stored quotes."""

    symbol: str = Field(description="The canonical symbol.")
    order: Literal["asc", "desc"]
    quotes: list[HistoryQuote]
    next_cursor: str | None = Field(
        description="Send it back as `cursor` (with the same `order`) for the next page; "
        "`null`: this page is the last."
    )


class Candle(_Body):
    """One interval's open, high, low and close, and how many quotes it holds."""

    time: datetime = Field(description="The interval's start: RFC 3339, UTC, milliseconds.")
    open: float
    high: float
    low: float
    close: float
    count: int = Field(ge=1)


class Candles(_Body):
    """A symbol's candles over a window, oldest first; intervals without quotes left out."""

    symbol: str = Field(description="The canonical symbol.")
    interval: INTERVAL_NAMES
    from_: datetime = Field(alias="from", description="The window's start, inclusive.")
    to: datetime = Field(description="The window's end, exclusive.")
    candles: list[Candle]


class BadParameter(_Body):
    """A query parameter Core cannot take; `parameter` names it."""

    error: Literal["bad parameter"]
    parameter: str
    detail: str


class HistoryUnavailableBody(_Body):
    """No history now: no database configured, no schema in it, or no reaching it."""

    model_config = ConfigDict(extra="forbid", title="HistoryUnavailable")

    error: Literal["history unavailable"]
    detail: str


class HistoryParameters(BaseModel):
    from_: str | None = Field(
        default=None,
        alias="from",
        description=f"Quotes from this time on (inclusive): {_TIME_TEXT}.",
        examples=["2026-12-02T18:00:00Z"],
    )
    to: str | None = Field(
        default=None,
        description=f"Quotes before this time (exclusive): {_TIME_TEXT}.",
        examples=["2026-12-02T19:00:00Z"],
    )
    limit: int | None = Field(
        default=None, ge=1, le=1000, description="Quotes per page: 1 to 1000, 100 if absent."
    )
    order: Literal["asc", "desc"] | None = Field(
        default=None, description="`desc` (newest first, the default) or `asc` (oldest first)."
    )
    cursor: str | None = Field(
        default=None,
        description="The `next_cursor` of the previous page (of the same symbol and order).",
    )


class CandleParameters(BaseModel):
    interval: INTERVAL_NAMES = Field(description="The width of a candle.")
    from_: str | None = Field(
        default=None,
        alias="from",
        description=f"The window's start, rounded down to an interval: {_TIME_TEXT}. "
        "Default: 60 intervals before `to`.",
        examples=["2026-12-02T18:00:00Z"],
    )
    to: str | None = Field(
        default=None,
        description=f"The window's end, rounded up to an interval: {_TIME_TEXT}. Default: now.",
        examples=["2026-12-02T19:00:00Z"],
    )


class MapNode(_Body):
    """A service, and how it is doing."""

    id: str
    name: str
    role: str
    up: bool
    address: str | None = None
    requests_per_second: float | None = Field(default=None, ge=0)
    symbols: int | None = Field(default=None, ge=0)
    push_connections: dict[str, int] | None = None


class MapLink(_Body):
    """A connection between two services, and its state."""

    from_: str = Field(alias="from")
    to: str
    kind: str
    up: bool
    last_quote_age_seconds: float | None = Field(default=None, ge=0)
    reconnects: int | None = Field(default=None, ge=0)
    push_connections: int | None = Field(default=None, ge=0)


class SystemMap(_Body):
    """Quotopia's services and links as Core sees them now: the dashboard's map."""

    nodes: list[MapNode]
    links: list[MapLink]


class Page(TextBody):
    """An HTML page."""

    media_types = ("text/html",)


class UpgradeRequired(_Body):
    """A plain HTTP request to the WebSocket's path."""

    error: Literal["upgrade required"]
    detail: str


class RetryAfterHeader(BaseModel):
    retry_after: int = Field(description="Seconds to wait before asking again.")


class MetricsText(TextBody):
    """Prometheus' text format 0.0.4; OpenMetrics 1.0.0 if the Accept header asks for it."""

    media_types = ("text/plain", "application/openmetrics-text")


#: More about the routes' path parameters, by name, than their converters say.
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "symbol": {"description": "A symbol FT streams, in any case (`BTC`, `btc`).", "example": "BTC"},
}

#: The answers any route can give besides its own.
_ANY_ROUTE: dict[int, tuple[type[BaseModel], type[BaseModel] | None]] = {
    405: (MethodNotAllowed, AllowHeader),
    413: (TooLarge, None),
    500: (InternalError, None),
}


def documented(
    tag_name: str, responses: Mapping[int, type[BaseModel]], *, name: str | None = None
) -> Callable[[F], F]:
    """Describe a route: its tag, its bodies by status, and the errors of every route.

    ``name`` overrides the operation's id (``get_`` + the function's name).
    Documentation only: the route's answers are unchanged.
    """

    def decorate(route: F) -> F:
        route = tag([tag_name])(route)
        if name is not None:
            route = operation_id(name)(route)
        every = {status: (model, None) for status, model in responses.items()} | _ANY_ROUTE
        for status, (model, headers) in every.items():
            route = document_response(model, status, headers)(route)
        return route

    return decorate


def document_query(model: type[BaseModel]) -> Callable[[F], F]:
    """Describe a route's query parameters by ``model``'s fields (documentation only)."""
    return document_querystring(model)


def document_stream(route: F) -> F:
    """Describe ``GET /quotes/stream``: its query, its header, its answers."""
    route = document_querystring(StreamQuery)(route)
    route = document_headers(StreamHeaders)(route)
    route = document_response(NoQuotesYet, 503, RetryAfterHeader)(route)
    return documented("push", {200: EventStream, 400: UnknownSymbols})(route)


class CoreOpenAPI(OpenAPIProvider):
    """quart-schema's generator, with text bodies, response headers and named bodies.

    quart-schema documents every body as ``application/json``, and puts a response's
    headers inside its ``content`` map, which makes the document invalid; here a
    :class:`TextBody` gets its own media types and headers go where OpenAPI puts
    them, in the response object. And each body is a component, named for its
    model, rather than a copy per route.
    """

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        for operations in paths.values():
            for operation in operations.values():
                # A docstring's body, without the blank line after its summary.
                if description := operation.pop("description", "").strip():
                    operation["description"] = description
                if not operation["parameters"]:
                    del operation["parameters"]
        return paths, components

    def build_querystring_parameters(
        self, model: type[Model]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parameters, components = super().build_querystring_parameters(model)
        # quart-schema reads "required" from each property, where JSON Schema never puts it.
        if isinstance(model, type) and issubclass(model, BaseModel):
            required = set(model.model_json_schema().get("required", ()))
            for parameter in parameters:
                if parameter["name"] in required:
                    parameter["required"] = True
        return parameters, components

    def build_path_parameter(self, name: str, converter: BaseConverter) -> dict[str, Any]:
        return super().build_path_parameter(name, converter) | PATH_PARAMETERS.get(name, {})

    def build_response_object(
        self, model: type[Model], headers_model: type[Model] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        response, definitions = super().build_response_object(model, None)
        schema = response["content"]["application/json"]["schema"]
        # A component of its own, as the models it refers to are: listed once, by name.
        definitions[schema["title"]] = schema
        body = {"schema": {"$ref": f"#/components/schemas/{schema['title']}"}}
        if isinstance(model, type) and issubclass(model, TextBody):
            response["content"] = dict.fromkeys(model.media_types, body)
        else:
            response["content"] = {"application/json": body}
        if isinstance(headers_model, type) and issubclass(headers_model, BaseModel):
            response["headers"] = _headers(headers_model)
        return response, definitions


def _headers(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI header objects for ``model``'s fields, ``retry_after`` as ``Retry-After``."""
    schema = model.model_json_schema()
    headers: dict[str, Any] = {}
    for field, header_schema in schema["properties"].items():
        header_schema.pop("title", None)
        header: dict[str, Any] = {"required": field in schema.get("required", ())}
        if description := header_schema.pop("description", None):
            header["description"] = description
        header["schema"] = header_schema
        headers["-".join(word.capitalize() for word in field.split("_"))] = header
    return headers


def serve_docs(app: Quart) -> None:
    """Serve the OpenAPI document at ``GET /openapi.json``, Swagger UI at ``GET /docs``
    and its assets at ``GET /static/...``.

    Call it once the app's config is set: the routes it adds read
    ``PROVIDE_AUTOMATIC_OPTIONS``. The app must have been made with
    ``static_folder=None``, or Quart would have added its static route before that.
    """
    app.static_folder = STATIC_FOLDER
    app.add_url_rule(f"{app.static_url_path}/<path:filename>", "static", app.send_static_file)
    # Relative to /docs, so that the page also works mounted below a root path.
    app.config["QUART_SCHEMA_SWAGGER_JS_URL"] = f"{_SWAGGER_UI}/swagger-ui-bundle.js"
    app.config["QUART_SCHEMA_SWAGGER_CSS_URL"] = f"{_SWAGGER_UI}/swagger-ui.css"
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        # Not vendored: they would load their scripts from a CDN.
        redoc_ui_path=None,
        scalar_ui_path=None,
        info=Info(
            title="Quotopia Core",
            version=__version__,
            summary="The latest prices of FT's feed, over HTTP.",
            # No license: quart-schema 0.25 writes a License's unset members as nulls.
            description=DESCRIPTION,
        ),
        tags=list(TAGS),
        openapi_provider_class=CoreOpenAPI,
    )
