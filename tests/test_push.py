"""Core's push protocols in process: ``GET /quotes/stream`` (Server-Sent Events,
driven at the ASGI level) and ``GET /ws`` (WebSocket, through quart-trio's test
client), over a store the tests fill; and the hub's direct delivery.

The feed is faked (``store.apply``), and time too: the store and the hub share a
fake monotonic clock, and the tests run the hub's watcher by hand
(``hub.check(now)``), so heartbeats and slow clients are tested without waiting.
Both clients' channels hold 10 messages: a test that stops reading has a client
that stops reading, and Core's writes then wait, as on a full socket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, ConnectionState, HTTPScope
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError
from quart.typing import TestClientProtocol as Client
from quart.typing import TestWebsocketConnectionProtocol as WebsocketConnection
from quart_trio import QuartTrio

from quotopia.core.app import create_app
from quotopia.core.config import PushLimits
from quotopia.core.metrics import CoreMetrics
from quotopia.core.push.hub import BATCH_LIMIT, Batch, CloseReason, Kind, PushHub, Subscriber
from quotopia.core.recent import RecentQuotes
from quotopia.core.store import QuoteStore

pytestmark = pytest.mark.anyio

T0 = datetime(2025, 1, 11, 22, 30, 0, tzinfo=UTC)
SYMBOLS = ("BTC", "ETH", "SBER")
START = {"BTC": 95000.0, "ETH": 3300.0, "SBER": 275.0}


@pytest.fixture
def anyio_backend() -> str:
    return "trio"  # quart-trio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Feed:
    """Plays FT: numbered ticks of every symbol into the store."""

    def __init__(self, store: QuoteStore) -> None:
        self.store = store
        self.sequence = 0
        self.prices = dict(START)

    def tick(self, *symbols: str) -> None:
        self.sequence += 1
        for symbol in symbols or SYMBOLS:
            self.prices[symbol] = round(self.prices[symbol] * 1.0001, 2)
            when = T0 + timedelta(seconds=self.sequence)
            self.store.apply(symbol, self.prices[symbol], when, 0.01, self.sequence)


@dataclass
class Core:
    store: QuoteStore
    hub: PushHub
    clock: FakeClock
    feed: Feed
    client: Client
    metrics: CoreMetrics
    app: QuartTrio


def make_core(limits: PushLimits | None = None, per_symbol: int = 600) -> Core:
    clock = FakeClock()
    store = QuoteStore(clock=clock, recent=RecentQuotes("ep0ch", per_symbol))
    hub = PushHub(store, limits or PushLimits(), clock=clock)
    metrics = CoreMetrics(store, ready=lambda: True, hub=hub)
    app = create_app(store, metrics, hub=hub)
    feed = Feed(store)
    store.feed_up(len(SYMBOLS))
    feed.tick()
    return Core(store, hub, clock, feed, app.test_client(), metrics, app)


@pytest.fixture
def core() -> Core:
    return make_core()


async def settle() -> None:
    """Let every task run until all wait (for a message, or for room to send one)."""
    await trio.testing.wait_all_tasks_blocked()


# --- SSE ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    event: str
    data: Any
    id: str | None


class Stream:
    """An SSE client at the ASGI level: what Core sends goes into a channel of 10
    messages, as in quart's test client, and is parsed into events. (The test
    client itself cannot end a response that never ends: it waits for its end.)"""

    def __init__(self, chunks: trio.MemoryReceiveChannel[ASGISendEvent]) -> None:
        self._chunks = chunks
        self.status_code: int | None = None
        self.headers: dict[str, str] = {}
        self.buffer = b""
        self.comments: list[str] = []
        self.retry: int | None = None
        self.ended = False
        #: Parsed, not yet returned.
        self.pending: list[Event] = []

    async def _receive(self) -> bytes:
        while not self.ended:
            message = await self._chunks.receive()
            if message["type"] == "http.response.start":
                self.status_code = message["status"]
                self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                self.ended = not message.get("more_body", False)
                return bytes(message.get("body", b""))
        return b""

    async def events(self, count: int) -> list[Event]:
        """The next ``count`` events (fewer if the stream ends first)."""
        self.pending += self._parse()
        while len(self.pending) < count and not self.ended:
            self.buffer += await self._receive()
            self.pending += self._parse()
        found, self.pending = self.pending[:count], self.pending[count:]
        return found

    async def rest(self) -> list[Event]:
        """Every event until the stream ends."""
        while not self.ended:
            self.buffer += await self._receive()
        found, self.pending = self.pending + self._parse(), []
        return found

    def _parse(self) -> list[Event]:
        found = []
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                name, _, value = line.partition(": ")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif name == "retry":
                    self.retry = int(value)
                else:
                    fields[name] = value
            if "event" in fields:
                found.append(Event(fields["event"], json.loads(fields["data"]), fields.get("id")))
        return found


@asynccontextmanager
async def sse(
    core: Core, query: str = "", last_event_id: str | None = None
) -> AsyncIterator[Stream]:
    """``GET /quotes/stream?query`` on Core's app, for the block's duration; the
    client leaves at its end."""
    headers = [(b"host", b"core")]
    if last_event_id is not None:
        headers.append((b"last-event-id", last_event_id.encode()))
    scope: HTTPScope = {
        "type": "http",
        "asgi": {"spec_version": "2.3", "version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/quotes/stream",
        "raw_path": b"/quotes/stream",
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "extensions": {},
        "state": ConnectionState({}),
    }
    to_app, app_receives = trio.open_memory_channel[ASGIReceiveEvent](1)
    app_sends, from_app = trio.open_memory_channel[ASGISendEvent](10)
    await to_app.send({"type": "http.request", "body": b"", "more_body": False})

    async def send(message: ASGISendEvent) -> None:
        await app_sends.send(message)

    async def run_app() -> None:
        async with app_sends:
            await core.app(scope, app_receives.receive, send)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_app)
            stream = Stream(from_app)
            yield stream
            await to_app.send({"type": "http.disconnect"})
            # What the app still sends after the client left goes nowhere.
            async for _ in from_app:
                pass


def quotes(events: list[Event]) -> list[dict[str, Any]]:
    return [event.data for event in events if event.event == "quote"]


async def test_a_stream_opens_with_a_snapshot_and_the_feed_then_every_quote(core: Core) -> None:
    async with sse(core) as stream:
        snapshot, feed = await stream.events(2)
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.retry == 2000
        assert snapshot.event == "snapshot"
        assert snapshot.id == "ep0ch-3"
        assert [q["symbol"] for q in snapshot.data["quotes"]] == list(SYMBOLS)
        assert snapshot.data["quotes"][0] == {
            "symbol": "BTC",
            "price": core.feed.prices["BTC"],
            "time": "2025-01-11T22:30:01.000Z",
            "change_percent": 0.01,
            "sequence": 1,
        }
        assert feed == Event("feed", core.store.feed_status(), None)
        core.feed.tick()
        core.feed.tick("ETH")
        updates = await stream.events(4)
        assert [(e.event, e.id, e.data["symbol"]) for e in updates] == [
            ("quote", "ep0ch-4", "BTC"),
            ("quote", "ep0ch-5", "ETH"),
            ("quote", "ep0ch-6", "SBER"),
            ("quote", "ep0ch-7", "ETH"),
        ]
        assert updates[-1].data["price"] == core.feed.prices["ETH"]
        assert updates[-1].data["sequence"] == 3
    assert core.hub.connections(Kind.SSE) == 0
    assert core.hub.closed[Kind.SSE, CloseReason.CLIENT] == 1
    assert core.hub.events_sent[Kind.SSE] == 4


async def test_the_symbols_filter_is_case_insensitive_and_canonical(core: Core) -> None:
    async with sse(core, "symbols=btc,Eth") as stream:
        (snapshot,) = [e for e in await stream.events(2) if e.event == "snapshot"]
        assert [q["symbol"] for q in snapshot.data["quotes"]] == ["BTC", "ETH"]
        core.feed.tick()
        core.feed.tick("SBER")
        core.feed.tick("ETH")
        assert [q["symbol"] for q in quotes(await stream.events(3))] == ["BTC", "ETH", "ETH"]


@pytest.mark.parametrize(
    ("query", "status", "body"),
    [
        ("symbols=BTC,DOGE", 400, {"error": "unknown symbol", "symbols": ["DOGE"]}),
        ("symbols=%2C", 400, {"error": "no symbols", "detail": "symbols= names no symbol"}),
    ],
)
async def test_a_bad_filter_is_refused_before_the_stream_starts(
    core: Core, query: str, status: int, body: dict[str, object]
) -> None:
    response = await core.client.get(f"/quotes/stream?{query}")
    assert response.status_code == status
    assert response.content_type == "application/json"
    assert await response.get_json() == body
    assert core.hub.connections(Kind.SSE) == 0


async def test_a_filter_before_the_first_snapshot_is_told_to_retry() -> None:
    store = QuoteStore()
    client = create_app(store).test_client()
    response = await client.get("/quotes/stream?symbols=BTC")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.get_json())["error"] == "no quotes yet"
    # Unfiltered, a stream opens all the same, with an empty snapshot.
    empty = make_core()
    empty.store = store
    empty.app = create_app(store)
    async with sse(empty) as stream:
        snapshot, feed = await stream.events(2)
        assert snapshot.data == {"quotes": []}
        assert feed.data["connected"] is False


async def test_a_reconnect_resumes_after_its_last_event_without_loss_or_duplicates(
    core: Core,
) -> None:
    async with sse(core) as stream:
        await stream.events(2)
        core.feed.tick()
        seen = await stream.events(3)
    # The client kept BTC's and ETH's quotes of tick 2; SBER's was lost with the
    # connection.
    last = seen[1].id
    assert last == "ep0ch-5"
    core.feed.tick()  # while the client is away
    async with sse(core, last_event_id=last) as stream:
        opening = await stream.events(5)
        assert [e.event for e in opening] == ["quote"] * 4 + ["feed"]
        assert [e.id for e in opening[:4]] == ["ep0ch-6", "ep0ch-7", "ep0ch-8", "ep0ch-9"]
        assert [q["symbol"] for q in quotes(opening)] == ["SBER", "BTC", "ETH", "SBER"]
        core.feed.tick("BTC")
        assert [e.id for e in await stream.events(1)] == ["ep0ch-10"]


async def test_a_reconnect_whose_events_are_gone_gets_a_reset_and_a_snapshot() -> None:
    core = make_core(per_symbol=2)
    async with sse(core) as stream:
        (snapshot, _) = await stream.events(2)
    for _ in range(3):  # more than Core holds per symbol
        core.feed.tick()
    async with sse(core, last_event_id=snapshot.id) as stream:
        reset, fresh, feed = await stream.events(3)
        assert reset == Event("reset", {"reason": "expired", "last_event_id": "ep0ch-3"}, None)
        assert fresh.event == "snapshot"
        assert fresh.id == "ep0ch-12"
        assert [q["sequence"] for q in fresh.data["quotes"]] == [4, 4, 4]
        assert feed.event == "feed"


@pytest.mark.parametrize("foreign", ["other-3", "ep0ch-99", "garbage"])
async def test_an_id_from_another_core_or_none_at_all_gets_a_reset(
    core: Core, foreign: str
) -> None:
    async with sse(core, last_event_id=foreign) as stream:
        reset, snapshot = await stream.events(2)
        assert reset.data == {"reason": "unknown_id", "last_event_id": foreign}
        assert snapshot.event == "snapshot"


async def test_a_snapshot_repeated_on_reconnect_is_no_news(core: Core) -> None:
    async with sse(core) as stream:
        await stream.events(2)
        core.store.feed_down()
        await settle()
        core.store.feed_up(3)
        for symbol in SYMBOLS:  # FT's snapshot: the quotes Core already has
            quote = core.store.get(symbol)
            assert quote is not None
            core.store.apply(symbol, quote.price, quote.time, quote.change_percent, quote.sequence)
        core.feed.tick("BTC")
        down, up, btc = await stream.events(3)
        assert (down.event, down.data["connected"]) == ("feed", False)
        assert (up.event, up.data["connected"], up.data["reconnects"]) == ("feed", True, 1)
        assert (btc.event, btc.data["sequence"]) == ("quote", 2)


async def test_an_idle_stream_gets_heartbeats(core: Core) -> None:
    async with sse(core, "symbols=BTC") as stream:
        await stream.events(2)
        await settle()
        core.clock.now += 14.9
        core.hub.check(core.clock.now)
        await settle()
        assert stream.comments == []
        core.clock.now += 0.2
        core.hub.check(core.clock.now)
        await settle()
        core.feed.tick("BTC")
        assert [e.event for e in await stream.events(1)] == ["quote"]
        assert stream.comments == ["heartbeat"]


async def test_a_client_that_does_not_read_is_conflated_then_closed(core: Core) -> None:
    async with sse(core) as stream:
        await stream.events(2)
        # One tick at a time until Core's writes wait: the client reads nothing.
        ticks = 20 + BATCH_LIMIT  # then more than a connection is given at once
        for _ in range(20):
            core.feed.tick()
            await settle()
        for _ in range(BATCH_LIMIT):
            core.feed.tick()
        assert core.hub.conflated[Kind.SSE] == 0
        received: list[dict[str, Any]] = []
        while not received or received[-1]["sequence"] < core.feed.sequence:
            received += quotes(await stream.events(1))
        received += quotes(await stream.events(2))
        # What was queued before Core's write waited, in order; then only the
        # newest quote of each symbol: nothing of the ticks in between.
        for symbol in SYMBOLS:
            sequences = [q["sequence"] for q in received if q["symbol"] == symbol]
            assert sequences == sorted(sequences)
            assert sequences[-1] == core.feed.sequence
            assert sequences[-1] - sequences[-2] > 1
        assert core.hub.conflated[Kind.SSE] == 3 * ticks - len(received)
        assert core.hub.connections(Kind.SSE) == 1
        # Now stuck for longer than the lag limit: the stream is closed.
        for _ in range(20):
            core.feed.tick()
            await settle()
        core.clock.now += 10.1
        core.hub.check(core.clock.now)
        rest = await stream.rest()
        assert stream.ended
        assert len(quotes(rest)) < 3 * 20
    assert core.hub.closed[Kind.SSE, CloseReason.SLOW] == 1
    assert core.hub.connections(Kind.SSE) == 0


async def test_a_client_is_found_slow_even_once_its_backlog_left_the_history() -> None:
    """At a fast tick the recent history spans seconds: the lag is counted from
    the first quote the client missed, not from the oldest still held."""
    core = make_core(per_symbol=4)
    async with sse(core) as stream:
        await stream.events(2)
        for _ in range(20):
            core.feed.tick()
            await settle()
        for _ in range(11):  # a tick a second, for 11 s; 4 per symbol are held
            core.clock.now += 1.0
            core.hub.check(core.clock.now)
            core.feed.tick()
        await stream.rest()
        assert stream.ended
    assert core.hub.closed[Kind.SSE, CloseReason.SLOW] == 1


async def test_a_client_behind_by_less_than_the_lag_limit_stays(core: Core) -> None:
    async with sse(core) as stream:
        await stream.events(2)
        for _ in range(20):
            core.feed.tick()
            await settle()
        core.clock.now += 9.9
        core.hub.check(core.clock.now)
        assert len(quotes(await stream.events(3 * 20))) == 3 * 20
        core.feed.tick()
        assert len(await stream.events(3)) == 3
    assert core.hub.closed[Kind.SSE, CloseReason.SLOW] == 0


async def test_streams_end_when_core_shuts_down(core: Core) -> None:
    async with sse(core) as first, sse(core, "symbols=ETH") as second:
        await first.events(2)
        await second.events(2)
        core.hub.close()
        assert await first.rest() == []
        assert await second.rest() == []
        assert first.ended
        assert second.ended
    assert core.hub.closed[Kind.SSE, CloseReason.SHUTDOWN] == 2


# --- WebSocket --------------------------------------------------------------------


@asynccontextmanager
async def ws(core: Core) -> AsyncIterator[WebsocketConnection]:
    async with core.client.websocket("/ws") as socket:
        hello = json.loads(await socket.receive())
        assert hello == {
            "type": "hello",
            "symbols": list(SYMBOLS),
            "limits": {
                "max_subscriptions": core.hub.limits.ws_max_subscriptions,
                "max_message_bytes": 4096,
            },
        }
        feed = json.loads(await socket.receive())
        assert feed == {"type": "feed", **core.store.feed_status()}
        yield socket


async def until_closed(socket: WebsocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every message until Core closes the connection, and the close code."""
    received: list[dict[str, Any]] = []
    while True:
        try:
            received.append(json.loads(await socket.receive()))
        except WebsocketDisconnectError as closed:
            return received, closed.args[0]


