"""HTTP/1.1 status lines with their reason phrase, for every hypercorn server.

hypercorn builds its h11 responses without a reason phrase, so the status line
reads ``HTTP/1.1 404 `` instead of ``HTTP/1.1 404 Not Found``; some clients and
proxies show or log it. :func:`reason_phrases` fills it in by wrapping one private
method of hypercorn's HTTP/1.1 protocol, which its asyncio and Trio workers share,
so FT's metrics endpoint (asyncio) and Core (Trio) both use it. hypercorn is
pinned (<0.19) and tests/test_status_lines.py checks the result on both.
"""

from __future__ import annotations

from http import HTTPStatus

import h11
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import H11SendableEvent

__all__ = ["reason", "reason_phrases"]

#: The reason phrase of every status code Python knows (``http.HTTPStatus``).
_REASONS: dict[int, bytes] = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def reason(status_code: int) -> bytes:
    """``status_code``'s reason phrase, or ``b""`` for a code Python does not know
    (the status line then ends in a space, which HTTP/1.1 allows)."""
    return _REASONS.get(status_code, b"")


_hypercorn_send_h11_event = H11Protocol._send_h11_event


async def _send_h11_event_with_reason(self: H11Protocol, event: H11SendableEvent) -> None:
    """hypercorn's ``H11Protocol._send_h11_event``, with every status line's reason
    phrase filled in; every HTTP/1.1 event hypercorn sends goes through it."""
    # ``type(...) is``, not isinstance(): this runs for every event of every
    # response, and hypercorn only ever makes these two exact classes.
    if (
        type(event) is h11.Response or type(event) is h11.InformationalResponse
    ) and not event.reason:
        # A new event, as h11's events are frozen. Given the headers it already
        # validated, h11 does not validate them again: this whole wrapper costs
        # under 2 µs a response, a fraction of a per cent of a request.
        event = type(event)(
            status_code=event.status_code,
            headers=event.headers,
            http_version=event.http_version,
            reason=reason(event.status_code),
        )
    await _hypercorn_send_h11_event(self, event)


def reason_phrases() -> None:
    """Give every HTTP/1.1 response hypercorn sends a reason phrase (idempotent):
    ``HTTP/1.1 404 Not Found``; a status code Python does not know gets none."""
    H11Protocol._send_h11_event = _send_h11_event_with_reason  # type: ignore[method-assign]
