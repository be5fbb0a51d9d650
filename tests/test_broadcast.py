"""The Broadcaster's fan-out, on both AnyIO backends.

Every wait is bounded with ``fail_after``; nothing sleeps to let time pass. Where a
test needs the publisher and a reader in lockstep, the reader acknowledges each
tick over an unbuffered stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from quotopia.ft.broadcast import Broadcaster, BroadcasterClosed, Subscription

pytestmark = pytest.mark.anyio

#: Generous real-time bounds: every test finishes in milliseconds unless it hangs.
DEADLINE = 5


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@dataclass(frozen=True, slots=True)
class Tick:
    symbol: str
    seq: int


Batch = tuple[Tick, ...]


def batch(seq: int, symbols: tuple[str, ...] = ("A", "B")) -> Batch:
    return tuple(Tick(s, seq) for s in symbols)


async def collect(
    broadcaster: Broadcaster[Tick],
    received: list[Batch],
    *,
    task_status: TaskStatus[Subscription[Tick]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe, report the subscription, then read every update until the stream ends."""
    with broadcaster.subscribe() as sub:
        task_status.started(sub)
        async for update in sub.updates:
            received.append(update)


def test_buffer_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="buffer_size must be at least 1"):
        Broadcaster[Tick](buffer_size=0)


async def test_every_subscriber_gets_every_update_in_order() -> None:
    published = [batch(seq) for seq in range(1, 201)]
    broadcaster = Broadcaster[Tick](buffer_size=len(published))
    received: list[list[Batch]] = [[] for _ in range(4)]
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            for inbox in received:
                await tg.start(collect, broadcaster, inbox)
            assert broadcaster.subscriber_count == len(received)
            for update in published:
                broadcaster.publish(update)
                # Let the readers interleave with the publisher.
                await anyio.lowlevel.checkpoint()
            broadcaster.close()
    assert all(inbox == published for inbox in received)
    assert broadcaster.slow_disconnects == 0
    assert broadcaster.subscriber_count == 0
    assert broadcaster.latest == {"A": Tick("A", 200), "B": Tick("B", 200)}


async def test_a_late_subscriber_gets_a_snapshot_then_only_later_ticks() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=1000)
    joined: list[Subscription[Tick]] = []
    received: list[Batch] = []
    last = 300

    async def publish_all() -> None:
        for seq in range(1, last + 1):
            # B ticks every other step, so the snapshot holds different sequences.
            broadcaster.publish(batch(seq, ("A", "B") if seq % 2 else ("A",)))
            if seq == 101:
                joined.append(await tg.start(collect, broadcaster, received))
            await anyio.lowlevel.checkpoint()
        broadcaster.close()

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_all)

    (sub,) = joined
    latest_in_snapshot = {tick.symbol: tick.seq for tick in sub.snapshot}
    assert latest_in_snapshot == {"A": 101, "B": 101}
    assert len(sub.snapshot) == 2
    # Snapshot then updates: per symbol, every sequence after the snapshot's, once.
    for symbol, step in (("A", 1), ("B", 2)):
        after = [t.seq for update in received for t in update if t.symbol == symbol]
        assert after == list(range(latest_in_snapshot[symbol] + step, last + 1, step))


async def test_the_snapshot_is_the_latest_tick_per_symbol() -> None:
    broadcaster = Broadcaster[Tick]()
    with broadcaster.subscribe() as early:
        assert early.snapshot == ()
    broadcaster.publish((Tick("A", 1), Tick("B", 1)))
    broadcaster.publish((Tick("A", 2),))
    broadcaster.publish((Tick("C", 3), Tick("A", 3)))
    with broadcaster.subscribe() as late:
        assert sorted(late.snapshot, key=lambda t: t.symbol) == [
            Tick("A", 3),
            Tick("B", 1),
            Tick("C", 3),
        ]
        broadcaster.publish((Tick("B", 4),))
        assert late.updates.receive_nowait() == (Tick("B", 4),)
        with pytest.raises(anyio.WouldBlock):
            late.updates.receive_nowait()
    # latest is a copy: changing it changes nothing inside.
    broadcaster.latest.clear()
    assert set(broadcaster.latest) == {"A", "B", "C"}


