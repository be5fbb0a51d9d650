"""The QuoteService handler: validate the request, send a snapshot, then stream."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import anyio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream
from h2.errors import ErrorCodes

from quotopia._proto import Quote, StreamQuotesRequest
from quotopia.contract import SNAPSHOT_SIZE_KEY, STREAM_QUOTES
from quotopia.ft.broadcast import Broadcaster, BroadcasterClosed
from quotopia.ft.metrics import Disconnect, FTMetrics
from quotopia.ft.wire import EncodedQuote, join_messages
from quotopia.ft.writer import MessageWriter

__all__ = ["QuoteService"]

logger = logging.getLogger("quotopia.ft")

#: A request may name each symbol at most once; anything longer is a mistake or abuse.
MAX_REQUESTED_SYMBOLS = 1000


class QuoteService:
    """``QuoteService/StreamQuotes`` (see proto/quotes.proto) on top of a :class:`Broadcaster`.

    Implemented against grpclib's stream API rather than as an async generator, so
    the subscription's ``with`` block and cancel scope live in the handler's own task.

    What a stream costs per tick, since that is what limits the number of
    subscribers: the quotes arrive encoded (:mod:`quotopia.ft.wire`), and a tick
    is one write of its bytes (:class:`~quotopia.ft.writer.MessageWriter`). While
    the handler waits for updates, ``publish()`` makes that write itself when the
    client's flow-control window has room (see
    :meth:`~quotopia.ft.broadcast.Subscription.receive`), so a subscriber that
    keeps up never wakes its handler's task at all.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        broadcaster: Broadcaster[EncodedQuote],
        metrics: FTMetrics,
    ) -> None:
        self._canonical = {s.upper(): s for s in symbols}
        self._all = frozenset(self._canonical.values())
        self._broadcaster = broadcaster
        self._metrics = metrics

    def __mapping__(self) -> dict[str, Handler]:
        return {
            STREAM_QUOTES: Handler(
                self.stream_quotes, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote
            )
        }

    def resolve(self, requested: Sequence[str]) -> frozenset[str]:
        """Map requested symbols to canonical ones; empty means every symbol.

        Raises a ``GRPCError(INVALID_ARGUMENT)`` naming the first unknown symbol.
        """
        if not requested:
            return self._all
        if len(requested) > MAX_REQUESTED_SYMBOLS:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"too many symbols: {len(requested)} (at most {MAX_REQUESTED_SYMBOLS})",
            )
        wanted = set()
        for name in requested:
            symbol = self._canonical.get(name.upper())
            if symbol is None:
                shown = name if len(name) <= 64 else name[:64] + "..."
                known = ", ".join(self._canonical.values())
                raise GRPCError(
                    Status.INVALID_ARGUMENT, f"unknown symbol {shown!r} (known: {known})"
                )
            wanted.add(symbol)
        return frozenset(wanted)

    async def stream_quotes(self, stream: Stream[StreamQuotesRequest, Quote]) -> None:
        wanted = self.resolve(await _receive_request(stream))
        # None lets join_messages skip the per-quote test for the usual "all symbols".
        only = None if wanted == self._all else wanted
        try:
            sub = self._broadcaster.subscribe()
        except BroadcasterClosed:
            raise GRPCError(Status.UNAVAILABLE, "FT is shutting down") from None
        metrics = self._metrics
        metrics.connects += 1
        peer = _peer(stream)
        logger.info(
            "client connected: %s (%s); %d subscribers",
            peer,
            ",".join(sorted(wanted)),
            self._broadcaster.subscriber_count,
            extra={"peer": peer, "subscribers": self._broadcaster.subscriber_count},
        )
        writer = MessageWriter(stream)
        latency = metrics.delivery_latency
        clock = time.monotonic

        def write_now(tick: tuple[EncodedQuote, ...]) -> bool:
            # Called by publish() while this task waits: see Subscription.receive.
            data = join_messages(tick, only)
            if not data:
                return True
            if not writer.write_nowait(data):
                return False
            latency.observe(clock() - tick[0].generated_at)
            return True

        snapshot = join_messages(sub.snapshot, only)
        sending = False  # True while a message may be half-written
        # Until shown otherwise, a stream ends because its client went away: grpclib
        # cancels the handler when the client cancels or its connection closes.
        reason = Disconnect.NORMAL
        try:
            with sub, sub.cancel_scope:
                # The snapshot's size tells the client when it has every current
                # quote (Core is not ready before that).
                await writer.start({SNAPSHOT_SIZE_KEY: str(_count(sub.snapshot, only))})
                data = snapshot
                ticks: list[tuple[EncodedQuote, ...]] = []
                while True:
                    if data:
                        sending = True
                        await writer.write(data)
                        sending = False
                        now = clock()
                        for tick in ticks:
                            if tick and (only is None or any(q.symbol in only for q in tick)):
                                latency.observe(now - min(q.generated_at for q in tick))
                    try:
                        ticks = await sub.receive(direct=write_now)
                    except anyio.EndOfStream:
                        reason = Disconnect.DRAIN
                        break
                    data = b"".join([join_messages(tick, only) for tick in ticks])
        except StreamTerminatedError:
            raise
        except Exception:
            reason = Disconnect.ERROR
            raise
        finally:
            if sub.slow:
                reason = Disconnect.SLOW_CONSUMER
            elif self._broadcaster.closed and reason is Disconnect.NORMAL:
                reason = Disconnect.DRAIN  # cut at the drain deadline
            metrics.disconnects[reason] += 1
            shown = "" if reason is Disconnect.NORMAL else f" ({reason.value.replace('_', ' ')})"
            logger.info(
                "client disconnected: %s%s; %d subscribers",
                peer,
                shown,
                self._broadcaster.subscriber_count,
                extra={
                    "peer": peer,
                    "reason": reason.value,
                    "subscribers": self._broadcaster.subscriber_count,
                },
            )
        if sub.slow:
            if sending:
                await _reset_slow_stream(stream)
                return
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED, "slow consumer: the client fell too far behind"
            )
        # Returning ends the stream with status OK: the broadcaster closed (a drain).