async def ask(socket: WebsocketConnection, message: object) -> dict[str, Any]:
    await socket.send(message if isinstance(message, str | bytes) else json.dumps(message))
    answer: dict[str, Any] = json.loads(await socket.receive())
    return answer


async def test_subscribe_acknowledges_sends_a_snapshot_then_quotes(core: Core) -> None:
    async with ws(core) as socket:
        ack = await ask(socket, {"op": "subscribe", "symbols": ["btc", "BTC", "sber"], "id": 1})
        assert ack == {
            "type": "ack",
            "id": 1,
            "op": "subscribe",
            "symbols": ["BTC", "SBER"],
            "subscriptions": ["BTC", "SBER"],
        }
        snapshot = json.loads(await socket.receive())
        assert snapshot["type"] == "snapshot"
        assert [q["symbol"] for q in snapshot["quotes"]] == ["BTC", "SBER"]
        assert snapshot["quotes"][0]["price"] == core.feed.prices["BTC"]
        core.feed.tick()
        messages = [json.loads(await socket.receive()) for _ in range(2)]
        assert [(m["type"], m["symbol"], m["sequence"]) for m in messages] == [
            ("quote", "BTC", 2),
            ("quote", "SBER", 2),
        ]
        # Subscribing again to what it has: an ack, no snapshot.
        again = await ask(socket, {"op": "subscribe", "symbols": ["BTC"]})
        assert (again["symbols"], again["subscriptions"]) == ([], ["BTC", "SBER"])
        gone = await ask(socket, {"op": "unsubscribe", "symbols": ["sber", "ETH"], "id": "u"})
        assert gone == {
            "type": "ack",
            "id": "u",
            "op": "unsubscribe",
            "symbols": ["SBER"],
            "subscriptions": ["BTC"],
        }
        listed = await ask(socket, {"op": "list"})
        assert listed == {
            "type": "ack",
            "op": "list",
            "subscriptions": ["BTC"],
            "symbols": list(SYMBOLS),
        }
        assert await ask(socket, {"op": "ping", "id": 9}) == {"type": "pong", "id": 9}
        core.feed.tick()
        assert json.loads(await socket.receive())["symbol"] == "BTC"
        core.store.feed_down()
        assert json.loads(await socket.receive()) == {"type": "feed", **core.store.feed_status()}
    assert core.hub.closed[Kind.WS, CloseReason.CLIENT] == 1


