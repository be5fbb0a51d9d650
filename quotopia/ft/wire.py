"""FT's side of the wire format: each quote encoded once per tick, not per subscriber.

A gRPC message on an HTTP/2 stream is a 5-byte prefix (a "compressed" flag, 0
here, and the payload's length as a big-endian uint32) followed by the payload,
here a protobuf ``Quote``. Nothing in that depends on the subscriber, so FT
builds those bytes once per quote when the tick is generated, and each stream's
handler writes the ready-made bytes of a whole tick at once (see
:class:`quotopia.ft.writer.MessageWriter`). Before this, grpclib encoded every
quote again for every subscriber: betterproto2 takes some 40 µs per ``Quote``,
over a third of FT's CPU under fan-out.

The bytes are exactly what grpclib would send message by message (the payload is
what betterproto2's ``bytes(Quote(...))`` gives, written by
:func:`quotopia.quote_codec.encode_quote` in a tenth of the time; the prefix is
the one grpclib writes);
``tests/test_wire_format.py`` checks them against protoc's own encoder.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from quotopia.market import Quote
from quotopia.quote_codec import encode_quote

__all__ = ["EncodedQuote", "encode_quotes", "join_messages", "length_prefixed", "new_run_id"]

#: The gRPC message prefix: compressed flag (a byte, 0 or 1), payload length.
_PREFIX = struct.Struct(">BI")


def new_run_id() -> int:
    """A run id for a new FT process: random, from 1 to 2**63 - 1.

    63 bits, not 64, so it fits a signed 64-bit integer column (PostgreSQL's
    ``bigint``, SQLite's ``INTEGER``) unchanged; 0 stays free to mean "no run id".
    """
    return secrets.randbelow(2**63 - 1) + 1


def length_prefixed(payload: bytes) -> bytes:
    """``payload`` as one uncompressed gRPC message: prefix, then the payload."""
    return _PREFIX.pack(0, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class EncodedQuote:
    """One quote, ready to send to any subscriber."""

    symbol: str
    #: The quote as one gRPC message: length prefix, then the protobuf ``Quote``.
    message: bytes
    #: Its price, for FT's price gauge.
    price: float
    #: When FT generated it, on the monotonic clock (``time.monotonic()``): the
    #: start of its delivery latency.
    generated_at: float
    #: The protobuf ``Quote`` alone (``message`` without its prefix): the value of
    #: the quote's Kafka record (see :mod:`quotopia.bus`).
    payload: bytes


def encode_quotes(
    quotes: Iterable[Quote], generated_at: float, run_id: int
) -> tuple[EncodedQuote, ...]:
    """Encode each of one tick's quotes as the gRPC message every subscriber gets.

    ``generated_at`` is the tick's moment on the monotonic clock; ``run_id`` is
    this FT process's :func:`new_run_id`.
    """
    encoded = []
    for q in quotes:
        payload = encode_quote(q.symbol, q.price, q.time, q.change_percent, q.sequence, run_id)
        encoded.append(
            EncodedQuote(q.symbol, length_prefixed(payload), q.price, generated_at, payload)
        )
    return tuple(encoded)


def join_messages(quotes: Sequence[EncodedQuote], wanted: frozenset[str] | None) -> bytes:
    """The messages of the quotes in ``wanted`` (``None``: all), back to back, in order.

    gRPC's framing lets any number of messages share an HTTP/2 DATA frame: a
    reader splits them by their length prefixes, whatever the frame boundaries.
    """
    if wanted is None:
        return b"".join([q.message for q in quotes])
    return b"".join([q.message for q in quotes if q.symbol in wanted])
