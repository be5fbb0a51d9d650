"""Which Kafka offsets the recorder may commit: those whose quotes are all in the
database. Pure: no I/O, no clock.

The feed reads records in order and puts the storable ones in the buffer; the
writer takes the buffer in order, in batches, and says how many quotes each
committed batch held. So the n-th quote buffered is in the database once the
writer has reported n quotes written, and a record's offset may be committed
once every quote buffered up to it is. A record that was not buffered (refused,
undecodable) waits for the quotes buffered before it, then goes with them: it has
been dealt with, and must not be read again forever.

Committing ``offset + 1`` (Kafka's convention: the next record to read) only
after the database commit makes delivery at least once: a crash between the two
re-reads the batch, and the idempotent insert leaves one row per quote.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["OffsetLedger"]

P = TypeVar("P")  # a partition: aiokafka's TopicPartition, or anything hashable


class OffsetLedger(Generic[P]):
    """Per partition, the offset to commit once the writer has caught up."""

    def __init__(self) -> None:
        #: Quotes put in the buffer so far.
        self.buffered = 0
        #: Quotes the writer has committed so far.
        self.written = 0
        # (quotes buffered when the record was read, its partition, offset + 1), in
        # reading order; at most one entry per record read and not yet committable.
        self._marks: deque[tuple[int, P, int]] = deque()

    def read(self, partition: P, offset: int, *, buffered: bool) -> None:
        """Note the record at ``offset`` of ``partition``; ``buffered`` if its quote
        went into the buffer (call it once it is there)."""
        if buffered:
            self.buffered += 1
        self._marks.append((self.buffered, partition, offset + 1))

    def wrote(self, quotes: int) -> None:
        """The writer committed a batch of ``quotes`` quotes, the oldest buffered."""
        self.written += quotes

    def committable(self) -> dict[P, int]:
        """The offsets that became safe to commit since the last call, per partition
        (the next offset to read), and forget them."""
        ready: dict[P, int] = {}
        marks = self._marks
        while marks and marks[0][0] <= self.written:
            _, partition, next_offset = marks.popleft()
            ready[partition] = next_offset
        return ready

    @property
    def pending(self) -> int:
        """Records read whose offsets cannot be committed yet."""
        return len(self._marks)
