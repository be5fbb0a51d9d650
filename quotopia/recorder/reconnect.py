"""The recorder's reconnect loop, the same for both sources (FT's stream, Kafka)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import anyio

from quotopia.backoff import Backoff
from quotopia.grpc_feed import FeedEnded, FeedStalled
from quotopia.recorder.metrics import RecorderMetrics

__all__ = ["follow"]

logger = logging.getLogger("quotopia.recorder")


async def follow(
    session: Callable[[], Awaitable[None]],
    *,
    metrics: RecorderMetrics,
    source: str,
    where: str,
    expected: tuple[type[Exception], ...],
    describe: Callable[[Exception], str],
    backoff_cap: float,
    fields: Mapping[str, object],
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``session`` forever, reconnecting with backoff; ends by cancellation.

    ``source`` (``FT``, ``Kafka``) and ``where`` name it in the log; ``expected``
    are the failures of normal life, said in a line by ``describe``; ``after``
    runs once a session has ended (not when cancelled). The delay resets after a
    session that delivered quotes. Losing a connected feed is a WARNING; failing
    to connect, an INFO per attempt.
    """
    backoff = Backoff(0.1, backoff_cap)
    logger.info("connecting to %s", where)
    while True:
        before = sum(metrics.received.values())
        try:
            await session()
            reason = "stream ended"
        except (FeedEnded, FeedStalled) as exc:
            reason = str(exc)
        except expected as exc:
            reason = describe(exc)
        if after is not None:
            await after()
        was_connected, metrics.feed_connected = metrics.feed_connected, False
        if sum(metrics.received.values()) > before:
            backoff.reset()
        delay = backoff.next_delay()
        extra = {"reason": reason, "delay": round(delay, 3), **fields}
        if was_connected:
            logger.warning("feed lost: %s; retrying in %.2fs", reason, delay, extra=extra)
        else:
            logger.info("%s unavailable: %s; retrying in %.2fs", source, reason, delay, extra=extra)
        await anyio.sleep(delay)