async def test_a_subscriber_that_never_reads_is_conflated_then_dropped() -> None:
    buffer_size = 4
    timeout = 10.0
    ticks = 50
    broadcaster = Broadcaster[Tick](buffer_size=buffer_size, slow_consumer_timeout=timeout)
    received: list[Batch] = []
    stuck_was_interrupted = anyio.Event()
    leftovers: list[Batch] = []

    async def stuck(*, task_status: TaskStatus[Subscription[Tick]]) -> None:
        # Like a handler blocked writing to a client that stopped reading.
        with broadcaster.subscribe() as sub:
            task_status.started(sub)
            with sub.cancel_scope:
                await anyio.sleep_forever()
            stuck_was_interrupted.set()
            leftovers.extend([update async for update in sub.updates])

    async def reader(
        acks: MemoryObjectSendStream[int], *, task_status: TaskStatus[Subscription[Tick]]
    ) -> None:
        with broadcaster.subscribe() as sub, acks:
            task_status.started(sub)
            async for update in sub.updates:
                received.append(update)
                await acks.send(update[0].seq)

    # The stream fills at tick buffer_size; from the next tick on the subscriber is
    # behind, and it is dropped at the first tick more than `timeout` later.
    behind_since = buffer_size + 1
    dropped_at = behind_since + int(timeout) + 1
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            slow: Subscription[Tick] = await tg.start(stuck)
            send_acks, receive_acks = anyio.create_memory_object_stream[int](0)
            with receive_acks:
                await tg.start(reader, send_acks)
                assert broadcaster.subscriber_count == 2
                for seq in range(1, ticks + 1):
                    # never blocks: publish() is not async; the clock is ours
                    broadcaster.publish(batch(seq), now=float(seq))
                    assert slow.updates.statistics().current_buffer_used <= buffer_size
                    assert len(slow._pending) <= 2  # at most one quote per symbol
                    if seq < dropped_at:
                        assert not slow.slow
                        assert not slow.cancel_scope.cancel_called
                        assert broadcaster.subscriber_count == 2
                        assert broadcaster.conflated == 2 * max(0, seq - behind_since)
                    else:
                        assert slow.slow
                        assert slow.cancel_scope.cancel_called
                        assert broadcaster.subscriber_count == 1
                        assert broadcaster.slow_disconnects == 1
                    # The reading subscriber keeps pace, whatever the stuck one does.
                    assert await receive_acks.receive() == seq
                broadcaster.close()

    assert stuck_was_interrupted.is_set()
    assert received == [batch(seq) for seq in range(1, ticks + 1)]
    # What was buffered before the drop is still readable; then the stream ends.
    assert leftovers == [batch(seq) for seq in range(1, buffer_size + 1)]
    assert broadcaster.slow_disconnects == 1
    assert broadcaster.conflated == 2 * (dropped_at - behind_since)
    assert broadcaster.subscriber_count == 0


async def test_a_transient_stall_is_conflated_and_caught_up() -> None:
    buffer_size = 3
    broadcaster = Broadcaster[Tick](buffer_size=buffer_size, slow_consumer_timeout=100.0)
    with broadcaster.subscribe() as sub:
        # Stalled for ten ticks: three fit, the other seven are conflated into one
        # pending batch with the newest quote per symbol.
        for seq in range(1, 11):
            broadcaster.publish(batch(seq, ("A", "B") if seq != 10 else ("A",)), now=float(seq))
        assert broadcaster.conflated == 2 * 5 + 1
        # The subscriber reads again: the buffered ticks first, in order...
        got = [sub.updates.receive_nowait() for _ in range(buffer_size)]
        assert got == [batch(1), batch(2), batch(3)]
        # ...then, at the next tick, the pending batch merged with it: one quote per
        # symbol, each the newest, with a visible gap in the sequence numbers.
        broadcaster.publish(batch(11, ("B",)), now=11.0)
        assert sub.updates.receive_nowait() == (Tick("A", 10), Tick("B", 11))
        # Caught up: later ticks flow as usual.
        broadcaster.publish(batch(12), now=12.0)
        assert sub.updates.receive_nowait() == batch(12)
        assert not sub.slow
    assert broadcaster.slow_disconnects == 0


