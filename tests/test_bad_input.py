"""Bad input never crashes a service and never shows a traceback (issue 3, point 7).

One FT and one Core run for the whole module, as real ``python -m quotopia``
processes on OS-assigned ports. Before any abuse, two well-behaved FT clients
subscribe: Core's feed and a grpcio "watcher" thread. Every test then sends
something bad and checks the answer:

* Core: every bad HTTP request gets a 4xx JSON error (status 4xx, Content-Type
  application/json, a JSON object with an "error" key). Requests go over raw
  sockets, so they can be as malformed as we like, and the response is parsed
  here, by its Content-Length, not by waiting for the server to close.
* FT: every bad call gets a gRPC status (or, for bytes that are not HTTP/2 at
  all, a closed connection), and afterwards FT still serves everyone: a new
  client reads the snapshot, the watcher's sequence numbers keep rising, and FT
  logged no traceback and no ERROR line meanwhile.

The log check needs to know when FT has logged everything about the abuse: a new
client's "client disconnected: <its address>" line is the barrier, since FT logs
in order. One before the abuse and one after bound each test's window.

Cases that fail today are ``xfail(strict=True)`` with the reason; each reason
names what the server sends and where it comes from.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import pytest
from _procs import wait_until
from _services import DEADLINE, SYMBOLS, Service, running_core, running_ft
from grpclib.const import Status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived

from quotopia._proto import Quote, StreamQuotesRequest

pytestmark = pytest.mark.e2e

#: A server that drops a bad connection does so at once; this is how long we wait.
CLOSE_WITHIN = 6.0

METHOD = "/QuoteService/StreamQuotes"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

KIB = 1024


# --- the services ----------------------------------------------------------------


class Watcher:
    """A well-behaved grpcio client of FT, streaming every symbol in a thread.

    Resource handling: ``close()`` (or leaving the ``with`` block) cancels the call,
    joins the thread and closes the channel.
    """

    def __init__(self, port: int) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stream_quotes = self._channel.unary_stream(
            METHOD,
            request_serializer=StreamQuotesRequest.SerializeToString,
            response_deserializer=Quote.FromString,
        )
        self._call = stream_quotes(StreamQuotesRequest())
        self._lock = threading.Lock()
        self._received: list[tuple[str, int]] = []
        self._error: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for quote in self._call:
                with self._lock:
                    self._received.append((quote.symbol, quote.sequence))
        except grpc.RpcError as error:
            with self._lock:
                self._error = error

    def received(self) -> list[tuple[str, int]]:
        """(symbol, sequence) of every quote so far, in order of arrival."""
        with self._lock:
            return list(self._received)

    def newest(self) -> int:
        """The highest sequence number received so far (0 before the first quote)."""
        with self._lock:
            return max((sequence for _, sequence in self._received), default=0)

    def error(self) -> Any:
        """The call's error if it ended, else None."""
        with self._lock:
            return self._error

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(DEADLINE)
        self._channel.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Services:
    ft: Service
    core: Service
    watcher: Watcher


#: FT's flags here: connections that never finish a frame are closed after about 2 s.
FT_FLAGS = ("--keepalive", "1")


@contextlib.contextmanager
def running_core_with_quotes(ft_port: int) -> Iterator[Service]:
    """Core, once it listens and has every symbol's quote."""
    with running_core(ft_port, "--backoff-cap", "0.5") as core:
        wait_until(lambda: set(quotes(core.port)) == SYMBOLS, DEADLINE, what="quotes at Core")
        yield core


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    """FT, then Core and the watcher: both subscribed before any test abuses FT."""
    with (
        running_ft(*FT_FLAGS, tick=0.1, seed=3) as ft,
        running_core_with_quotes(ft.port) as core,
        Watcher(ft.port) as watcher,
    ):
        wait_until(lambda: watcher.newest() > 0, DEADLINE, what="the watcher's first quote")
        yield Services(ft, core, watcher)


@pytest.fixture
def lone_core(services: Services) -> Iterator[Service]:
    """A Core of its own, for a test whose damage must not spill into the shared one."""
    with running_core_with_quotes(services.ft.port) as core:
        yield core


def log_problems(lines: Iterable[str]) -> list[str]:
    return [line for line in lines if "Traceback" in line or " ERROR " in line]


