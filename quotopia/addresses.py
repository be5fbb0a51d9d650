"""Network addresses as the command line spells them."""

from __future__ import annotations

__all__ = ["parse_address"]


def parse_address(addr: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[::1]:port"``) and validate it."""
    host, sep, port_text = addr.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"bad address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host, int(port_text)