async def test_publish_never_blocks_with_nobody_reading() -> None:
    buffer_size = 3
    broadcaster = Broadcaster[Tick](buffer_size=buffer_size, slow_consumer_timeout=1.0)
    subs = [broadcaster.subscribe() for _ in range(5)]
    # publish() is synchronous: it returns without waiting for anybody.
    for seq in range(1, 10_001):
        broadcaster.publish(batch(seq), now=seq / 100)
    for sub in subs:
        assert sub.slow
        assert sub.cancel_scope.cancel_called
        assert sub.updates.statistics().current_buffer_used == buffer_size
        with sub:
            pass
    assert broadcaster.slow_disconnects == len(subs)
    assert broadcaster.subscriber_count == 0
    assert broadcaster.latest == {"A": Tick("A", 10_000), "B": Tick("B", 10_000)}


def test_slow_consumer_timeout_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="slow_consumer_timeout"):
        Broadcaster[Tick](slow_consumer_timeout=-1)


async def test_a_subscriber_cancelled_mid_stream_leaves_no_trace() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=8)
    received: list[Batch] = []
    subs: list[Subscription[Tick]] = []
    three_read = anyio.Event()

    async def read_until_cancelled(*, task_status: TaskStatus[None]) -> None:
        with broadcaster.subscribe() as sub:
            subs.append(sub)
            task_status.started()
            async for update in sub.updates:
                received.append(update)
                if len(received) == 3:
                    three_read.set()

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            await tg.start(read_until_cancelled)
            for seq in range(1, 4):
                broadcaster.publish(batch(seq))
            await three_read.wait()
            # Leave items buffered, then cancel the subscriber mid-stream.
            broadcaster.publish(batch(4))
            broadcaster.publish(batch(5))
            tg.cancel_scope.cancel()

    (sub,) = subs
    assert broadcaster.subscriber_count == 0
    stats = sub.updates.statistics()
    assert (stats.open_send_streams, stats.open_receive_streams) == (0, 0)
    with pytest.raises(anyio.ClosedResourceError):
        sub.updates.receive_nowait()
    # Later ticks go nowhere and raise nothing; the subscriber was not "slow".
    for seq in range(6, 100):
        broadcaster.publish(batch(seq))
    assert not sub.slow
    assert broadcaster.slow_disconnects == 0
    assert received[:3] == [batch(1), batch(2), batch(3)]


async def test_close_ends_updates_after_buffered_items_and_refuses_subscribers() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=8)
    first, second = broadcaster.subscribe(), broadcaster.subscribe()
    for seq in range(1, 4):
        broadcaster.publish(batch(seq))
    broadcaster.close()
    with pytest.raises(BroadcasterClosed, match="shutting down"):
        broadcaster.subscribe()
    assert broadcaster.subscriber_count == 2

    waited = anyio.Event()

    async def wait_empty() -> None:
        await broadcaster.wait_empty()
        waited.set()

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_empty)
            with first:
                assert [update async for update in first.updates] == [batch(1), batch(2), batch(3)]
            await anyio.wait_all_tasks_blocked()
            assert not waited.is_set(), "wait_empty returned while a subscriber was open"
            assert broadcaster.subscriber_count == 1
            with second:
                assert [update async for update in second.updates] == [
                    batch(1),
                    batch(2),
                    batch(3),
                ]
            await waited.wait()
    assert broadcaster.subscriber_count == 0
    assert broadcaster.slow_disconnects == 0
    assert not first.slow
    assert not second.slow


async def test_a_publish_after_close_raises_nothing() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=1)
    with broadcaster.subscribe() as sub:
        broadcaster.publish(batch(1))
        broadcaster.close()
        for seq in range(2, 10):
            broadcaster.publish(batch(seq))
        assert [update async for update in sub.updates] == [batch(1)]
        assert not sub.slow
        assert not sub.cancel_scope.cancel_called
    assert broadcaster.slow_disconnects == 0
    assert broadcaster.subscriber_count == 0


async def test_a_tick_during_the_drain_does_not_end_wait_empty_early() -> None:
    # FT's generator keeps ticking while serve() drains: close(), then wait_empty().
    broadcaster = Broadcaster[Tick](buffer_size=8)
    first, second = broadcaster.subscribe(), broadcaster.subscribe()
    broadcaster.publish(batch(1))
    broadcaster.close()
    broadcaster.publish(batch(2))
    waited = anyio.Event()

    async def wait_empty() -> None:
        await broadcaster.wait_empty()
        waited.set()

    try:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_empty)
                await anyio.wait_all_tasks_blocked()
                # Two streams are still open, each with a tick to deliver.
                assert broadcaster.subscriber_count == 2
                with first:
                    pass
                await anyio.wait_all_tasks_blocked()
                assert not waited.is_set(), "wait_empty returned while a stream was open"
                with second:
                    pass
                await waited.wait()
    finally:
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)


