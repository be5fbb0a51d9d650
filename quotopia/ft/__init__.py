"""FT, the feed/ticker: simulates prices and streams them over gRPC.

The public API is :func:`serve` and :class:`FTConfig`; everything else is an
implementation detail.
"""

from __future__ import annotations

from quotopia.ft.config import FTConfig
from quotopia.ft.server import serve

__all__ = ["FTConfig", "serve"]