@pytest.mark.parametrize("settle_at", [0, 1, 2, 3])
async def test_a_new_subscription_gets_every_quote_after_its_snapshot_once(
    core: Core, settle_at: int
) -> None:
    async with ws(core) as socket:
        await ask(socket, {"op": "subscribe", "symbols": ["BTC"]})
        await socket.receive()  # BTC's snapshot
        # Quotes keep coming while the subscription to ETH is on its way.
        await socket.send(json.dumps({"op": "subscribe", "symbols": ["ETH"]}))
        for step in range(4):
            if step == settle_at:
                await settle()
            core.feed.tick()
        messages: list[dict[str, Any]] = []
        while not (
            messages and messages[-1].get("symbol") == "ETH" and messages[-1]["sequence"] == 5
        ):
            messages.append(json.loads(await socket.receive()))
        (snapshot,) = [m for m in messages if m["type"] == "snapshot"]
        (eth,) = snapshot["quotes"]
        eth_quotes = [m["sequence"] for m in messages if m.get("symbol") == "ETH"]
        assert eth_quotes == list(range(eth["sequence"] + 1, 6))
        btc_quotes = [m["sequence"] for m in messages if m.get("symbol") == "BTC"]
        assert btc_quotes == [2, 3, 4, 5]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "bad_json"),
        (b"\x00\x01", "bad_message"),
        ("[1, 2]", "bad_message"),
        ({"symbols": ["BTC"]}, "missing_field"),
        ({"op": "subscribe"}, "missing_field"),
        ({"op": "dance"}, "unknown_op"),
        ({"op": 7}, "unknown_op"),
        ({"op": "subscribe", "symbols": []}, "bad_field"),
        ({"op": "subscribe", "symbols": "BTC"}, "bad_field"),
        ({"op": "subscribe", "symbols": ["BTC", 5]}, "bad_field"),
        ({"op": "list", "id": [1]}, "bad_field"),
        ({"op": "list", "id": True}, "bad_field"),
        ({"op": "subscribe", "symbols": ["BTC", "DOGE"]}, "unknown_symbol"),
        ({"op": "unsubscribe", "symbols": ["DOGE"]}, "unknown_symbol"),
    ],
)
async def test_bad_messages_get_typed_errors_and_the_connection_stays(
    core: Core, message: object, code: str
) -> None:
    async with ws(core) as socket:
        error = await ask(socket, message)
        assert error["type"] == "error"
        assert error["code"] == code
        assert isinstance(error["message"], str)
        assert error["message"]
        # Nothing changed, and the connection still answers.
        listed = await ask(socket, {"op": "list"})
        assert listed["subscriptions"] == []