async def test_wait_empty_with_no_subscribers_returns_at_once() -> None:
    broadcaster = Broadcaster[Tick]()
    with anyio.fail_after(DEADLINE):
        await broadcaster.wait_empty()
        broadcaster.close()
        await broadcaster.wait_empty()


async def test_wait_empty_waits_for_subscribers_that_leave_later() -> None:
    broadcaster = Broadcaster[Tick]()
    waiters_done = 0
    subs = [broadcaster.subscribe() for _ in range(3)]

    async def waiter() -> None:
        nonlocal waiters_done
        await broadcaster.wait_empty()
        waiters_done += 1

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            for sub in subs:
                await anyio.wait_all_tasks_blocked()
                assert waiters_done == 0
                with sub:
                    pass
    assert waiters_done == 2
    assert broadcaster.subscriber_count == 0


# --- receive() and direct delivery ---------------------------------------------------


async def test_receive_takes_every_buffered_tick_at_once_then_ends() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=8)
    with broadcaster.subscribe() as sub:
        for seq in range(1, 4):
            broadcaster.publish(batch(seq))
        with anyio.fail_after(DEADLINE):
            assert await sub.receive() == [batch(1), batch(2), batch(3)]
            broadcaster.publish(batch(4))
            broadcaster.close()
            assert await sub.receive() == [batch(4)]
            with pytest.raises(anyio.EndOfStream):
                await sub.receive()


async def test_a_waiting_subscriber_gets_ticks_directly_until_it_declines_one() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=8)
    offered: list[Batch] = []
    accept = True

    def deliver(tick: Batch) -> bool:
        offered.append(tick)
        return accept

    received: list[Batch] = []
    with broadcaster.subscribe() as sub:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    received.extend(await sub.receive(direct=deliver))

                tg.start_soon(receive)
                await anyio.wait_all_tasks_blocked()
                for seq in range(1, 4):
                    broadcaster.publish(batch(seq))
                # Delivered on the spot: nothing buffered, the subscriber still asleep.
                assert offered == [batch(1), batch(2), batch(3)]
                assert sub.updates.statistics().current_buffer_used == 0
                assert not received

                accept = False
                broadcaster.publish(batch(4))
                # Declined once, never offered again before the subscriber has
                # taken what is queued: tick 5 must not overtake tick 4.
                accept = True
                broadcaster.publish(batch(5))
                assert offered == [batch(1), batch(2), batch(3), batch(4)]
        assert received == [batch(4), batch(5)]
        # Not waiting any more: ticks are buffered as usual.
        broadcaster.publish(batch(6))
        assert offered[-1] == batch(4)
        assert sub.updates.receive_nowait() == batch(6)
    assert broadcaster.slow_disconnects == 0


async def test_conflated_quotes_are_never_overtaken_by_a_direct_delivery() -> None:
    broadcaster = Broadcaster[Tick](buffer_size=1, slow_consumer_timeout=100.0)
    offered: list[Batch] = []

    def deliver(tick: Batch) -> bool:
        offered.append(tick)
        return True

    with broadcaster.subscribe() as sub:
        broadcaster.publish(batch(1), now=1.0)  # fills the buffer
        broadcaster.publish(batch(2, ("A",)), now=2.0)  # conflated: A #2 pending
        with anyio.fail_after(DEADLINE):
            assert await sub.receive() == [batch(1)]
            async with anyio.create_task_group() as tg:
                received: list[Batch] = []

                async def receive() -> None:
                    received.extend(await sub.receive(direct=deliver))

                tg.start_soon(receive)
                await anyio.wait_all_tasks_blocked()
                broadcaster.publish(batch(3, ("B",)), now=3.0)
    # The pending A #2 is older than B #3: both go through the buffer, A first.
    assert offered == []
    assert received == [(Tick("A", 2), Tick("B", 3))]
