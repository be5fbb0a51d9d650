"""Core's push protocols end to end: real FT and Core processes, real clients.

Event streams are read with h11 over a socket, as ``curl -N`` would; WebSockets
with the ``websockets`` library (which answers pings by itself, as browsers do)
or, for a client that has stopped reading or died, with wsproto over a socket
that the test then leaves alone. Slow and dead clients are found by Core's own
timers, set short here by flags; the tests wait for what Core reports (its
metrics, its log), never for a fixed time.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import h11
import pytest
from _procs import wait_until
from _services import DEADLINE, SYMBOLS, Service, http_get, running_core, running_ft
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request, TextMessage

pytestmark = pytest.mark.e2e


def metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of Core's ``/metrics``, or None if it has none such."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def no_connections(port: int, kind: str) -> bool:
    return metric(port, "quotopia_core_push_connections", kind=kind) == 0


def no_problems(service: Service) -> bool:
    return not [
        line for line in service.process.stderr_lines if " ERROR " in line or "Trace" in line
    ]


# --- clients ------------------------------------------------------------------------


class EventStream:
    """``GET /quotes/stream`` over a socket, decoded by h11; events parsed."""

    def __init__(self, port: int, query: str = "", *, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:
            # Before connecting, so that the window TCP offers stays this small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(("127.0.0.1", port))
        self.http = h11.Connection(h11.CLIENT)
        target = "/quotes/stream" + (f"?{query}" if query else "")
        request = h11.Request(method="GET", target=target, headers=[("Host", "core")])
        self.sock.sendall(self.http.send(request) + self.http.send(h11.EndOfMessage()))
        self.buffer = b""
        self.ended = False
        self.status: int | None = None

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.buffer += event.data
                return
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.ended = True
                return

    def next_event(self) -> tuple[str, Any]:
        """The next event's type and data; ``("end", None)`` when the stream ends."""
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                fields = dict(
                    line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
                )
                if "event" in fields:
                    return fields["event"], json.loads(fields["data"])
            if self.ended:
                return "end", None
            self._more()

    def until(self, kind: str, **fields: object) -> dict[str, Any]:
        """Read until an event of ``kind`` whose data has ``fields``; return its data."""
        while True:
            event, data = self.next_event()
            assert event != "end", f"the stream ended before a {kind} {fields}"
            if event == kind and all(data.get(k) == v for k, v in fields.items()):
                assert isinstance(data, dict)
                return data


@contextmanager
def event_stream(port: int, query: str = "") -> Iterator[EventStream]:
    stream = EventStream(port, query)
    try:
        yield stream
    finally:
        stream.close()


def until_message(ws: ClientConnection, kind: str, **fields: object) -> dict[str, Any]:
    while True:
        message = json.loads(ws.recv(timeout=DEADLINE))
        if message["type"] == kind and all(message.get(k) == v for k, v in fields.items()):
            assert isinstance(message, dict)
            return message


def close_code(ws: ClientConnection) -> int | None:
    """Read until Core closes ``ws``; the code of its close frame (None: none)."""
    try:
        while True:
            ws.recv(timeout=DEADLINE)
    except ConnectionClosed as closed:
        return None if closed.rcvd is None else closed.rcvd.code


def silent_websocket(port: int, *first: str) -> socket.socket:
    """A WebSocket that completes its handshake, sends ``first`` messages, and then
    never reads again: no pongs, no room for what Core sends."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", port))
    client = WSConnection(ConnectionType.CLIENT)
    sock.sendall(client.send(Request(host="core", target="/ws")))
    accepted = False
    while not accepted:
        client.receive_data(sock.recv(4096))
        accepted = any(isinstance(event, AcceptConnection) for event in client.events())
    for message in first:
        sock.sendall(client.send(TextMessage(data=message)))
    return sock


def drained_until_closed(sock: socket.socket) -> bool:
    """Read what is left until Core closes the connection: True if it did."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# --- the tests ----------------------------------------------------------------------


def test_sse_and_websocket_clients_follow_the_feed_through_an_ft_restart() -> None:
    with running_ft() as ft, running_core(ft.port) as core:
        wait_until(lambda: metric(core.port, "quotopia_core_ready") == 1, DEADLINE, what="ready")
        with (
            event_stream(core.port, "symbols=btc") as stream,
            ws_connect(f"ws://127.0.0.1:{core.port}/ws", open_timeout=DEADLINE) as ws,
        ):
            assert stream.next_event()[0] == "snapshot"
            assert stream.next_event()[0] == "feed"
            assert stream.until("quote")["symbol"] == "BTC"
            until_message(ws, "hello")
            ws.send(json.dumps({"op": "subscribe", "symbols": list(SYMBOLS)}))
            until_message(ws, "snapshot")
            before = until_message(ws, "quote", symbol="ETH")
            ft.process.kill()
            assert stream.until("feed", connected=False)
            assert until_message(ws, "feed", connected=False)
            with running_ft(port=ft.port, seed=2):
                assert stream.until("feed", connected=True)["reconnects"] == 1
                assert until_message(ws, "feed", connected=True)
                # A restarted FT counts its sequence numbers from 0 again.
                again = until_message(ws, "quote", symbol="ETH")
                assert again["sequence"] < before["sequence"]
                assert stream.until("quote")["symbol"] == "BTC"
        assert no_problems(core), core.process.output()