def _count(quotes: Sequence[EncodedQuote], only: frozenset[str] | None) -> int:
    """How many of ``quotes`` a stream that wants ``only`` (None: all) gets."""
    if only is None:
        return len(quotes)
    return sum(1 for q in quotes if q.symbol in only)


async def _receive_request(stream: Stream[StreamQuotesRequest, Quote]) -> list[str]:
    """The call's one request, as its list of symbols.

    Error handling: a missing, cut-off or undecodable request is
    ``GRPCError(INVALID_ARGUMENT)``, so grpclib answers with that status instead of
    logging the client's garbage as an ERROR with a traceback and answering UNKNOWN.
    grpclib and the codec raise assorted types for a bad body (``AssertionError``
    for a short one, ``NotImplementedError`` for a compressed one, ``ValueError``,
    ``EOFError`` or ``KeyError`` from betterproto2): any ``Exception`` here is the
    request's fault, except grpclib's own signals, which pass through.
    """
    try:
        request = await stream.recv_message()
    except (GRPCError, StreamTerminatedError):
        raise
    except Exception as exc:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"malformed request: {type(exc).__name__}: {exc}"[:200]
        ) from None
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
    # betterproto2 decodes a wrong wire type as an int or None, not an error.
    if not all(isinstance(name, str) for name in request.symbols):
        raise GRPCError(Status.INVALID_ARGUMENT, "malformed request: symbols must be strings")
    return request.symbols


async def _reset_slow_stream(stream: Stream[StreamQuotesRequest, Quote]) -> None:
    """End a stream whose last message was cut off half-way, as a slow consumer.

    Trailers after half a message would read as a corrupt stream, so reset it
    instead. RST_STREAM(ENHANCE_YOUR_CALM) is what gRPC clients map to
    RESOURCE_EXHAUSTED. grpclib's public ``Stream.cancel()`` resets with NO_ERROR
    (which clients report as INTERNAL), hence the private attributes.
    """
    await stream._stream.reset(ErrorCodes.ENHANCE_YOUR_CALM)
    stream._cancel_done = True  # tell grpclib not to send trailers after the reset


def _peer(stream: Stream[StreamQuotesRequest, Quote]) -> str:
    addr = stream.peer.addr()
    return f"{addr[0]}:{addr[1]}" if addr else "unknown peer"
