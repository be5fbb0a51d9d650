"""Core's HTTP API through quart-trio's test client, and the QuoteStore under it.

The feed is faked: tests fill the store with ``store.apply(...)`` and move a fake
monotonic clock by hand. Every response shape is checked exactly.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from quart.typing import TestClientProtocol as Client
from quart.wrappers import Response

from quotopia.core.app import create_app
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
    "path", ["/", "/quote", "/quotes/", "/quotes/BTC/", "/quotes/BTC/price", "/health/", "/HEALTH"]
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
