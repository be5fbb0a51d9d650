"""The protobuf ``Quote`` (proto/quotes.proto) by hand, both ways, for the hot paths.

FT encodes every quote of every tick and the recorder decodes every quote it
stores; betterproto2 takes some 45 µs to encode a ``Quote`` and 31 µs to decode
one, which caps either at a few tens of thousands a second on a whole core. The
message is six scalar fields, so its wire format is short to write out: this
does either in a few microseconds.

The bytes are exactly a stock encoder's (tests/test_wire_format.py checks them
against protoc's and betterproto2's for arbitrary quotes), and the decoder reads
what any encoder may send: fields in any order, repeated fields (the last wins),
unknown fields skipped, so a newer FT with more fields still decodes.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["DecodeError", "DecodedQuote", "decode_quote", "encode_quote"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DOUBLE: Final = struct.Struct("<d")
_FIXED64: Final = struct.Struct("<Q")

# Tags: (field number << 3) | wire type. 0 varint, 1 fixed 64-bit, 2 length-delimited.
_SYMBOL: Final = b"\x0a"
_PRICE: Final = b"\x11"
_TIME: Final = b"\x1a"
_CHANGE: Final = b"\x21"
_SEQUENCE: Final = b"\x28"
_RUN_ID: Final = b"\x31"
_ZERO_DOUBLE: Final = _DOUBLE.pack(0.0)
#: Fields that hold a message (``Quote.time``; a Timestamp has none): merged
#: when repeated, where any other field's last value wins.
_MESSAGE_FIELDS: Final = frozenset({3})


class DecodeError(ValueError):
    """The bytes are not a well-formed ``Quote``."""


@dataclass(frozen=True, slots=True)
class DecodedQuote:
    """A ``Quote``'s fields; ``time_us`` is ``None`` when the message has no time."""

    symbol: str
    price: float
    time_us: int | None
    change_percent: float
    sequence: int
    run_id: int


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement, always 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_quote(
    symbol: str,
    price: float,
    time: datetime | None,
    change_percent: float,
    sequence: int,
    run_id: int,
) -> bytes:
    """The protobuf encoding of one ``Quote``, field by field as protoc writes it.

    proto3 leaves out a field at its default (0, 0.0, ""); a double equal to zero
    is left out with either sign, as betterproto2 does (protoc writes -0.0; FT
    never makes one). A time, if given, is written even when it is the epoch (an
    empty ``Timestamp``).
    """
    parts: list[bytes] = []
    if symbol:
        encoded = symbol.encode()
        parts += (_SYMBOL, _varint(len(encoded)), encoded)
    if price != 0.0:
        parts += (_PRICE, _DOUBLE.pack(price))
    if time is not None:
        delta = time - _EPOCH
        seconds = delta.days * 86_400 + delta.seconds
        nanos = delta.microseconds * 1000
        stamp = (b"\x08" + _varint(seconds) if seconds else b"") + (
            b"\x10" + _varint(nanos) if nanos else b""
        )
        parts += (_TIME, _varint(len(stamp)), stamp)
    if change_percent != 0.0:
        parts += (_CHANGE, _DOUBLE.pack(change_percent))
    if sequence:
        parts += (_SEQUENCE, _varint(sequence))
    if run_id:
        parts += (_RUN_ID, _FIXED64.pack(run_id))
    return b"".join(parts)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise DecodeError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _skip(data: bytes, position: int, wire_type: int) -> int:
    """The position after an unknown field's value."""
    if wire_type == 0:
        return _read_varint(data, position)[1]
    if wire_type == 1:
        end = position + 8
    elif wire_type == 2:
        length, position = _read_varint(data, position)
        end = position + length
    elif wire_type == 5:
        end = position + 4
    else:
        raise DecodeError(f"unsupported wire type {wire_type}")
    if end > len(data):
        raise DecodeError("truncated field")
    return end


def _fields(data: bytes) -> dict[int, int | bytes]:
    """Each known-shaped field's last value: an int (varint, fixed64) or bytes."""
    found: dict[int, int | bytes] = {}
    position, end = 0, len(data)
    while position < end:
        tag, position = _read_varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise DecodeError("field number 0")
        start = position
        position = _skip(data, position, wire_type)
        if wire_type == 0:
            found[number] = _read_varint(data, start)[0]
        elif wire_type == 1:
            found[number] = data[start:position]
        elif wire_type == 2:
            _, value_start = _read_varint(data, start)
            value = data[value_start:position]
            previous = found.get(number)
            if number in _MESSAGE_FIELDS and isinstance(previous, bytes):
                # A message given twice is merged: its later fields win.
                value = previous + value
            found[number] = value
    return found


