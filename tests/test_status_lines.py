"""HTTP/1.1 status lines carry a reason phrase: ``HTTP/1.1 404 Not Found``.

hypercorn writes none by itself (``HTTP/1.1 404 ``);
:func:`quotopia.status_lines.reason_phrases` adds them, in Core and in FT's metrics
endpoint. A property checks the wrapper for every status code, on an h11 connection
in memory; end-to-end tests read the status lines of a real Core over raw sockets,
for responses from each place one can come from (Quart's routes, the prepared fast
path, hypercorn's own errors), and of FT's metrics endpoint.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from http import HTTPStatus
from typing import cast

import h11
import pytest
import trio
from _services import DEADLINE, Service, ft_metrics_port, running_core, running_ft
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol
from hypothesis import example, given
from hypothesis import strategies as st

from quotopia.status_lines import reason_phrases

# --- the wrapper, in memory ------------------------------------------------------


class _Wire:
    """What ``H11Protocol._send_h11_event`` uses of its protocol: an h11 connection
    (one that has just received a request, so a response may be sent) and ``send``,
    which here keeps the bytes."""

    def __init__(self) -> None:
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(self.connection.next_event(), h11.Request)
        self.sent = b""

    async def send(self, event: RawData) -> None:
        self.sent += event.data


def status_line_sent(event: h11.Response | h11.InformationalResponse) -> bytes:
    """The status line hypercorn's (wrapped) protocol writes for ``event``."""
    reason_phrases()
    wire = _Wire()
    trio.run(H11Protocol._send_h11_event, cast(H11Protocol, wire), event)
    return wire.sent.partition(b"\r\n")[0]


# 101 is left out: h11 refuses to switch protocols the client did not ask for.
@given(st.integers(100, 999).filter(lambda code: code != 101))
@example(200)
@example(299)  # unregistered: no phrase
def test_every_status_line_has_the_standard_reason_phrase(code: int) -> None:
    kind = h11.InformationalResponse if code < 200 else h11.Response
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    line = status_line_sent(kind(status_code=code, headers=[]))
    assert line == f"HTTP/1.1 {code} {phrase}".encode()


def test_a_reason_phrase_already_there_is_kept() -> None:
    line = status_line_sent(h11.Response(status_code=200, headers=[], reason=b"Fine"))
    assert line == b"HTTP/1.1 200 Fine"


# --- a real Core ------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[Service, Service]]:
    """FT and the Core it feeds."""
    with running_ft() as ft, running_core(ft.port) as core:
        yield ft, core


@pytest.fixture(scope="module")
def core(services: tuple[Service, Service]) -> Service:
    return services[1]


@pytest.fixture(scope="module")
def ft_metrics(services: tuple[Service, Service]) -> int:
    """The port of FT's metrics endpoint: hypercorn on asyncio, not Core's Trio."""
    return ft_metrics_port(services[0])


def request(method: bytes, target: bytes, *headers: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    return b"\r\n".join([*lines, *headers, b"", b""])


def status_line(port: int, request_bytes: bytes) -> bytes:
    """Send ``request_bytes`` on a new connection; return the response's first line,
    with its CRLF."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(request_bytes)
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, f"the connection closed after {received!r}"
            received += chunk
    return received.partition(b"\r\n")[0] + b"\r\n"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        pytest.param(request(b"GET", b"/health"), b"HTTP/1.1 200 OK\r\n", id="200-route"),
        pytest.param(request(b"HEAD", b"/health"), b"HTTP/1.1 200 OK\r\n", id="200-head"),
        pytest.param(request(b"GET", b"/quotes"), b"HTTP/1.1 200 OK\r\n", id="200-prepared"),
        pytest.param(request(b"GET", b"/nope"), b"HTTP/1.1 404 Not Found\r\n", id="404-route"),
        pytest.param(
            request(b"GET", b"/quotes/DOGE"), b"HTTP/1.1 404 Not Found\r\n", id="404-prepared"
        ),
        pytest.param(
            request(b"POST", b"/quotes", b"Content-Length: 0"),
            b"HTTP/1.1 405 Method Not Allowed\r\n",
            id="405",
        ),
        pytest.param(b"GARBAGE\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n", id="400-hypercorn"),
        pytest.param(
            request(b"GET", b"/health", b"Transfer-Encoding: gzip"),
            b"HTTP/1.1 501 Not Implemented\r\n",
            id="501-hypercorn",
        ),
    ],
)
def test_core_sends_reason_phrases(core: Service, request_bytes: bytes, expected: bytes) -> None:
    assert status_line(core.port, request_bytes) == expected


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        pytest.param(request(b"GET", b"/metrics"), b"HTTP/1.1 200 OK\r\n", id="200"),
        pytest.param(request(b"GET", b"/nope"), b"HTTP/1.1 404 Not Found\r\n", id="404"),
        pytest.param(
            request(b"POST", b"/livez", b"Content-Length: 0"),
            b"HTTP/1.1 405 Method Not Allowed\r\n",
            id="405",
        ),
    ],
)
def test_ft_metrics_endpoint_sends_reason_phrases(
    ft_metrics: int, request_bytes: bytes, expected: bytes
) -> None:
    assert status_line(ft_metrics, request_bytes) == expected
