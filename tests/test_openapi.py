"""Core's OpenAPI document (``GET /openapi.json``) and docs page (``GET /docs``).

The document is checked three ways: it is valid OpenAPI 3.1; it describes every
route of the app; and Core's real answers, every documented status of every
route, match the schema it gives for them (jsonschema, over the document's own
components). Then, against a real Core: the same answers through hypercorn, the
docs page loading nothing from outside Core, and a schemathesis run.

Answers come from quart-trio's test client, except the docs page's assets: the
test client (quart-trio 0.12) deadlocks on a file body of more than ten 8 KiB
chunks, so those are fetched from a real Core.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from _procs import wait_until
from _services import DEADLINE, Service, running_core, running_ft
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import OpenAPIV31SpecValidator
from quart.typing import TestClientProtocol as Client
from quart_trio import QuartTrio
from sqlalchemy import create_engine
from sqlalchemy.engine import URL

from quotopia import __version__
from quotopia.core.app import create_app
from quotopia.core.config import PushLimits
from quotopia.core.history import HistoryReader
from quotopia.core.openapi import STATIC_FOLDER
from quotopia.core.push.hub import PushHub
from quotopia.core.store import QuoteStore
from quotopia.core.system import Upstream
from quotopia.history import queries
from quotopia.history.database import parse_database_url, upgrade
from quotopia.history.queries import StoredQuote
from quotopia.telemetry.probes import Lifecycle

pytestmark = pytest.mark.anyio

#: Endpoints that serve the documentation rather than the API: not in the document.
DOCS_ENDPOINTS = frozenset({"openapi", "swagger_ui", "static"})

#: A request path for each documented path template.
PATHS = {
    "/": "/",
    "/system": "/system",
    "/health": "/health",
    "/livez": "/livez",
    "/readyz": "/readyz",
    "/version": "/version",
    "/metrics": "/metrics",
    "/quotes": "/quotes",
    "/quotes/{symbol}": "/quotes/BTC",
    "/quotes/{symbol}/recent": "/quotes/BTC/recent",
    "/quotes/{symbol}/history": "/quotes/BTC/history",
    "/quotes/{symbol}/candles": "/quotes/BTC/candles?interval=1m",
    # A stream never ends: requests here are those answered at once.
    "/quotes/stream": "/quotes/stream?symbols=DOGE",
    "/ws": "/ws",
}

TOO_LARGE = {"Content-Length": str(16 * 1024 * 1024 + 1)}
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}

#: Formats are checked only if their checkers are installed (date-time needs the
#: rfc3339-validator package); test_formats_are_checked makes sure.
FORMATS = FormatChecker()


@pytest.fixture
def anyio_backend() -> str:
    # quart-trio's app and test client run on Trio only.
    return "trio"


@dataclass(frozen=True)
class Case:
    """One request, and the documented answer it must get."""

    #: The state of Core: see :func:`core_in`.
    state: str
    method: str
    path: str
    #: The path template of the operation that documents the answer.
    template: str
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = "+" + ",".join(self.headers) if self.headers else ""
        return f"{self.state}:{self.method}:{self.path}{extra}:{self.status}"


CASES = [
    Case("empty", "GET", "/health", "/health", 200),
    Case("fed", "GET", "/health", "/health", 200),
    Case("fed", "GET", "/livez", "/livez", 200),
    Case("fed", "GET", "/readyz", "/readyz", 200),
    Case("feed down", "GET", "/readyz", "/readyz", 200),
    Case("empty", "GET", "/readyz", "/readyz", 503),
    Case("starting", "GET", "/readyz", "/readyz", 503),
    Case("draining", "GET", "/readyz", "/readyz", 503),
    Case("fed", "GET", "/version", "/version", 200),
    Case("fed", "GET", "/metrics", "/metrics", 200),
    Case("fed", "GET", "/metrics", "/metrics", 200, OPENMETRICS),
    Case("empty", "GET", "/quotes", "/quotes", 200),
    Case("fed", "GET", "/quotes", "/quotes", 200),
    Case("fed", "GET", "/quotes/btc", "/quotes/{symbol}", 200),
    Case("fed", "GET", "/quotes/ETH", "/quotes/{symbol}", 200),  # "time": null
    Case("fed", "GET", "/quotes/DOGE", "/quotes/{symbol}", 404),
    Case("empty", "GET", "/quotes/BTC", "/quotes/{symbol}", 404),
    # The symbol "a/b": no symbol at all, the generic 404.
    Case("fed", "GET", "/quotes/a%2Fb", "/quotes/{symbol}", 404),
    Case("fed", "GET", "/", "/", 200),
    Case("fed", "GET", "/system", "/system", 200),
    Case("feed down", "GET", "/system", "/system", 200),
    Case("empty", "GET", "/system", "/system", 200),
    Case("fed", "GET", "/quotes/btc/recent", "/quotes/{symbol}/recent", 200),
    Case("fed", "GET", "/quotes/DOGE/recent", "/quotes/{symbol}/recent", 404),
    # History: pages (one with a next cursor), candles, and each of their errors.
    *(
        Case(
            state,
            "GET",
            f"/quotes/{path}",
            "/quotes/{symbol}/" + path.split("?")[0].split("/")[1],
            status,
        )
        for state, path, status in [
            ("history", "btc/history?limit=2", 200),
            ("history", "BTC/history?order=asc&from=2020-01-01T00:00:00Z", 200),
            ("history", "OLD/history", 200),  # only the database has it
            ("history", "btc/candles?interval=1m", 200),
            ("history", "btc/history?limit=0", 400),
            ("history", "btc/history?from=noon", 400),
            ("history", "btc/history?cursor=nope", 400),
            ("history", "btc/candles", 400),
            ("history", "btc/candles?interval=2m", 400),
            ("history", "DOGE/history", 404),
            ("history", "DOGE/candles?interval=1h", 404),
            ("fed", "BTC/history", 503),
            ("fed", "BTC/candles?interval=1m", 503),
            ("no schema", "BTC/history", 503),
            ("no schema", "BTC/candles?interval=1m", 503),
            ("unreachable", "BTC/history", 503),
            ("unreachable", "BTC/candles?interval=1d", 503),
        ]
    ),
    # A stream that ends at once: Core is shutting down.
    Case("closing", "GET", "/quotes/stream", "/quotes/stream", 200),
    Case("fed", "GET", "/quotes/stream?symbols=BTC,doge", "/quotes/stream", 400),
    Case("fed", "GET", "/quotes/stream?symbols=,", "/quotes/stream", 400),
    Case("empty", "GET", "/quotes/stream?symbols=BTC", "/quotes/stream", 503),
    Case("fed", "GET", "/ws", "/ws", 426),
    # What every route can answer. (OpenAPI lists a 405 under the GET operation of
    # the path, the one operation it has.)
    *(Case("fed", "POST", path, template, 405) for template, path in PATHS.items()),
    *(Case("fed", "GET", path, template, 413, TOO_LARGE) for template, path in PATHS.items()),
    *(Case("broken", "GET", path, template, 500) for template, path in PATHS.items()),
]


def core_in(state: str, stack: ExitStack | None = None, tmp: Path | None = None) -> QuartTrio:
    """Core's app, in ``state``.

    ``empty``: no feed yet. ``fed``: a snapshot of three quotes (and no history
    database). ``feed down``: fed, then the feed was lost. ``starting``,
    ``draining``: the lifecycle's phases. ``closing``: fed, and the push hub closed
    (as on shutdown: event streams end). ``broken``: every request fails on a bug.
    With a history database (in ``tmp``, its resources closed by ``stack``), fed:
    ``history`` (migrated, quotes of BTC and OLD in it), ``no schema`` (a SQLite
    file that does not exist), ``unreachable`` (PostgreSQL on a port that refuses).
    """
    history = None
    if state in HISTORY_STATES:
        assert stack is not None
        assert tmp is not None
        history = stack.enter_context(HistoryReader(history_url(state, stack, tmp)))
    store = QuoteStore()
    lifecycle = Lifecycle()
    if state != "starting":
        lifecycle.serving()
    if state == "draining":
        lifecycle.draining()
    if state != "empty":
        store.feed_up(snapshot_size=3)
        store.apply("BTC", 95432.12, None, 0.034, 7)
        store.apply("ETH", 2650.2, None, 0.0, 1)
        store.apply("SBER", 275.5, None, -0.1, 3)
        # A quote with a time, now (or the feed's latency would be negative).
        store.apply("BTC", 95433.0, datetime.now(UTC), 0.001, 8)
    if state == "feed down":
        store.feed_down()
    hub = PushHub(store, PushLimits())
    if state == "closing":
        hub.close()
    app = create_app(
        store, lifecycle=lifecycle, hub=hub, upstream=Upstream("127.0.0.1:50051"), history=history
    )
    if state == "broken":

        @app.before_request
        async def fail() -> None:
            raise RuntimeError("a bug, on purpose")

    return app


HISTORY_STATES = frozenset({"history", "no schema", "unreachable"})


def history_url(state: str, stack: ExitStack, tmp: Path) -> URL:
    """The history database of ``state`` (see :func:`core_in`)."""
    if state == "unreachable":
        refusing = stack.enter_context(socket.socket())
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        text = f"postgresql://quotopia@127.0.0.1:{refusing.getsockname()[1]}/quotopia"
    else:
        text = f"sqlite:///{tmp / 'history.db'}"
    url = parse_database_url(text)
    assert url is not None
    if state == "history":
        upgrade(url)
        now_us = time.time_ns() // 1000
        rows = [
            StoredQuote(symbol, 2**63 - 1, n, now_us - (10 - n) * 1_000_000, 100.0 + n, 0.01)
            for symbol in ("BTC", "OLD")
            for n in range(1, 6)
        ]
        engine = create_engine(url)
        try:
            with engine.begin() as connection:
                queries.insert_quotes(connection, rows)
        finally:
            engine.dispose()
    return url


async def document(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    spec: dict[str, Any] = json.loads(await response.get_data(as_text=True))
    return spec


@pytest.fixture
async def spec() -> dict[str, Any]:
    return await document(create_app(QuoteStore()).test_client())


def check_answer(
    spec: Mapping[str, Any],
    template: str,
    status: int,
    content_type: str,
    headers: Mapping[str, str],
    body: bytes,
) -> None:
    """Is this answer one that ``template``'s operation documents, body included?"""
    responses = spec["paths"][template]["get"]["responses"]
    assert str(status) in responses, f"GET {template}: {status} is not documented"
    documented = responses[str(status)]
    media_type = content_type.split(";")[0].strip()
    assert media_type in documented["content"], (template, status, content_type)
    lower = {name.lower() for name in headers}
    for name, header in documented.get("headers", {}).items():
        if header.get("required"):
            assert name.lower() in lower, f"GET {template}: {status} without {name}"
    schema = documented["content"][media_type]["schema"]
    if media_type == "application/json":
        check_body(spec, schema, json.loads(body))
    else:
        check_body(spec, schema, body.decode())


