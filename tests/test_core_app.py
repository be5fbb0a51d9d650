"""Core's HTTP API through quart-trio's test client, and the QuoteStore under it.

The feed is faked: tests fill the store with ``store.apply(...)`` and move a fake
monotonic clock by hand. Every response shape is checked exactly.

The fast path in front of the app (:class:`PreparedQuotes`) is checked against the
app itself: the same requests through both, the same answers, at the ASGI level for
generated requests and byte for byte on the wire, through hypercorn, for a list of
awkward ones.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework, ASGIReceiveEvent, ASGISendEvent, HTTPScope
from hypothesis import given
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client
from quart.wrappers import Response

from quotopia.core.app import PreparedQuotes, create_app
from quotopia.core.http import FinishResponses
from quotopia.core.store import QuoteStore

pytestmark = pytest.mark.anyio

ROUTES = ("/health", "/quotes", "/quotes/BTC")
WRONG_METHODS = ("POST", "PUT", "DELETE", "PATCH")
QUOTE_TIME = datetime(2025, 1, 11, 22, 30, 0, 123456, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    # quart-trio's app and test client run on Trio only.
    return "trio"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> QuoteStore:
    return QuoteStore(clock=clock)


@pytest.fixture
def client(store: QuoteStore) -> Client:
    return create_app(store).test_client()


def fill(store: QuoteStore) -> None:
    store.feed_up()
    store.apply("BTC", 95432.12, QUOTE_TIME, 0.034, 7)
    store.apply("SBER", 275.5, QUOTE_TIME, -0.1, 3)
    store.apply("ETH", 2650.2, None, 0.0, 1)


async def request(client: Client, method: str, path: str) -> Response:
    """Send ``method`` to ``path``.

    (Client.open's type wrongly makes ``json`` required, so go through the
    per-method helpers.)
    """
    send = {
        "GET": client.get,
        "HEAD": client.head,
        "OPTIONS": client.options,
        "POST": client.post,
        "PUT": client.put,
        "DELETE": client.delete,
        "PATCH": client.patch,
        "TRACE": client.trace,
    }[method]
    return await send(path)


async def get_json(client: Client, path: str, status: int = 200) -> object:
    """GET ``path``, check the status and the JSON content type, return the parsed body."""
    response = await client.get(path)
    assert response.status_code == status
    assert response.content_type == "application/json"
    body = await response.get_data(as_text=True)
    return json.loads(body)


# --- GET /health --------------------------------------------------------------------


async def test_health_before_any_feed(client: Client) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    body = await get_json(client, "/health")
    after = datetime.now(UTC)
    assert isinstance(body, dict)
    assert set(body) == {"status", "time", "feed"}
    assert body["status"] == "healthy"
    assert body["feed"] == {"connected": False, "last_update_age_seconds": None, "reconnects": 0}
    stamp = body["time"]
    assert isinstance(stamp, str)
    # RFC 3339 in UTC, whole seconds, with a Z: 2025-01-11T22:30:00Z
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= parsed <= after


async def test_health_reports_the_feed(client: Client, store: QuoteStore, clock: FakeClock) -> None:
    fill(store)
    clock.advance(2.5)
    body = await get_json(client, "/health")
    assert isinstance(body, dict)
    assert body["feed"] == {"connected": True, "last_update_age_seconds": 2.5, "reconnects": 0}
    store.feed_down()
    store.feed_up()
    clock.advance(0.0004)
    body = await get_json(client, "/health")
    assert isinstance(body, dict)
    # Rounded to milliseconds.
    assert body["feed"] == {"connected": True, "last_update_age_seconds": 2.5, "reconnects": 1}
    store.feed_down()
    body = await get_json(client, "/health")
    assert isinstance(body, dict)
    assert body["feed"]["connected"] is False
    assert body["status"] == "healthy"


# --- GET /quotes --------------------------------------------------------------------


async def test_quotes_is_an_empty_object_before_the_first_quote(
    client: Client,
) -> None:
    response = await client.get("/quotes")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert await response.get_data() == b"{}"


async def test_quotes_is_a_flat_map_of_prices(client: Client, store: QuoteStore) -> None:
    fill(store)
    body = await get_json(client, "/quotes")
    assert body == {"BTC": 95432.12, "ETH": 2650.2, "SBER": 275.5}
    assert isinstance(body, dict)
    assert all(isinstance(p, int | float) and not isinstance(p, bool) for p in body.values())
    store.apply("BTC", 95433.0, QUOTE_TIME, 0.001, 8)
    assert await get_json(client, "/quotes") == {"BTC": 95433.0, "ETH": 2650.2, "SBER": 275.5}


# --- GET /quotes/{symbol} -------------------------------------------------------------


@pytest.mark.parametrize("requested", ["BTC", "btc", "Btc", "bTC"])
async def test_one_quote_case_insensitive(
    client: Client, store: QuoteStore, clock: FakeClock, requested: str
) -> None:
    fill(store)
    clock.advance(1.2341)
    body = await get_json(client, f"/quotes/{requested}")
    assert body == {
        "symbol": "BTC",
        "price": 95432.12,
        "time": "2025-01-11T22:30:00.123Z",
        "change_percent": 0.034,
        "sequence": 7,
        "age_seconds": 1.234,
    }


async def test_one_quote_without_a_time(client: Client, store: QuoteStore) -> None:
    fill(store)
    body = await get_json(client, "/quotes/eth")
    assert body == {
        "symbol": "ETH",
        "price": 2650.2,
        "time": None,
        "change_percent": 0.0,
        "sequence": 1,
        "age_seconds": 0.0,
    }


async def test_change_percent_is_rounded_to_four_places(client: Client, store: QuoteStore) -> None:
    store.apply("BTC", 95432.12, QUOTE_TIME, 0.0345678912, 2)
    body = await get_json(client, "/quotes/BTC")
    assert isinstance(body, dict)
    assert body["change_percent"] == 0.0346


async def test_a_quote_time_in_another_zone_is_shown_in_utc(
    client: Client, store: QuoteStore
) -> None:
    moscow = QUOTE_TIME.astimezone(timezone(timedelta(hours=3)))
    store.apply("SBER", 275.5, moscow, 0.0, 1)
    body = await get_json(client, "/quotes/SBER")
    assert isinstance(body, dict)
    assert body["time"] == "2025-01-11T22:30:00.123Z"


@pytest.mark.parametrize("requested", ["XYZ", "xyz", "Doge", "btc2", "a b"])
async def test_unknown_symbol_is_404_with_the_requested_name(
    client: Client, store: QuoteStore, requested: str
) -> None:
    fill(store)
    body = await get_json(client, f"/quotes/{requested}", status=404)
    assert body == {"error": "not found", "symbol": requested}


async def test_a_symbol_before_any_quote_is_404(client: Client) -> None:
    assert await get_json(client, "/quotes/BTC", status=404) == {
        "error": "not found",
        "symbol": "BTC",
    }


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/index.html",
        "/quote",
        "/quotes/",
        "/quotes/BTC/",
        "/quotes/BTC/price",
        "/health/",
        "/HEALTH",
    ],
)
async def test_other_paths_are_404_json(client: Client, store: QuoteStore, path: str) -> None:
    fill(store)
    assert await get_json(client, path, status=404) == {"error": "not found", "path": path}


@pytest.mark.parametrize("method", WRONG_METHODS)
@pytest.mark.parametrize("path", ROUTES)
async def test_wrong_method_is_405_json_with_allow(
    client: Client, store: QuoteStore, method: str, path: str
) -> None:
    fill(store)
    response = await request(client, method, path)
    assert response.status_code == 405
    assert response.content_type == "application/json"
    assert json.loads(await response.get_data(as_text=True)) == {
        "error": "method not allowed",
        "path": path,
    }
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert "GET" in allowed
    assert method not in allowed
    assert allowed <= {"GET", "HEAD", "OPTIONS"}


@pytest.mark.parametrize("path", ROUTES)
async def test_head_is_answered_like_get(client: Client, store: QuoteStore, path: str) -> None:
    # (The ASGI server, not the app, drops a HEAD response's body.)
    fill(store)
    response = await client.head(path)
    assert response.status_code == 200
    assert response.content_type == "application/json"


@pytest.mark.parametrize("path", ROUTES)
async def test_options_is_json_too(client: Client, path: str) -> None:
    response = await client.options(path)
    assert response.content_type == "application/json"


async def test_no_html_anywhere(client: Client, store: QuoteStore) -> None:
    fill(store)
    requests = [("GET", p) for p in (*ROUTES, "/quotes/nope", "/nope", "/static/x.css")]
    requests += [(m, p) for m in (*WRONG_METHODS, "TRACE") for p in ROUTES]
    for method, path in requests:
        response = await request(client, method, path)
        body = await response.get_data(as_text=True)
        assert response.content_type == "application/json", (method, path)
        assert "<" not in body, (method, path, body)
        json.loads(body)


# --- QuoteStore -----------------------------------------------------------------------


def test_store_counts_reconnects_only_after_a_loss(store: QuoteStore) -> None:
    assert (store.connected, store.reconnects) == (False, 0)
    store.feed_down()
    assert (store.connected, store.reconnects) == (False, 0)
    store.feed_up()
    assert (store.connected, store.reconnects) == (True, 0)
    store.feed_down()
    assert (store.connected, store.reconnects) == (False, 0)
    store.feed_up()
    assert (store.connected, store.reconnects) == (True, 1)
    store.feed_down()
    store.feed_down()
    store.feed_up()
    assert (store.connected, store.reconnects) == (True, 2)


def test_store_age_follows_the_clock(store: QuoteStore, clock: FakeClock) -> None:
    store.apply("BTC", 1.0, None, 0.0, 1)
    quote = store.get("btc")
    assert quote is not None
    assert quote.received_at == clock.now
    assert store.age(quote) == 0.0
    clock.advance(3.25)
    assert store.age(quote) == 3.25
    assert store.feed_status()["last_update_age_seconds"] == 3.25
    # A clock that steps back never gives a negative age.
    clock.advance(-10)
    assert store.age(quote) == 0.0


def test_store_last_update_age_is_the_newest_quote(store: QuoteStore, clock: FakeClock) -> None:
    assert store.feed_status()["last_update_age_seconds"] is None
    store.apply("BTC", 1.0, None, 0.0, 1)
    clock.advance(5)
    store.apply("ETH", 2.0, None, 0.0, 1)
    clock.advance(1.0005)
    assert store.feed_status()["last_update_age_seconds"] == 1.0
    assert store.updates == 2


def test_store_keeps_the_latest_quote_per_symbol(store: QuoteStore) -> None:
    store.apply("BTC", 1.0, QUOTE_TIME, 0.5, 1)
    store.apply("BTC", 2.0, QUOTE_TIME + timedelta(seconds=1), 100.0, 2)
    quote = store.get("Btc")
    assert quote is not None
    assert (quote.symbol, quote.price, quote.change_percent) == ("BTC", 2.0, 100.0)
    assert quote.sequence == 2
    assert store.get("ETH") is None
    assert store.updates == 2


def test_quotes_json_is_cached_until_the_next_apply(store: QuoteStore) -> None:
    assert store.quotes_json() == b"{}"
    store.apply("SBER", 275.5, None, 0.0, 1)
    store.apply("BTC", 95400.0, None, 0.0, 1)
    first = store.quotes_json()
    assert first == b'{"BTC": 95400.0, "SBER": 275.5}'
    # Rendered once per update, not once per read.
    assert store.quotes_json() is first
    store.feed_down()
    store.feed_up()
    assert store.quotes_json() is first
    store.apply("BTC", 95401.5, None, 0.0, 2)
    second = store.quotes_json()
    assert second is not first
    assert second == b'{"BTC": 95401.5, "SBER": 275.5}'
    assert store.quotes_json() is second
    assert all(math.isfinite(v) for v in json.loads(second).values())


def test_quote_json_is_what_json_dumps_writes(store: QuoteStore, clock: FakeClock) -> None:
    store.apply("BTC", 95432.12, QUOTE_TIME, 0.0345678912, 7)
    clock.advance(1.2341)
    assert store.quote_json("btc") == (
        b'{"symbol": "BTC", "price": 95432.12, "time": "2025-01-11T22:30:00.123Z", '
        b'"change_percent": 0.0346, "sequence": 7, "age_seconds": 1.234}'
    )
    assert store.quote_json("ETH") is None


@given(
    symbol=st.text(max_size=8),
    price=st.floats(allow_nan=False, allow_infinity=False),
    change=st.floats(allow_nan=False, allow_infinity=False),
    sequence=st.integers(0, 2**64 - 1),
    stamp=st.none() | st.datetimes(timezones=st.timezones()),
    age=st.floats(-1e6, 1e9),
)
def test_quote_json_matches_rendering_the_whole_quote(
    symbol: str,
    price: float,
    change: float,
    sequence: int,
    stamp: datetime | None,
    age: float,
) -> None:
    """The prepared head plus the age is what rendering every field per request gave."""
    clock = FakeClock()
    store = QuoteStore(clock=clock)
    store.apply(symbol, price, stamp, change, sequence)
    received = clock()
    clock.advance(age)
    # The age as the store's clock sees it (0.0005 after a large reading can be
    # 0.000499..., which rounds down).
    seen = clock() - received
    time = None
    if stamp is not None:
        time = stamp.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    whole = {
        "symbol": symbol,
        "price": price,
        "time": time,
        "change_percent": round(change, 4),
        "sequence": sequence,
        "age_seconds": round(max(0.0, seen), 3),
    }
    # Twice: once rendering the head, once from the cache.
    assert store.quote_json(symbol) == json.dumps(whole).encode()
    assert store.quote_json(symbol) == json.dumps(whole).encode()


def test_quote_json_is_rendered_again_after_an_apply(store: QuoteStore, clock: FakeClock) -> None:
    store.apply("BTC", 1.0, None, 0.0, 1)
    first = store.quote_json("BTC")
    store.apply("ETH", 2.0, None, 0.0, 1)
    assert store.quote_json("BTC") == first
    store.apply("BTC", 3.0, None, 0.0, 2)
    clock.advance(0.5)
    assert store.quote_json("BTC") == (
        b'{"symbol": "BTC", "price": 3.0, "time": null, "change_percent": 0.0, '
        b'"sequence": 2, "age_seconds": 0.5}'
    )


# --- PreparedQuotes: the fast path answers exactly as the app does ---------------------

#: (status, headers, body) of one answer.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


async def asgi_answer(
    app: ASGIFramework,
    method: str,
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    root_path: str = "",
) -> Answer:
    """Call ``app`` directly with one HTTP request (no body); return its answer."""
    scope: HTTPScope = {
        "type": "http",
        "asgi": {"spec_version": "2.1", "version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": root_path,
        "headers": [(b"host", b"core"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},  # type: ignore[typeddict-item]
        "extensions": {},
    }
    received = False
    messages: list[ASGISendEvent] = []

    async def receive() -> ASGIReceiveEvent:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: ASGISendEvent) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start: Any = messages[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m["body"] for m in messages[1:] if m["type"] == "http.response.body")
    return start["status"], list(start["headers"]), body


def both(store: QuoteStore) -> tuple[ASGIFramework, ASGIFramework]:
    """The app alone, and the app behind the fast path: same store."""
    app = create_app(store)
    return app, PreparedQuotes(app, store)


#: Symbols as FT could send them: ``--symbols`` takes any text, even "" (which no
#: route can match) or "\ufb00" (the "ff" ligature, whose upper case is "FF").
symbols = st.sampled_from(["BTC", "SBER", "", "a b", "BRK.B", "\u03c3", "\ufb00"]) | st.text(
    max_size=4
)


@given(
    stored=st.lists(symbols, max_size=4),
    requested=st.one_of(
        symbols,
        symbols.map(str.lower),
        symbols.map(str.swapcase),
        # "\u017f" is the long s, whose upper case is "S".
        st.sampled_from(["", "/", "BTC/", "/BTC", "\u017fBER", "BTC\n"]),
    ),
    prefix=st.sampled_from(["/quotes/", "/quotes", "//quotes/", "/Quotes/", "/quote/"]),
    method=st.sampled_from(["GET", "HEAD", "POST", "OPTIONS"]),
    headers=st.sampled_from(
        [
            [],
            [(b"content-length", b"0")],
            [(b"content-length", b"10")],
            [(b"content-length", b"99999999999999")],
            [(b"transfer-encoding", b"chunked")],
            [(b"range", b"bytes=0-3"), (b"if-none-match", b"*")],
        ]
    ),
)
async def test_the_fast_path_answers_as_the_app_does(
    stored: list[str],
    requested: str,
    prefix: str,
    method: str,
    headers: list[tuple[bytes, bytes]],
) -> None:
    clock = FakeClock()
    store = QuoteStore(clock=clock)
    for n, symbol in enumerate(stored):
        store.apply(symbol, 100.0 + n, QUOTE_TIME, 0.5, n)
    clock.advance(0.25)
    path = prefix + requested if prefix.endswith("/") else prefix
    app, fast = both(store)
    assert await asgi_answer(fast, method, path, headers) == await asgi_answer(
        app, method, path, headers
    )


async def test_the_fast_path_answers_the_hot_requests_itself(
    store: QuoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Or the test above would pass with a fast path that never answers.)"""
    fill(store)
    _, fast = both(store)

    async def not_the_app(*args: object) -> None:
        raise AssertionError("passed to the app")

    monkeypatch.setattr(fast, "_app", not_the_app)
    assert (await asgi_answer(fast, "GET", "/quotes"))[0] == 200
    assert (await asgi_answer(fast, "GET", "/quotes/btc"))[0] == 200
    with pytest.raises(AssertionError, match="passed to the app"):
        await asgi_answer(fast, "GET", "/quotes/XYZ")
    with pytest.raises(AssertionError, match="passed to the app"):
        await asgi_answer(fast, "HEAD", "/quotes")
    # Mounted below a root path, the app routes differently: it decides.
    with pytest.raises(AssertionError, match="passed to the app"):
        await asgi_answer(fast, "GET", "/quotes", root_path="/api")