class Reader(threading.Thread):
    """Reads an event stream as fast as it comes, keeping BTC's sequence numbers."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.stream = EventStream(port, "symbols=BTC")
        self.sequences: list[int] = []
        self.stop = threading.Event()
        #: What ended the reading early, if anything did.
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                event, data = self.stream.next_event()
                if event == "end":
                    return
                if event == "quote":
                    self.sequences.append(data["sequence"])
        except OSError as error:  # the socket closed under it: expected once stopped
            if not self.stop.is_set():
                self.error = error

    def close(self) -> None:
        self.stop.set()
        self.stream.close()
        self.join(DEADLINE)


@pytest.mark.parametrize("kind", ["sse", "ws"])
def test_a_client_that_stops_reading_is_cut_and_nobody_else_waits(kind: str) -> None:
    # 300 quotes a second fill a small socket in moments; a second behind is slow.
    with (
        running_ft(tick=0.01) as ft,
        running_core(ft.port, "--push-lag-limit", "1") as core,
    ):
        wait_until(lambda: metric(core.port, "quotopia_core_ready") == 1, DEADLINE, what="ready")
        reader = Reader(core.port)
        reader.start()
        try:
            wait_until(lambda: reader.sequences, DEADLINE, what="a first quote for the reader")
            if kind == "sse":
                stuck_sock = EventStream(core.port, receive_buffer=4096).sock
            else:
                subscribe = json.dumps({"op": "subscribe", "symbols": list(SYMBOLS)})
                stuck_sock = silent_websocket(core.port, subscribe)
            try:
                wait_until(
                    lambda: (
                        metric(
                            core.port, "quotopia_core_push_closed_total", kind=kind, reason="slow"
                        )
                        == 1
                    ),
                    DEADLINE,
                    interval=0.1,
                    what=f"the {kind} client that stopped reading to be closed as slow",
                )
                core.process.wait_for_line(
                    r"WARNING +closing a slow (SSE|WebSocket) client 127\.0\.0\.1:\d+: "
                    r"\d+\.\d+s behind \(limit 1s\)",
                    DEADLINE,
                )
                assert drained_until_closed(stuck_sock)
            finally:
                stuck_sock.close()
            # The client that reads was never held up: every BTC quote, in order,
            # none conflated away, and it is on the newest one.
            newest = http_get(core.port, "/quotes/BTC")[1]["sequence"]
            wait_until(
                lambda: reader.sequences[-1] >= newest, DEADLINE, what="the reader to be current"
            )
        finally:
            reader.close()
        assert reader.error is None
        sequences = reader.sequences
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
        for each in ("sse", "ws"):
            wait_until(partial(no_connections, core.port, each), DEADLINE, what=f"no {each} left")
        assert metric(core.port, "quotopia_core_push_closed_total", kind="sse", reason="slow") == (
            1 if kind == "sse" else 0
        )
        assert no_problems(core), core.process.output()


def test_a_websocket_peer_that_answers_no_ping_is_dropped() -> None:
    with (
        running_ft() as ft,
        running_core(ft.port, "--ws-ping-interval", "0.3", "--ws-ping-timeout", "0.3") as core,
    ):
        with ws_connect(f"ws://127.0.0.1:{core.port}/ws", open_timeout=DEADLINE) as alive:
            until_message(alive, "hello")
            with silent_websocket(core.port) as dead:
                started = time.monotonic()
                assert drained_until_closed(dead)
                dropped_after = time.monotonic() - started
                assert metric(core.port, "quotopia_core_push_connections", kind="ws") == 1
                # The client that answers pings (websockets does, as browsers do)
                # stays, through more pings than it took to drop the silent one.
                deadline = time.monotonic() + 2 * dropped_after
                while time.monotonic() < deadline:
                    alive.send(json.dumps({"op": "ping", "id": 1}))
                    assert until_message(alive, "pong") == {"type": "pong", "id": 1}
        assert no_problems(core), core.process.output()


def test_push_connections_end_cleanly_on_sigterm() -> None:
    with running_ft() as ft, running_core(ft.port) as core:
        wait_until(lambda: metric(core.port, "quotopia_core_ready") == 1, DEADLINE, what="ready")
        with (
            event_stream(core.port) as stream,
            ws_connect(f"ws://127.0.0.1:{core.port}/ws", open_timeout=DEADLINE) as ws,
        ):
            stream.until("quote")
            until_message(ws, "hello")
            core.process.signal(signal.SIGTERM)
            while stream.next_event()[0] != "end":
                pass
            assert stream.ended  # the chunked body ended: a clean end, not a cut
            assert close_code(ws) == 1001
        assert core.process.wait(DEADLINE) == 0
        assert no_problems(core), core.process.output()