def _as_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def decode_quote(data: bytes) -> DecodedQuote:
    """The fields of one protobuf ``Quote``. Raises :class:`DecodeError` if malformed.

    A quote laid out as FT writes it (every field present, in field order) is
    read in one straight pass; anything else by the general decoder.
    """
    try:
        return _decode_ft_layout(data)
    except (_OtherLayout, IndexError, struct.error, UnicodeDecodeError):
        return _decode_any(data)


class _OtherLayout(Exception):
    pass


def _decode_ft_layout(data: bytes) -> DecodedQuote:
    """The straight pass: tags 1..6 in order, short symbol, no unknown fields."""
    if data[0] != 0x0A or data[1] > 0x7F:
        raise _OtherLayout
    position = 2 + data[1]
    symbol = data[2:position].decode()
    if data[position] != 0x11:
        raise _OtherLayout
    price = _DOUBLE.unpack_from(data, position + 1)[0]
    position += 9
    if data[position] != 0x1A or data[position + 1] > 0x7F or data[position + 2] != 0x08:
        raise _OtherLayout
    end = position + 2 + data[position + 1]
    seconds, position = _read_varint(data, position + 3)
    if data[position] != 0x10:
        raise _OtherLayout
    nanos, position = _read_varint(data, position + 1)
    if position != end or nanos >= 1_000_000_000 or seconds >> 63:
        raise _OtherLayout
    if data[position] != 0x21:
        raise _OtherLayout
    change = _DOUBLE.unpack_from(data, position + 1)[0]
    if data[position + 9] != 0x28:
        raise _OtherLayout
    sequence, position = _read_varint(data, position + 10)
    if data[position] != 0x31 or len(data) != position + 9:
        raise _OtherLayout
    run_id = _FIXED64.unpack_from(data, position + 1)[0]
    return DecodedQuote(
        symbol, price, seconds * 1_000_000 + nanos // 1000, change, sequence, run_id
    )


def _decode_any(data: bytes) -> DecodedQuote:
    """The general decoder: any field order, repeats, unknown fields, defaults."""
    fields = _fields(data)

    def double(number: int) -> float:
        value = fields.get(number, _ZERO_DOUBLE)
        if not isinstance(value, bytes) or len(value) != 8:
            raise DecodeError(f"field {number} is not a double")
        return float(_DOUBLE.unpack(value)[0])

    def integer(number: int) -> int:
        value = fields.get(number, 0)
        if isinstance(value, bytes):
            if len(value) != 8:
                raise DecodeError(f"field {number} has the wrong type")
            return int(_FIXED64.unpack(value)[0])
        return value

    symbol_bytes = fields.get(1, b"")
    if not isinstance(symbol_bytes, bytes):
        raise DecodeError("field 1 is not a string")
    try:
        symbol = symbol_bytes.decode()
    except UnicodeDecodeError:
        raise DecodeError("field 1 is not UTF-8") from None
    time_us: int | None = None
    stamp = fields.get(3)
    if stamp is not None:
        if not isinstance(stamp, bytes):
            raise DecodeError("field 3 is not a Timestamp")
        parts = _fields(stamp)
        seconds, nanos = parts.get(1, 0), parts.get(2, 0)
        if isinstance(seconds, bytes) or isinstance(nanos, bytes):
            raise DecodeError("bad Timestamp")
        nanos = _as_int64(nanos)
        if not 0 <= nanos < 1_000_000_000:
            raise DecodeError(f"Timestamp nanos {nanos} out of range")
        time_us = _as_int64(seconds) * 1_000_000 + nanos // 1000
    run_id = fields.get(6, 0)
    if not isinstance(run_id, bytes) and run_id != 0:
        raise DecodeError("field 6 is not a fixed64")
    return DecodedQuote(
        symbol=symbol,
        price=double(2),
        time_us=time_us,
        change_percent=double(4),
        sequence=integer(5) & ((1 << 64) - 1),
        run_id=integer(6),
    )


def time_of(time_us: int) -> datetime:
    """A ``time_us`` as a UTC datetime."""
    return _EPOCH + timedelta(microseconds=time_us)
