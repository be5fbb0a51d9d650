"""The QuoteService handler: validate the request, send a snapshot, then stream."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from quotopia._proto import Quote, StreamQuotesRequest
from quotopia.ft.broadcast import Broadcaster, BroadcasterClosed

__all__ = ["QuoteService"]

logger = logging.getLogger("quotopia.ft")

#: A request may name each symbol at most once; anything longer is a mistake or abuse.
MAX_REQUESTED_SYMBOLS = 1000


class QuoteService:
    """``QuoteService/StreamQuotes`` (see proto/quotes.proto) on top of a :class:`Broadcaster`.

    Implemented against grpclib's stream API rather than as an async generator, so
    the subscription's ``with`` block and cancel scope live in the handler's own task.
    """

    def __init__(self, symbols: Sequence[str], broadcaster: Broadcaster[Quote]) -> None:
        self._canonical = {s.upper(): s for s in symbols}
        self._broadcaster = broadcaster

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/QuoteService/StreamQuotes": Handler(
                self.stream_quotes, Cardinality.UNARY_STREAM, StreamQuotesRequest, Quote
            )
        }

    def resolve(self, requested: Sequence[str]) -> frozenset[str]:
        """Map requested symbols to canonical ones; empty means every symbol.

        Raises a ``GRPCError(INVALID_ARGUMENT)`` naming the first unknown symbol.
        """
        if not requested:
            return frozenset(self._canonical.values())
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
        request = await stream.recv_message()
        assert request is not None  # grpclib guarantees the one request of a unary-stream call
        wanted = self.resolve(request.symbols)
        try:
            sub = self._broadcaster.subscribe()
        except BroadcasterClosed:
            raise GRPCError(Status.UNAVAILABLE, "FT is shutting down") from None
        peer = _peer(stream)
        logger.info(
            "client connected: %s (%s); %d subscribers",
            peer,
            ",".join(sorted(wanted)),
            self._broadcaster.subscriber_count,
        )
        try:
            with sub, sub.cancel_scope:
                for quote in sub.snapshot:
                    if quote.symbol in wanted:
                        await stream.send_message(quote)
                async for batch in sub.updates:
                    for quote in batch:
                        if quote.symbol in wanted:
                            await stream.send_message(quote)
        finally:
            reason = " (slow consumer)" if sub.slow else ""
            logger.info(
                "client disconnected: %s%s; %d subscribers",
                peer,
                reason,
                self._broadcaster.subscriber_count,
            )
        if sub.slow:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED, "slow consumer: the client fell too far behind"
            )
        # Returning ends the stream with status OK: the broadcaster closed (a drain).


def _peer(stream: Stream[StreamQuotesRequest, Quote]) -> str:
    addr = stream.peer.addr()
    return f"{addr[0]}:{addr[1]}" if addr else "unknown peer"