def http11(target: str, *headers: str, method: str = "GET", body: str = "") -> bytes:
    """One HTTP/1.1 request that asks the server to close the connection after it."""
    lines = [f"{method} {target} HTTP/1.1", "Host: core", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


#: (the app's status, raw request): each request is sent on a connection of its own.
WIRE_REQUESTS = [
    (200, http11("/quotes")),
    (200, http11("/quotes/BTC")),
    (200, http11("/quotes/btc?x=1")),
    (200, http11("/quotes/%42tc")),
    (200, http11("/quotes%2FBTC")),
    (404, http11("/quotes/XYZ")),
    (404, http11("/quotes/")),
    (404, http11("/quotes/BTC/")),
    (200, http11("//quotes")),  # werkzeug's routing ignores extra leading slashes
    (200, http11("/quotes", method="HEAD")),
    (200, http11("/quotes/BTC", method="HEAD")),
    (405, http11("/quotes", "Content-Length: 0", method="POST")),
    (405, http11("/quotes/BTC", method="OPTIONS")),
    (200, http11("/quotes", "Content-Length: 0")),
    (200, http11("/quotes", "Content-Length: 5", body="hello")),
    (200, http11("/quotes/BTC", "Transfer-Encoding: chunked", body="0\r\n\r\n")),
    (413, http11("/quotes/BTC", "Content-Length: 99999999999999")),
    (200, http11("/quotes", "Range: bytes=0-3", "If-None-Match: *")),
    (200, b"GET /quotes HTTP/1.0\r\n\r\n"),
    (200, b"GET /quotes/BTC HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
    # Keep-alive: three requests pipelined on one connection (the status of the first).
    (
        200,
        b"GET /quotes HTTP/1.1\r\nHost: core\r\n\r\n"
        b"GET /quotes/ETH HTTP/1.1\r\nHost: core\r\n\r\n" + http11("/quotes/SBER"),
    ),
]


async def exchange_all(app: ASGIFramework, requests: Sequence[bytes]) -> list[bytes]:
    """Serve ``app`` as Core does (hypercorn's Trio worker); send each request on
    a connection of its own and read until the server closes it."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    replies = []
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        binds = await nursery.start(
            partial(hypercorn_serve, FinishResponses(app), config, shutdown_trigger=done.wait)
        )
        port = int(binds[0].rsplit(":", 1)[1])
        with trio.fail_after(10):
            for request in requests:
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(request)
                    reply = b""
                    while chunk := await stream.receive_some():
                        reply += chunk
                # Only the Date header may differ (it has a one-second resolution).
                replies.append(re.sub(rb"(?im)^date: [^\r\n]*", b"date: -", reply))
        done.set()
    return replies


async def test_the_fast_path_answers_as_the_app_does_on_the_wire(
    store: QuoteStore, clock: FakeClock
) -> None:
    fill(store)
    clock.advance(1.5)
    app, fast = both(store)
    requests = [request for _, request in WIRE_REQUESTS]
    expected = await exchange_all(app, requests)
    got = await exchange_all(fast, requests)
    assert [int(reply.split(b" ", 2)[1]) for reply in expected] == [s for s, _ in WIRE_REQUESTS]
    for request, want, have in zip(requests, expected, got, strict=True):
        assert have == want, request