def check_body(spec: Mapping[str, Any], schema: Mapping[str, Any], instance: object) -> None:
    """Validate ``instance`` against ``schema``, whose ``$ref`` point into ``spec``."""
    # "#/components/..." resolves against the root schema, which carries them.
    root = {**schema, "components": spec["components"]}
    Draft202012Validator(root, format_checker=FORMATS).validate(instance)


# --- the document -------------------------------------------------------------------


def test_formats_are_checked() -> None:
    assert "date-time" in FORMATS.checkers, "install rfc3339-validator"
    assert not FORMATS.conforms("2025-01-11 22:30", "date-time")


async def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(spec).validate()
    assert spec["info"]["title"] == "Quotopia Core"
    assert spec["info"]["version"] == __version__
    assert spec["info"]["description"]
    tags = {tag["name"] for tag in spec["tags"]}
    for operations in spec["paths"].values():
        for operation in operations.values():
            assert operation["summary"]
            assert set(operation["tags"]) <= tags


async def test_every_route_is_documented(spec: dict[str, Any]) -> None:
    """Every route of the app, but those that serve the documentation itself."""
    app = create_app(QuoteStore())
    rules = list(app.url_map.iter_rules())
    assert {rule.endpoint for rule in rules} >= DOCS_ENDPOINTS
    routes = {
        re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule): {
            m.lower() for m in rule.methods or ()
        }
        - {"head", "options"}
        for rule in rules
        if rule.endpoint not in DOCS_ENDPOINTS
    }
    assert routes == {path: set(operations) for path, operations in spec["paths"].items()}
    assert set(PATHS) == set(routes)