def readable(lines: Iterable[str]) -> str:
    """Log lines without FT's per-tick price lines, for assertion messages."""
    return "\n".join(line for line in lines if " → " not in line)


# --- HTTP over raw sockets -------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def __str__(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return f"HTTP {self.status} {self.headers} {body!r}"


def http_request(method: bytes, target: bytes, headers: Iterable[bytes] = ()) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    return b"\r\n".join([*lines, *headers, b"", b""])


def send_all(sock: socket.socket, data: bytes) -> None:
    # A server may refuse (and close) before reading everything; what it answered
    # is still there to read.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(64 * KIB)
    except ConnectionResetError:
        return b""


def read_reply(sock: socket.socket, *, head: bool = False) -> Reply | None:
    """Read one HTTP/1.1 response; None if the server closed without sending one.

    The body is read by Content-Length when there is one (none for HEAD, 1xx, 204
    and 304), so this does not wait for the server to close the connection.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock)
        if not chunk:
            assert not data, f"the connection closed mid-response: {data!r}"
            return None
        data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    version, status_text, *_ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    status = int(status_text)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head or status < 200 or status in (204, 304):
        return Reply(status, headers, b"")
    assert "transfer-encoding" not in headers, f"unexpected {headers['transfer-encoding']}"
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = _recv(sock)
            assert chunk, f"the connection closed mid-body: {status_line} {headers}"
            body += chunk
        return Reply(status, headers, body[:length])
    while chunk := _recv(sock):
        body += chunk
    return Reply(status, headers, body)


def exchange(port: int, request: bytes, *, head: bool = False) -> Reply | None:
    """Send ``request`` as is on a new connection, read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        send_all(sock, request)
        return read_reply(sock, head=head)


def get_json(port: int, path: str) -> tuple[int, Any]:
    reply = exchange(port, http_request(b"GET", path.encode()))
    assert reply is not None, f"GET {path}: closed without a response"
    assert reply.headers.get("content-type") == "application/json", str(reply)
    return reply.status, json.loads(reply.body)


def quotes(port: int) -> dict[str, float]:
    status, body = get_json(port, "/quotes")
    assert status == 200
    assert isinstance(body, dict)
    return body


def assert_json_error(
    reply: Reply | None, *, head: bool = False, statuses: range | set[int] = range(400, 500)
) -> Any:
    """A 4xx (or one of ``statuses``) JSON error; returns the parsed body (None for HEAD)."""
    assert reply is not None, "the connection was closed without a response"
    assert reply.status in statuses, str(reply)
    content_type = reply.headers.get("content-type", "")
    assert content_type.startswith("application/json"), str(reply)
    if head:
        assert reply.body == b"", str(reply)
        return None
    body = json.loads(reply.body)
    assert isinstance(body, dict), str(reply)
    assert "error" in body, str(reply)
    return body


# --- Core: HTTP ------------------------------------------------------------------

TEN_KB_SYMBOL = "A" * (10 * KIB)


@pytest.mark.parametrize(
    ("target", "symbol"),
    [
        pytest.param(f"/quotes/{TEN_KB_SYMBOL}", TEN_KB_SYMBOL, id="10KB-symbol"),
        pytest.param("/quotes/%E2%82%BF", "\u20bf", id="bitcoin-sign"),
        pytest.param("/quotes/%F0%9F%9A%80", "\U0001f680", id="emoji"),
        pytest.param("/quotes/%D7%A9%D7%9C%D7%95%D7%9D", "\u05e9\u05dc\u05d5\u05dd", id="hebrew"),
        pytest.param("/quotes/%E2%80%AEBTC", "\u202eBTC", id="rtl-override"),
        pytest.param("/quotes/%00", "\x00", id="nul"),
        pytest.param("/quotes/BTC%00", "BTC\x00", id="BTC-nul"),
        pytest.param("/quotes/%ff%fe", None, id="invalid-utf8"),
        pytest.param("/quotes/%zz", None, id="bad-percent-escape"),
        pytest.param("/%00", None, id="nul-route"),
        pytest.param("/quotes/../../etc/passwd", None, id="traversal"),
        pytest.param("/quotes/..%2F..%2Fetc%2Fpasswd", None, id="traversal-encoded"),
        pytest.param("/%2e%2e/", None, id="dot-dot-encoded"),
        pytest.param("/%2e%2e/%2e%2e/etc/passwd", None, id="traversal-dots-encoded"),
        pytest.param("/quotes/%2e%2e", None, id="symbol-dot-dot"),
        pytest.param("/health\\..\\..\\etc\\passwd", None, id="backslashes"),
        pytest.param("/quotes/BTC/", None, id="trailing-slash"),
        pytest.param("/QUOTES", None, id="upper-case-route"),
        pytest.param(
            "/quotes//BTC",
            None,
            id="double-slash",
        ),
    ],
)
def test_a_bad_path_is_a_json_4xx(services: Services, target: str, symbol: str | None) -> None:
    reply = exchange(services.core.port, http_request(b"GET", target.encode()))
    body = assert_json_error(reply)
    if symbol is not None:
        assert body["symbol"] == symbol
    assert reply is not None
    assert b"root:" not in reply.body


METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE"]
METHODS += [b"CONNECT", b"FOO"]
ROUTES = [b"/health", b"/quotes", b"/quotes/BTC", b"/nope"]


@pytest.mark.parametrize("route", ROUTES, ids=bytes.decode)
@pytest.mark.parametrize("method", METHODS, ids=bytes.decode)
def test_every_method_on_every_route(services: Services, method: bytes, route: bytes) -> None:
    head = method == b"HEAD"
    reply = exchange(services.core.port, http_request(method, route), head=head)
    if route == b"/nope":
        assert_json_error(reply, head=head, statuses={404})
    elif method in (b"GET", b"HEAD"):
        assert reply is not None
        assert reply.status == 200, str(reply)
        assert reply.headers["content-type"] == "application/json", str(reply)
        if not head:
            json.loads(reply.body)
    else:
        assert_json_error(reply, head=head, statuses={405})
        assert reply is not None
        # Werkzeug lists the methods in no fixed order.
        allowed = {name.strip() for name in reply.headers["allow"].split(",")}
        assert allowed == {"GET", "HEAD"}, str(reply)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(http_request(b"OPTIONS", b"*"), id="OPTIONS-asterisk"),
        pytest.param(http_request(b"CONNECT", b"127.0.0.1:443"), id="CONNECT-authority"),
    ],
)
def test_an_odd_request_target_is_a_json_4xx(services: Services, request_bytes: bytes) -> None:
    assert_json_error(exchange(services.core.port, request_bytes))


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(http_request(b"GET", b"/quotes?%zz=1&&=&a=%"), id="malformed-query"),
        pytest.param(http_request(b"GET", b"/quotes?%00"), id="nul-query"),
        pytest.param(http_request(b"GET", b"/health?" + b"q" * 10 * KIB), id="10KB-query"),
        pytest.param(
            http_request(b"GET", b"/health", [b"X-H%d: v" % i for i in range(200)]),
            id="200-small-headers",
        ),
        pytest.param(http_request(b"GET", b"http://127.0.0.1/health"), id="absolute-form"),
        pytest.param(http_request(b"get", b"/health"), id="lower-case-method"),
    ],
)
def test_an_odd_but_valid_request_is_answered_in_json(
    services: Services, request_bytes: bytes
) -> None:
    """Core has no query parameters and ignores headers it does not know: these
    are served like the plain request (or refused with a 4xx JSON error)."""
    reply = exchange(services.core.port, request_bytes)
    assert reply is not None, "the connection was closed without a response"
    if reply.status != 200:
        assert_json_error(reply)
    assert reply.headers["content-type"] == "application/json", str(reply)
    json.loads(reply.body)


