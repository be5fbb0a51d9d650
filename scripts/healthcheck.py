"""Container health probe for Quotopia's services.

One image runs either service, so the image's ``HEALTHCHECK`` calls this script
and the script works out which service it is probing:

1. the first argument, ``ft``, ``core`` or ``recorder``, if given;
2. else the ``QUOTOPIA_SERVICE`` environment variable (compose sets it);
3. else the command line of PID 1, which in a container is the service itself
   (``quotopia core`` — so a plain ``docker run IMAGE core`` is probed right);
4. else ``ft``, the image's default command.

Probes, always against 127.0.0.1 (the probe runs inside the service's container):

- ``core``: ``GET /health`` on ``CORE_PORT`` (default 8080); healthy on HTTP 200.
- ``ft``: ``grpc.health.v1.Health/Check`` for the whole server (service ``""``)
  on ``FT_PORT`` (default 50051), via grpclib; healthy on ``SERVING``.
- ``recorder``: ``GET /readyz`` on ``RECORDER_METRICS_PORT`` (default 8082);
  healthy on HTTP 200, that is once the schema is in place and recording began,
  and while its writes succeed (a lost feed leaves it ready; a database that
  refuses writes, or a drain, does not).

Each probe gives up after :data:`TIMEOUT` seconds. Exit status follows Docker's
contract: 0 healthy, 1 unhealthy (2 is reserved by Docker, so it is never used,
not even for a bad argument). One line on stderr says why a probe failed.

Only the standard library and grpclib (a runtime dependency, so it is in the
image) are used: the image carries no curl or grpcurl.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["TIMEOUT", "check_core", "check_ft", "check_recorder", "main", "resolve_service"]

#: Seconds one probe may take, connection included.
TIMEOUT = 2.0

HOST = "127.0.0.1"
DEFAULT_SERVICE = "ft"
PID1_CMDLINE = Path("/proc/1/cmdline")


class ProbeError(Exception):
    """The service answered badly, or not at all."""


def _port(variable: str, default: int) -> int:
    text = os.environ.get(variable, str(default))
    try:
        port = int(text)
    except ValueError:
        raise ProbeError(f"{variable}={text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ProbeError(f"{variable}={port} is not in 1..65535")
    return port


def _http_ok(port: int, path: str) -> None:
    """GET ``path``; raise :class:`ProbeError` unless it answers 200."""
    # http.client rather than urllib: no proxy settings from the environment
    # apply and no redirects are followed, so the probe talks to this container only.
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:  # refused, reset, timed out (socket.timeout is an OSError)
        raise ProbeError(f"GET http://{HOST}:{port}{path} failed: {exc}") from None
    except http.client.HTTPException as exc:  # a reply that is not HTTP
        raise ProbeError(f"GET http://{HOST}:{port}{path}: bad reply: {exc!r}") from None
    finally:
        conn.close()
    if response.status != 200:
        said = body.decode(errors="replace").strip()[:200]
        raise ProbeError(f"GET http://{HOST}:{port}{path} answered {response.status} {said}")


def check_core(port: int) -> None:
    """Ask Core's ``/health``; raise :class:`ProbeError` unless it answers 200."""
    _http_ok(port, "/health")


def check_recorder(port: int) -> None:
    """Ask the recorder's ``/readyz``; raise :class:`ProbeError` unless it answers 200."""
    _http_ok(port, "/readyz")


def check_ft(port: int) -> None:
    """Ask FT's gRPC health service; raise :class:`ProbeError` unless ``SERVING``."""
    # Imported here so the Core probe never pays for loading protobuf.
    from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

    try:
        status = asyncio.run(_grpc_health_status(port))
    except TimeoutError:
        raise ProbeError(f"gRPC health check on {HOST}:{port} timed out") from None
    except (OSError, GRPCError, ProtocolError, StreamTerminatedError) as exc:
        raise ProbeError(f"gRPC health check on {HOST}:{port} failed: {exc!r}") from None
    if status != "SERVING":
        raise ProbeError(f"gRPC health check on {HOST}:{port} answered {status}")


async def _grpc_health_status(port: int) -> str:
    """Return the server's overall serving status, by name (e.g. ``"SERVING"``)."""
    from grpclib.client import Channel
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    channel = Channel(HOST, port)
    try:
        # asyncio.timeout bounds the connection too; the call's own timeout also
        # tells the server our deadline.
        async with asyncio.timeout(TIMEOUT):
            reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=TIMEOUT)
    finally:
        channel.close()
    return HealthCheckResponse.ServingStatus.Name(reply.status)


def _service_from_pid1(cmdline: Path) -> str | None:
    """The service PID 1 runs (``quotopia core`` → ``"core"``), if it is one of ours."""
    try:
        argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return next((arg for arg in argv if arg in _PROBES), None)


def resolve_service(argv: Sequence[str], *, pid1_cmdline: Path = PID1_CMDLINE) -> str:
    """Which service to probe: argument, then ``QUOTOPIA_SERVICE``, then PID 1, then ft."""
    if argv:
        return argv[0]
    from_env = os.environ.get("QUOTOPIA_SERVICE", "").strip()
    if from_env:
        return from_env
    return _service_from_pid1(pid1_cmdline) or DEFAULT_SERVICE


#: service → (probe, port variable, default port); the defaults match ``quotopia``'s.
_PROBES: dict[str, tuple[Callable[[int], None], str, int]] = {
    "ft": (check_ft, "FT_PORT", 50051),
    "core": (check_core, "CORE_PORT", 8080),
    "recorder": (check_recorder, "RECORDER_METRICS_PORT", 8082),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Probe one service; return the process exit status (0 healthy, 1 not)."""
    service = resolve_service(sys.argv[1:] if argv is None else argv)
    if service not in _PROBES:
        known = ", ".join(_PROBES)
        print(f"healthcheck: unknown service {service!r}, expected one of {known}", file=sys.stderr)
        return 1
    probe, port_variable, default_port = _PROBES[service]
    try:
        probe(_port(port_variable, default_port))
    except ProbeError as exc:
        print(f"healthcheck: {service}: unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
