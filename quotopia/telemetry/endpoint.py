"""A small HTTP endpoint for ``/metrics``, ``/livez`` and ``/readyz``.

For a service with no HTTP API of its own (FT speaks only gRPC): Prometheus and
Kubernetes probes speak HTTP. It runs on hypercorn's asyncio worker, as a task
of the service's own task group, on a port of its own.

Every answer is JSON except ``/metrics``; an unknown path is a JSON 404 and a
method other than GET or HEAD a JSON 405, as on Core.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CollectorRegistry

from quotopia.errors import StartupError, describe_os_error
from quotopia.status_lines import reason_phrases
from quotopia.telemetry.metrics import exposition
from quotopia.telemetry.probes import LIVE, ProbeAnswer

__all__ = ["TelemetryApp", "listening_socket", "serve_endpoint", "serve_lifespan"]

logger = logging.getLogger("quotopia.telemetry")

_JSON = (b"content-type", b"application/json")


class TelemetryApp:
    """The ASGI app: ``GET /metrics`` from ``registry``, ``GET /livez``, and
    ``GET /readyz`` from ``readiness``."""

    def __init__(self, registry: CollectorRegistry, readiness: Callable[[], ProbeAnswer]) -> None:
        self._registry = registry
        self._readiness = readiness

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # hypercorn refuses a WebSocket handshake the app does not accept
        path = scope["path"]
        if path not in ("/metrics", "/livez", "/readyz"):
            await _send(send, 404, _JSON, {"error": "not found", "path": path})
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _send(
                send,
                405,
                _JSON,
                {"error": "method not allowed", "path": path},
                extra=[(b"allow", b"GET, HEAD")],
            )
            return
        if path == "/metrics":
            accept = dict(scope["headers"]).get(b"accept", b"").decode("latin-1")
            body, content_type = exposition(self._registry, accept)
            await _send(send, 200, (b"content-type", content_type.encode()), body)
            return
        answer = LIVE if path == "/livez" else self._readiness()
        await _send(send, answer.status, _JSON, answer.body)


async def _send(
    send: ASGISendCallable,
    status: int,
    content_type: tuple[bytes, bytes],
    body: bytes | dict[str, object],
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [content_type, (b"content-length", b"%d" % len(data)), *(extra or [])]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers, "trailers": False}
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def serve_lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Answer an ASGI lifespan scope for an app with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket bound and listening on ``host:port``, so port 0 works and the
    real port is known. Raises :class:`~quotopia.errors.StartupError` if it cannot."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(addr, family=family, backlog=backlog)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {describe_os_error(exc)}") from None


async def serve_endpoint(
    app: TelemetryApp,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns; asyncio backend only.

    Calls ``task_status.started(port)`` once listening, with the real port.
    """
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    config = HypercornConfig()
    # hypercorn wraps the descriptor in a socket of its own, which then owns it.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    reason_phrases()
    task_status.started(bound)
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)