@pytest.mark.parametrize(
    ("request_bytes", "statuses"),
    [
        pytest.param(
            http_request(b"GET", b"/health", [b"X-Big: " + b"a" * 64 * KIB]),
            {431},
            id="64KiB-header",
        ),
        # Over 64 KiB in all, like the one above: hypercorn reads 64 KiB at a time,
        # and h11 only measures headers it has not seen the end of, so headers that
        # arrive whole in one read pass at any size up to that.
        pytest.param(
            http_request(b"GET", b"/health", [b"X-H%d: %s" % (i, b"v" * 400) for i in range(200)]),
            {431},
            id="200-headers-80KiB",
        ),
        pytest.param(b"GARBAGE\r\n\r\n", {400}, id="request-line-garbage"),
        pytest.param(b"GET /health\r\n\r\n", {400}, id="request-line-no-version"),
        pytest.param(b"GET  HTTP/1.1\r\nHost: x\r\n\r\n", {400}, id="request-line-no-target"),
        pytest.param(
            b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n", {400}, id="request-line-extra"
        ),
        pytest.param(b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n", {400}, id="space-in-target"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", {400}, id="tls-hello"),
        pytest.param(b"\x00" * 32 + b"\r\n\r\n", {400}, id="nul-bytes"),
        pytest.param(http_request(b"GET", b"/quotes/\x00"), {400}, id="raw-nul-in-path"),
        pytest.param(http_request(b"GET", "/quotes/\u20bf".encode()), {400}, id="raw-utf8-in-path"),
        pytest.param(http_request(b"GET", b"/health", [b"Bad Name: x"]), {400}, id="bad-header"),
        pytest.param(http_request(b"GET", b"/health", [b"X-Nul: a\x00b"]), {400}, id="nul-header"),
        pytest.param(http_request(b"GET", b"/health", [b"Host: y"]), {400}, id="two-hosts"),
        pytest.param(
            http_request(b"GET", b"/health", [b"Content-Length: -1"]),
            {400},
            id="negative-content-length",
        ),
        pytest.param(
            http_request(b"GET", b"/health", [b"Content-Length: 1", b"Content-Length: 2"]),
            {400},
            id="two-content-lengths",
        ),
        # RFC 9112 section 6.1: an unknown transfer coding gets 501.
        pytest.param(
            http_request(b"GET", b"/health", [b"Transfer-Encoding: gzip"]),
            {501},
            id="unknown-transfer-coding",
        ),
    ],
)
def test_a_request_hypercorn_rejects_is_a_json_error(
    services: Services, request_bytes: bytes, statuses: set[int]
) -> None:
    assert_json_error(exchange(services.core.port, request_bytes), statuses=statuses)


def websocket_handshake(target: bytes, *, drop: bytes = b"", extra: bytes = b"") -> bytes:
    """A WebSocket opening handshake for ``target``, less the header named ``drop``."""
    headers = [
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    kept = [h for h in headers if not drop or not h.lower().startswith(drop.lower() + b":")]
    lines = [b"GET " + target + b" HTTP/1.1", *kept, *([extra] if extra else [])]
    return b"\r\n".join([*lines, b"", b""])


@pytest.mark.parametrize(
    "target", [b"/nope", b"/quotes", b"/health", b"/quotes/BTC", b"/quotes/stream", b"/docs"]
)
def test_a_websocket_handshake_elsewhere_is_a_json_4xx(services: Services, target: bytes) -> None:
    """Only /ws takes WebSockets: elsewhere a handshake gets the JSON error any
    request would (this once logged a traceback and answered 500)."""
    body = assert_json_error(exchange(services.core.port, websocket_handshake(target)))
    assert body["path"] == target.decode()
    assert body["detail"] == "WebSocket connections go to /ws"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(websocket_handshake(b"/ws", drop=b"Sec-WebSocket-Key"), id="no-key"),
        pytest.param(websocket_handshake(b"/ws", drop=b"Sec-WebSocket-Version"), id="no-version"),
        pytest.param(
            websocket_handshake(
                b"/ws", drop=b"Sec-WebSocket-Version", extra=b"Sec-WebSocket-Version: 8"
            ),
            id="old-version",
        ),
        pytest.param(http_request(b"GET", b"/ws"), id="plain-get"),
        pytest.param(http_request(b"POST", b"/ws", [b"Content-Length: 0"]), id="post"),
    ],
)
def test_a_bad_websocket_handshake_is_a_json_4xx(services: Services, request_bytes: bytes) -> None:
    assert_json_error(exchange(services.core.port, request_bytes))


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(b"symbols=DOGE", id="unknown"),
        pytest.param(b"symbols=BTC,DOGE", id="one-unknown"),
        pytest.param(b"symbols=" + b"A" * 10 * KIB, id="10KB-symbol"),
        pytest.param(b"symbols=%00", id="nul"),
        pytest.param(b"symbols=%ff%fe", id="invalid-utf8"),
        pytest.param(b"symbols=,,,", id="only-commas"),
        pytest.param(b"symbols=%E2%80%AEBTC", id="rtl-override"),
    ],
)
def test_a_bad_stream_filter_is_a_json_4xx_before_any_event(
    services: Services, query: bytes
) -> None:
    reply = exchange(services.core.port, http_request(b"GET", b"/quotes/stream?" + query))
    assert_json_error(reply, statuses={400})