async def test_an_error_names_the_request_it_answers(core: Core) -> None:
    async with ws(core) as socket:
        error = await ask(socket, {"op": "subscribe", "symbols": ["NOPE"], "id": "s1"})
        assert error == {
            "type": "error",
            "id": "s1",
            "code": "unknown_symbol",
            "message": "unknown symbol(s): NOPE; nothing changed",
            "symbols": ["NOPE"],
        }


async def test_more_subscriptions_than_the_limit_close_with_1008() -> None:
    core = make_core(PushLimits(ws_max_subscriptions=2))
    async with ws(core) as socket:
        await ask(socket, {"op": "subscribe", "symbols": ["BTC", "ETH"]})
        await socket.receive()  # the snapshot
        await socket.send(json.dumps({"op": "subscribe", "symbols": ["SBER"]}))
        with pytest.raises(WebsocketDisconnectError) as closed:
            await socket.receive()
        assert closed.value.args == (1008,)
    assert core.hub.closed[Kind.WS, CloseReason.LIMIT] == 1


async def test_a_websocket_that_does_not_read_is_conflated_then_closed_with_1013(
    core: Core,
) -> None:
    async with ws(core) as socket:
        await ask(socket, {"op": "subscribe", "symbols": ["BTC", "ETH", "SBER"]})
        await socket.receive()  # the snapshot
        for _ in range(10):
            core.feed.tick()
            await settle()
        for _ in range(BATCH_LIMIT):
            core.feed.tick()
        core.clock.now += 10.5
        core.hub.check(core.clock.now)
        received, code = await until_closed(socket)
        assert code == 1013
        assert len(received) < 3 * (10 + BATCH_LIMIT)
    assert core.hub.closed[Kind.WS, CloseReason.SLOW] == 1


