"""Core: consumes FT's quote stream and serves the latest prices over HTTP.

The public API is :func:`serve` and :class:`CoreConfig`.
"""

from __future__ import annotations

from quotopia.core.config import CoreConfig
from quotopia.core.server import serve

__all__ = ["CoreConfig", "serve"]