async def test_every_documented_answer_is_checked(spec: dict[str, Any]) -> None:
    documented = {
        (path, int(status))
        for path, operations in spec["paths"].items()
        for status in operations["get"]["responses"]
    }
    assert {(case.template, case.status) for case in CASES} == documented


async def test_the_symbol_has_an_example(spec: dict[str, Any]) -> None:
    """(Swagger UI's "Try it out" starts with it, schemathesis gets 200s with it.)"""
    [parameter] = spec["paths"]["/quotes/{symbol}"]["get"]["parameters"]
    assert (parameter["name"], parameter["in"], parameter["example"]) == ("symbol", "path", "BTC")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
async def test_answers_match_the_document(spec: dict[str, Any], case: Case, tmp_path: Path) -> None:
    with ExitStack() as stack:
        client = core_in(case.state, stack, tmp_path).test_client()
        send = {"GET": client.get, "POST": client.post}[case.method]
        response = await send(case.path, headers=dict(case.headers))
    body = await response.get_data(as_text=False)
    assert response.status_code == case.status, body
    headers = dict(response.headers)
    check_answer(spec, case.template, case.status, response.content_type or "", headers, body)


async def test_errors_off_the_document_are_its_components(spec: dict[str, Any]) -> None:
    """A path it does not list, a method it does not list: bodies it names."""
    client = core_in("fed").test_client()
    schemas = spec["components"]["schemas"]
    response = await client.get("/nope")
    assert response.status_code == 404
    check_body(spec, schemas["PathNotFound"], json.loads(await response.get_data(as_text=True)))
    response = await client.trace("/quotes")
    assert response.status_code == 405
    check_body(spec, schemas["MethodNotAllowed"], json.loads(await response.get_data(as_text=True)))


