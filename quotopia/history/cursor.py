"""History page cursors: opaque to clients, a position in the index to us. Pure.

A cursor names the last row of the page it came with, by the key the pages are
sorted on: ``(time_us, run_id, sequence)``. The next page starts strictly after
it (before it, newest first), so rows inserted meanwhile neither shift a page
nor appear twice: keyset paging, stable under concurrent inserts. A row that
arrives later with a time behind the cursor (a recorder catching up from Kafka)
is not on the pages still to come; it is in the database for a fresh query.

The text is URL-safe base64 of ``h1|SYMBOL|ORDER|TIME|RUN|SEQ``. The symbol and
order are in it so that a cursor from another symbol's or another order's pages
is refused as foreign instead of silently returning the wrong rows.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Cursor", "CursorError", "Order"]

Order = Literal["asc", "desc"]

_VERSION: Final = "h1"
_INT64_MAX: Final = 2**63 - 1


class CursorError(ValueError):
    """A cursor that cannot be used here: malformed, or issued for other pages."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """The position after which (``asc``) or before which (``desc``) a page starts."""

    symbol: str
    order: Order
    time_us: int
    run_id: int
    sequence: int

    def encode(self) -> str:
        raw = "|".join(
            (
                _VERSION,
                self.symbol,
                self.order,
                str(self.time_us),
                str(self.run_id),
                str(self.sequence),
            )
        )
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, *, symbol: str, order: Order) -> Cursor:
        """Parse ``text``; it must come from pages of ``symbol`` in ``order``.

        Raises :class:`CursorError` saying which: malformed, or foreign.
        """
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise CursorError("malformed cursor") from None
        parts = raw.split("|")
        if len(parts) != 6 or parts[0] != _VERSION:
            raise CursorError("malformed cursor")
        _, its_symbol, its_order, *numbers = parts
        if not all(n.isdigit() and len(n) <= 19 for n in numbers):
            raise CursorError("malformed cursor")
        time_us, run_id, sequence = (int(n) for n in numbers)
        if max(time_us, run_id, sequence) > _INT64_MAX or its_order not in ("asc", "desc"):
            raise CursorError("malformed cursor")
        if its_symbol != symbol or its_order != order:
            raise CursorError(
                f"this cursor belongs to the {its_order} pages of {its_symbol}, "
                f"not to the {order} pages of {symbol}"
            )
        return cls(symbol, order, time_us, run_id, sequence)