async def test_websockets_get_1001_when_core_shuts_down(core: Core) -> None:
    async with ws(core) as socket:
        core.hub.close()
        with pytest.raises(WebsocketDisconnectError) as closed:
            await socket.receive()
        assert closed.value.args == (1001,)
    assert core.hub.closed[Kind.WS, CloseReason.SHUTDOWN] == 1


@pytest.mark.parametrize(
    ("path", "status", "error"), [("/nope", 404, "not found"), ("/quotes", 400, "bad request")]
)
async def test_a_websocket_handshake_elsewhere_gets_a_json_error(
    core: Core, caplog: pytest.LogCaptureFixture, path: str, status: int, error: str
) -> None:
    async with core.client.websocket(path) as socket:
        with pytest.raises(WebsocketResponseError) as refused:
            await socket.receive()
    response = refused.value.response
    assert response.status_code == status
    assert await response.get_json() == {
        "error": error,
        "path": path,
        "detail": "WebSocket connections go to /ws",
    }
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_plain_http_to_the_websocket_gets_426(core: Core) -> None:
    response = await core.client.get("/ws")
    assert response.status_code == 426
    assert response.headers["Upgrade"] == "websocket"
    assert (await response.get_json())["error"] == "upgrade required"


# --- metrics --------------------------------------------------------------------------