def test_connection_close_is_honoured(services: Services) -> None:
    with socket.create_connection(("127.0.0.1", services.core.port), timeout=DEADLINE) as sock:
        sock.sendall(http_request(b"GET", b"/health"))
        reply = read_reply(sock)
        assert reply is not None
        assert reply.status == 200
        sock.settimeout(CLOSE_WITHIN)
        try:
            rest = _recv(sock)
        except TimeoutError:
            raise AssertionError(
                f"still open {CLOSE_WITHIN}s after a 'Connection: close' response"
            ) from None
        assert rest == b""


def test_an_absurd_content_length_on_get_is_a_json_4xx(lone_core: Service) -> None:
    request = http_request(b"GET", b"/health", [b"Content-Length: 99999999999999999999"])
    assert_json_error(exchange(lone_core.port, request))


def test_a_body_that_never_comes_leaves_no_traceback(lone_core: Service) -> None:
    """Clients that declare a body, read the answer and leave: Core logs nothing bad.

    A race, lost by about one client in three here and one in twenty on a loaded
    machine: hence so many clients.
    """
    request = http_request(b"GET", b"/health", [b"Content-Length: 10"])
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", lone_core.port), timeout=DEADLINE) as sock:
            sock.sendall(request)
            assert read_reply(sock) is not None
    process = lone_core.process
    assert process.terminate(DEADLINE) == 0, process.output()
    lines = process.stderr_lines
    problems = log_problems(lines)
    if problems:
        first = lines.index(problems[0])
        shown = "\n".join(lines[first : first + 40])
        raise AssertionError(f"{len(problems)} bad log lines; the first:\n{shown}")


def test_core_still_serves_after_all_that(services: Services) -> None:
    core = services.core
    assert set(quotes(core.port)) == SYMBOLS
    status, health = get_json(core.port, "/health")
    assert status == 200
    assert health["feed"]["connected"], health
    assert core.process.returncode is None, core.process.output()
    assert not log_problems(core.process.stderr_lines), core.process.output()


# --- FT: gRPC over raw HTTP/2 ----------------------------------------------------