async def test_the_docs_page_names_only_core_s_own_files(spec: dict[str, Any]) -> None:
    client = core_in("fed").test_client()
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.content_type == "text/html; charset=utf-8"
    html = await response.get_data(as_text=True)
    assert not re.search(r"(?i)\b(?:https?:)?//", html), html
    assets = references(html)
    assert {Path(a).name for a in assets} == {"swagger-ui.css", "swagger-ui-bundle.js"}
    for asset in assets:
        assert (STATIC_FOLDER / asset.removeprefix("static/")).is_file(), asset
    assert 'url: "/openapi.json"' in html


@pytest.mark.parametrize("path", ["/redocs", "/scalar"])
async def test_no_other_docs_page(path: str) -> None:
    """quart-schema's other pages load their scripts from a CDN: not served."""
    response = await core_in("fed").test_client().get(path)
    assert response.status_code == 404
    assert response.content_type == "application/json"


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


def references(html: str) -> list[str]:
    """The URLs an HTML page loads or links to (``src`` and ``href``)."""
    parser = _References()
    parser.feed(html)
    parser.close()
    return parser.found


# --- a real Core ----------------------------------------------------------------------

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _lowered(headers: Message[str, str]) -> dict[str, str]:
    """Header names in lower case: HTTP names are case-insensitive (hypercorn's are lower)."""
    return {name.lower(): value for name, value in headers.items()}


def fetch(
    url: str, method: str = "GET", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, body) of one request; errors are answers too."""
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with _http.open(request, timeout=DEADLINE) as response:
            return response.status, _lowered(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, _lowered(error.headers), error.read()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real Core, fed by a real FT, once it is ready (it has FT's snapshot), with a
    history database that holds a few quotes."""
    with ExitStack() as stack:
        url = history_url("history", stack, tmp_path_factory.mktemp("history"))
    db = url.render_as_string(hide_password=False).replace("sqlite+pysqlite", "sqlite")
    with running_ft() as ft, running_core(ft.port, "--db", db) as core:
        base = f"http://127.0.0.1:{core.port}"
        wait_until(lambda: fetch(f"{base}/readyz")[0] == 200, DEADLINE, what="Core ready")
        yield core


def base_url(core: Service) -> str:
    return f"http://127.0.0.1:{core.port}"