async def test_push_metrics_count_connections_events_conflation_and_ends(core: Core) -> None:
    def sample(name: str, **labels: str) -> float:
        value = core.metrics.registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    async with sse(core) as stream, ws(core):
        await stream.events(2)
        assert sample("quotopia_core_push_connections", kind="sse") == 1
        assert sample("quotopia_core_push_connections", kind="ws") == 1
        core.feed.tick()
        await stream.events(3)
    assert sample("quotopia_core_push_connections", kind="sse") == 0
    assert sample("quotopia_core_push_events_sent_total", kind="sse") == 3
    assert sample("quotopia_core_push_conflated_total", kind="sse") == 0
    assert sample("quotopia_core_push_closed_total", kind="sse", reason="client") == 1
    assert sample("quotopia_core_push_closed_total", kind="ws", reason="client") == 1
    assert sample("quotopia_core_push_closed_total", kind="ws", reason="slow") == 0


# --- direct delivery ------------------------------------------------------------------


class FakeSocket:
    """A :class:`~quotopia.core.push.hub.Direct` writer: takes ``room`` bytes at most
    each write (None: everything), and keeps what it took."""

    chunked = True

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.taken = b""

    def frame(self, payload: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(payload), payload)

    def write_nowait(self, data: bytes) -> int:
        took = data if self.room is None else data[: self.room]
        self.taken += took
        return len(took)