def grpc_frame(message: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """gRPC's length-prefixed message; ``length`` may lie about the size."""
    return struct.pack(">?I", compressed, len(message) if length is None else length) + message


def grpc_headers(
    port: int, overrides: Mapping[str, str | None] | None = None
) -> list[tuple[str, str]]:
    """StreamQuotes' request headers; an override of None drops that header."""
    headers: dict[str, str | None] = {
        ":method": "POST",
        ":scheme": "http",
        ":path": METHOD,
        ":authority": f"127.0.0.1:{port}",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    headers.update(overrides or {})
    return [(name, value) for name, value in headers.items() if value is not None]


def _decode(headers: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    return {text(name): text(value) for name, value in headers}


@dataclass
class H2Reply:
    local_port: int
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    messages: list[bytes] = field(default_factory=list)
    ended: bool = False

    @property
    def grpc_status(self) -> str | None:
        code = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if code is None else Status(int(code)).name


def h2_call(
    port: int, headers: list[tuple[str, str]], body: bytes, *, want: int | None = None
) -> H2Reply:
    """One HTTP/2 request on a new connection (``body`` under 16 KiB).

    Reads until the stream ends, the connection closes, or ``want`` messages came;
    then closes the connection.
    """
    conn = H2Connection(H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        reply = H2Reply(sock.getsockname()[1])
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers, end_stream=not body)
        if body:
            conn.send_data(stream_id, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        buffer = bytearray()
        while not reply.ended and (want is None or len(reply.messages) < want):
            data = _recv(sock)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    reply.headers = _decode(event.headers)
                elif isinstance(event, TrailersReceived):
                    reply.trailers = _decode(event.headers)
                elif isinstance(event, DataReceived):
                    buffer += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, StreamEnded | StreamReset):
                    reply.ended = True
            sock.sendall(conn.data_to_send())
            while len(buffer) >= 5:
                _, length = struct.unpack(">?I", buffer[:5])
                if len(buffer) < 5 + length:
                    break
                reply.messages.append(bytes(buffer[5 : 5 + length]))
                del buffer[: 5 + length]
    return reply


def grpcio_call(port: int, method: str, request: bytes) -> tuple[str, str]:
    """A grpcio call with a raw request body: (status name, details); OK once a quote came."""

    def as_is(data: bytes) -> bytes:
        return data

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(method, request_serializer=as_is, response_deserializer=as_is)
        replies = call(request, timeout=DEADLINE)
        try:
            next(replies)
        except grpc.RpcError as error:
            return str(error.code().name), str(error.details() or "")
        finally:
            replies.cancel()
    return "OK", ""


def close_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection, within ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := _recv(sock):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {seconds}s; received {received[-64:]!r}") from None
    return received


def new_client(services: Services) -> int:
    """A new client reads FT's snapshot and leaves.

    Returns the length of FT's log once FT has logged that client's leaving: FT
    logs in order, so by then the log holds everything FT logged before it.
    """
    ft = services.ft
    start = len(ft.process.stderr_lines)
    reply = h2_call(ft.port, grpc_headers(ft.port), grpc_frame(b""), want=len(SYMBOLS))
    assert {Quote.parse(message).symbol for message in reply.messages} == SYMBOLS, reply
    ft.process.wait_for_line(
        rf"client disconnected: 127\.0\.0\.1:{reply.local_port};", DEADLINE, start=start
    )
    return len(ft.process.stderr_lines)


@dataclass(frozen=True)
class Mark:
    """Where FT's log and the watcher stood before an abuse."""

    log_line: int
    sequence: int


def mark(services: Services) -> Mark:
    # After a new client: a previous test's lines cannot arrive late, into this window.
    return Mark(new_client(services), services.watcher.newest())


def assert_ft_unharmed(services: Services, since: Mark) -> None:
    """FT still serves a new client and the watcher, and logged nothing bad since."""
    ft = services.ft
    end = new_client(services)
    wait_until(
        lambda: services.watcher.newest() > since.sequence,
        DEADLINE,
        what="a newer quote at the watcher",
    )
    assert ft.process.returncode is None, ft.process.output()
    window = ft.process.stderr_lines[since.log_line : end]
    assert not log_problems(window), readable(window)


INVALID = {"INVALID_ARGUMENT"}
MALFORMED = {"INVALID_ARGUMENT", "INTERNAL"}


@pytest.mark.parametrize(
    ("request_bytes", "statuses", "mentions"),
    [
        pytest.param(
            bytes(StreamQuotesRequest(["BTC", "DOGE"])), INVALID, "'DOGE'", id="unknown-symbol"
        ),
        pytest.param(
            bytes(StreamQuotesRequest([f"S{i}" for i in range(10_000)])),
            INVALID,
            "too many symbols",
            id="10000-symbols",
        ),
        pytest.param(
            bytes(StreamQuotesRequest(["X" * 1_000_000])),
            INVALID,
            "unknown symbol 'XXXX",
            id="1MB-symbol",
        ),
        pytest.param(bytes(StreamQuotesRequest([""])), INVALID, "unknown symbol ''", id="empty"),
        pytest.param(b"\x0a\x10abc", MALFORMED, None, id="field-longer-than-message"),
        pytest.param(b"\x0a\x02\xff\xfe", MALFORMED, None, id="invalid-utf8"),
        pytest.param(b"\x0a\x80", MALFORMED, None, id="truncated-varint"),
        pytest.param(b"\x08\x01", MALFORMED, None, id="varint-for-string"),
        pytest.param(b"\x0b", MALFORMED, None, id="group-for-string"),
        pytest.param(b"\x09" + bytes(8), MALFORMED, None, id="fixed64-for-string"),
    ],
)
def test_a_bad_stream_quotes_request_gets_a_status(
    services: Services, request_bytes: bytes, statuses: set[str], mentions: str | None
) -> None:
    before = mark(services)
    status, details = grpcio_call(services.ft.port, METHOD, request_bytes)
    assert status in statuses, (status, details[:200])
    if mentions is not None:
        assert mentions in details
    assert len(details) < 1000, "the status message must not echo a huge request"
    assert_ft_unharmed(services, before)


@pytest.mark.parametrize("method", ["/QuoteService/Nope", "/Nope/StreamQuotes", "/"])
def test_an_unknown_method_is_unimplemented(services: Services, method: str) -> None:
    before = mark(services)
    assert grpcio_call(services.ft.port, method, b"")[0] == "UNIMPLEMENTED"
    assert_ft_unharmed(services, before)


@pytest.mark.parametrize(
    ("overrides", "http_status"),
    [
        pytest.param({"content-type": "application/json"}, "415", id="json-content-type"),
        pytest.param({"content-type": "text/plain"}, "415", id="text-content-type"),
        pytest.param({"content-type": None}, "415", id="no-content-type"),
        pytest.param({":method": "GET"}, "405", id="GET"),
    ],
)
def test_a_request_that_is_not_grpc_is_refused(
    services: Services, overrides: dict[str, str | None], http_status: str
) -> None:
    before = mark(services)
    port = services.ft.port
    reply = h2_call(port, grpc_headers(port, overrides), b"{}")
    assert reply.ended, reply
    assert reply.headers[":status"] == http_status, reply
    assert_ft_unharmed(services, before)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="no-message"),
        pytest.param(grpc_frame(b"\x0a\x03BTC", length=16), id="short-message"),
        pytest.param(grpc_frame(b"\x0a\x03BTC")[:3], id="short-prefix"),
        pytest.param(grpc_frame(b"", compressed=True), id="compressed-flag"),
    ],
)
def test_bad_grpc_framing_gets_a_status(services: Services, body: bytes) -> None:
    before = mark(services)
    port = services.ft.port
    reply = h2_call(port, grpc_headers(port), body)
    assert reply.ended, reply
    # A compressed message without grpc-encoding is INTERNAL (gRPC's PROTOCOL-HTTP2.md).
    assert reply.grpc_status in MALFORMED, reply
    assert_ft_unharmed(services, before)


