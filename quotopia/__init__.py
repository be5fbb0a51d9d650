"""Quotopia: a two-service microservice playground.

FT (``quotopia.ft``) simulates prices and streams them over gRPC; Core
(``quotopia.core``) consumes that stream and serves the latest prices over HTTP.
"""

from __future__ import annotations

__version__ = "0.1.0"
