"""What every consumer of FT's stream shares: how a session ends, and how to say why.

Core (on Trio, through trio-asyncio) and the recorder (on asyncio) each run
gRPC sessions to FT with grpclib and reconnect with :class:`quotopia.backoff.Backoff`.
"""

from __future__ import annotations

from collections.abc import Mapping

from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from quotopia.contract import SNAPSHOT_SIZE_KEY

__all__ = ["EXPECTED_FAILURES", "FeedEnded", "FeedStalled", "describe_failure", "snapshot_size"]

#: Failures that are part of normal life (FT down, restarting, unreachable):
#: logged as one line, without a traceback.
EXPECTED_FAILURES: tuple[type[Exception], ...] = (
    OSError,
    GRPCError,
    StreamTerminatedError,
    ProtocolError,
)


class FeedEnded(Exception):
    """FT ended the stream normally (for example, it is shutting down)."""


class FeedStalled(Exception):
    """Nothing arrived from FT within the feed timeout (FT frozen, or the network)."""


def snapshot_size(metadata: Mapping[str, object] | None) -> int | None:
    """The snapshot size FT announces in its response headers, if it does."""
    value = (metadata or {}).get(SNAPSHOT_SIZE_KEY)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def describe_failure(exc: Exception) -> str:
    """Why a session failed, in a few words for a log line."""
    if isinstance(exc, GRPCError):
        return f"gRPC status {exc.status.name}: {exc.message}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, StreamTerminatedError):
        return "connection lost"
    return str(exc) or type(exc).__name__