@pytest.mark.e2e
def test_a_real_core_answers_as_documented(core: Service) -> None:
    base = base_url(core)
    status, _, body = fetch(f"{base}/openapi.json")
    assert status == 200
    spec = json.loads(body)
    OpenAPIV31SpecValidator(spec).validate()
    requests = [
        *(("GET", path, template, {}) for template, path in PATHS.items()),
        ("GET", "/metrics", "/metrics", OPENMETRICS),
        ("GET", "/quotes/eth", "/quotes/{symbol}", {}),
        ("GET", "/quotes/DOGE", "/quotes/{symbol}", {}),
        ("GET", "/quotes/a%2Fb", "/quotes/{symbol}", {}),
        ("POST", "/quotes", "/quotes", {}),
        ("DELETE", "/quotes/BTC", "/quotes/{symbol}", {}),
        ("GET", "/quotes/BTC", "/quotes/{symbol}", TOO_LARGE),
        ("GET", "/quotes/OLD/history?limit=2&order=asc", "/quotes/{symbol}/history", {}),
        ("GET", "/quotes/btc/history?limit=1001", "/quotes/{symbol}/history", {}),
        ("GET", "/quotes/btc/history?cursor=x", "/quotes/{symbol}/history", {}),
        ("GET", "/quotes/DOGE/history", "/quotes/{symbol}/history", {}),
        ("GET", "/quotes/old/candles?interval=1s", "/quotes/{symbol}/candles", {}),
        ("GET", "/quotes/btc/candles?interval=1w", "/quotes/{symbol}/candles", {}),
        ("GET", "/quotes/DOGE/candles?interval=1m", "/quotes/{symbol}/candles", {}),
    ]
    for method, path, template, headers in requests:
        status, answer_headers, body = fetch(base + path, method, headers)
        content_type = answer_headers.get("content-type", "")
        try:
            check_answer(spec, template, status, content_type, answer_headers, body)
        except Exception as error:
            raise AssertionError(f"{method} {path} → {status} {body[:300]!r}") from error


@pytest.mark.e2e
def test_the_docs_page_loads_only_from_core(core: Service) -> None:
    base = base_url(core)
    docs = f"{base}/docs"
    status, headers, body = fetch(docs)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    html = body.decode()
    for url in re.findall(r"(?i)\bhttps?://[^\s\"'<>]*", html):
        assert url.startswith(base + "/"), url
    content_types = {".css": {"text/css"}, ".js": {"text/javascript", "application/javascript"}}
    assets = references(html)
    assert assets
    for asset in assets:
        url = urljoin(docs, asset)
        assert url.startswith(base + "/static/"), url
        status, headers, body = fetch(url)
        assert status == 200, url
        assert headers["content-type"].split(";")[0] in content_types[Path(asset).suffix], url
        assert body == (STATIC_FOLDER / url.removeprefix(base + "/static/")).read_bytes()
    [spec_url] = re.findall(r'url: "([^"]+)"', html)
    status, headers, _ = fetch(urljoin(docs, spec_url))
    assert (status, headers["content-type"]) == (200, "application/json")


#: schemathesis's checks that apply to Core (no auth, no resources to create).
SCHEMATHESIS_CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
    "allow_header_conformance",
]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_schemathesis_finds_nothing(core: Service, tmp_path: Path) -> None:
    """Generated requests to every operation: no 5xx, every answer as documented.

    A fixed seed: the same requests each run, so that a failure reproduces (with
    ``st run --seed``) and CI does not flake on a new input; 30 examples per
    operation bound the run to a few seconds.
    """
    st = Path(sys.executable).with_name("st")  # schemathesis's command line
    # Its own process: hypothesis and schemathesis warn as they please there, with
    # no effect on this suite's filterwarnings = error.
    result = subprocess.run(
        [
            str(st),
            "--no-color",
            "run",
            f"{base_url(core)}/openapi.json",
            "--checks",
            ",".join(SCHEMATHESIS_CHECKS),
            "--max-examples",
            "30",
            "--seed",
            "20260101",
            # A stream answers forever: the other operations only.
            "--exclude-path",
            "/quotes/stream",
            "--request-timeout",
            "10",
            "--workers",
            "1",
        ],
        cwd=tmp_path,  # its .hypothesis/ and .schemathesis/ caches
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Tested: 13\b", output), output
    assert re.search(r"\d+ generated, \d+ passed", output), output
