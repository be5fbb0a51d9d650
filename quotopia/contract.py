"""What FT and its clients agree on besides the messages of proto/quotes.proto."""

from __future__ import annotations

__all__ = ["SNAPSHOT_SIZE_KEY", "STREAM_QUOTES"]

#: The one method, with no proto package: exactly this path.
STREAM_QUOTES = "/QuoteService/StreamQuotes"

#: Response header (initial metadata) of a StreamQuotes call: the number of quotes
#: in the snapshot that opens the stream, so a client knows when it has every
#: current price. Optional: a client must work without it (other implementations
#: of the contract do not send it), and older clients ignore it.
SNAPSHOT_SIZE_KEY = "quotopia-snapshot-size"