_GARBAGE = random.Random(1).randbytes(4 * KIB)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"\x00" + _GARBAGE, id="random-bytes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", id="http1.1"),
        pytest.param(
            # An empty SETTINGS frame, then DATA on stream 0: PROTOCOL_ERROR.
            PREFACE + bytes.fromhex("000000040000000000") + bytes.fromhex("000003000000000000"),
            id="preface-then-data-on-stream-0",
        ),
        pytest.param(
            # The first bytes read as a frame header announcing 0xf5b165 bytes.
            PREFACE + _GARBAGE,
            # h2 waits for the whole declared length before checking it against
            # SETTINGS_MAX_FRAME_SIZE; FT's keepalive ping closes the connection.
            id="preface-then-random-bytes",
        ),
    ],
)
def test_a_client_that_does_not_speak_http2_is_disconnected(
    services: Services, sent: bytes
) -> None:
    before = mark(services)
    with socket.create_connection(("127.0.0.1", services.ft.port), timeout=DEADLINE) as sock:
        send_all(sock, sent)
        received = close_within(sock, CLOSE_WITHIN)
    assert b"HTTP/1.1 200" not in received
    assert_ft_unharmed(services, before)


def test_ft_still_serves_everyone_after_all_that(services: Services) -> None:
    before = mark(services)
    assert_ft_unharmed(services, before)
    watcher = services.watcher
    assert watcher.error() is None, watcher.error()
    received = watcher.received()
    last: dict[str, int] = {}
    for symbol, sequence in received:
        assert sequence > last.get(symbol, 0), f"{symbol} #{sequence} after #{last.get(symbol)}"
        last[symbol] = sequence
    assert set(last) == SYMBOLS
    status, health = get_json(services.core.port, "/health")
    assert status == 200
    assert health["feed"]["connected"], health
    assert health["feed"]["reconnects"] == 0, "Core's feed from FT broke"
