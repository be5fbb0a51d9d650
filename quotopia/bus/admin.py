"""Talking to the broker: creating the topic, and saying why a call failed.

aiokafka is asyncio-only, like grpclib: FT and the recorder call it directly,
Core through trio-asyncio.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

__all__ = ["EXPECTED_FAILURES", "describe_failure", "ensure_topic", "stop_consumer"]

logger = logging.getLogger("quotopia.bus")

#: What an absent, restarting or unreachable broker raises: part of normal life,
#: logged as one line, without a traceback, and retried with backoff.
EXPECTED_FAILURES: tuple[type[Exception], ...] = (KafkaError, OSError)


def describe_failure(exc: BaseException) -> str:
    """Why a broker call failed, in a few words for a log line."""
    text = str(exc).strip()
    name = type(exc).__name__
    if not text or text == name:
        return name
    # aiokafka's messages start with the class name's words already, or not at all.
    first = text.splitlines()[0]
    return first if len(first) <= 200 else first[:200] + "..."


async def ensure_topic(
    bootstrap: str, topic: str, *, partitions: int, replication: int = 1
) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists.

    Returns True if this call created it. An existing topic is left as it is,
    whatever its partition count (Kafka can add partitions, never remove them, and
    adding moves keys to other partitions: an operator's decision, not FT's).
    Raises one of :data:`EXPECTED_FAILURES` if the broker cannot be reached.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="quotopia-admin")
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=replication)]
        )
    finally:
        await admin.close()
    for _name, code, message in response.topic_errors:
        if code == TopicAlreadyExistsError.errno:
            return False
        if code != 0:
            raise KafkaError(f"cannot create topic {topic!r}: error {code}: {message}")
    logger.info(
        "created Kafka topic %s with %d partitions",
        topic,
        partitions,
        extra={"topic": topic, "partitions": partitions},
    )
    return True


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer``, closing its connections, whatever aiokafka raises on the way.

    aiokafka 0.14's stop() cancels tasks of its own and then awaits them, so a task
    cancelled before it ran (aio-libs/aiokafka#647), or one that was waiting out a
    retry (a fetch from a broker that went away, #983), lets a CancelledError out
    of stop(), before it has closed the connections. Such an error is not a
    cancellation of this session: it is absorbed here. A real one (the session's
    task is being cancelled) is re-raised, after the connections are closed.
    """
    try:
        # The task that start() left gets its first step (#647), even if the
        # session's cancellation lands here.
        await asyncio.sleep(0)
    finally:
        try:
            await consumer.stop()
        except asyncio.CancelledError:
            await consumer._client.close()  # what stop() did not reach
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