async def test_a_parked_stream_gets_each_tick_written_without_its_task(core: Core) -> None:
    sockets = [FakeSocket(), FakeSocket()]
    given: list[Batch] = []
    subscribers = []
    async with trio.open_nursery() as nursery:
        for socket in sockets:
            subscriber = core.hub.register(Kind.SSE, None, core.store.recent.last_id, None)
            subscriber.direct = socket
            subscribers.append(subscriber)

            async def take(subscriber: Subscriber = subscriber) -> None:
                given.append(await core.hub.next_batch(subscriber))

            nursery.start_soon(take)
        await settle()
        core.feed.tick()
        core.feed.tick("ETH")
        await settle()  # the hub's deliver task would run now; here, by hand:
        core.hub.deliver_now()
        await settle()
        assert given == []  # no task woke
        expected = b"".join(event.sse for event in core.store.recent.after(3, None))
        framed = b"%x\r\n%b\r\n" % (len(expected), expected)
        assert [socket.taken for socket in sockets] == [framed, framed]
        assert core.hub.events_sent[Kind.SSE] == 2 * 4
        assert all(s.cursor == core.store.recent.last_id for s in subscribers)
        nursery.cancel_scope.cancel()
    for subscriber in subscribers:
        core.hub.release(subscriber)


@pytest.mark.parametrize("room", [0, 10])
async def test_a_full_socket_wakes_the_stream_with_nothing_lost(core: Core, room: int) -> None:
    socket = FakeSocket(room)
    subscriber = core.hub.register(Kind.SSE, None, core.store.recent.last_id, None)
    subscriber.direct = socket
    given: list[Batch] = []
    async with trio.open_nursery() as nursery:

        async def take() -> None:
            given.append(await core.hub.next_batch(subscriber))

        nursery.start_soon(take)
        await settle()
        core.feed.tick()
        core.hub.deliver_now()
        await settle()
    (batch,) = given
    if room == 0:  # nothing written: the task takes the tick itself
        assert [event.symbol for event in batch.events] == list(SYMBOLS)
        assert batch.unsent == b""
    else:  # the rest of the frame, for the task to write as it is
        assert batch.events == []
        assert socket.taken + batch.unsent == socket.frame(
            b"".join(event.sse for event in core.store.recent.after(3, None))
        )
    core.hub.release(subscriber)


async def test_half_a_chunk_is_finished_before_a_shutdown_ends_the_stream(core: Core) -> None:
    socket = FakeSocket(10)
    subscriber = core.hub.register(Kind.SSE, None, core.store.recent.last_id, None)
    subscriber.direct = socket
    given: list[Batch] = []
    async with trio.open_nursery() as nursery:

        async def take() -> None:
            given.append(await core.hub.next_batch(subscriber))
            given.append(await core.hub.next_batch(subscriber))

        nursery.start_soon(take)
        await settle()
        core.feed.tick()
        core.hub.deliver_now()
        core.hub.close()
        await settle()
    assert [bool(batch.unsent) for batch in given] == [True, False]
    assert given[1].closing
    core.hub.release(subscriber)
