"""The reconnect policy: Backoff's properties, and supervise_feed on a virtual clock.

The supervisor runs under ``trio.run`` with ``MockClock(autojump_threshold=0)``: its
sleeps take no real time, and ``trio.current_time()`` tells exactly when each
session was attempted.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from hypothesis import given
from hypothesis import strategies as st

from quotopia.backoff import Backoff
from quotopia.core.config import CoreConfig
from quotopia.core.feed import FeedEnded, FeedStalled, supervise_feed
from quotopia.core.store import QuoteStore

#: The jitter supervise_feed's Backoff uses (the default).
JITTER = Backoff().jitter

# Up to 64 doublings happen before the base is pinned at the cap.
MAX_DOUBLINGS = 64

initials = st.floats(min_value=1e-6, max_value=1e3)
cap_factors = st.floats(min_value=1.0, max_value=1e9)
jitters = st.floats(min_value=0.0, max_value=0.99)
rng_seeds = st.integers(min_value=0, max_value=2**32)


def make_backoff(initial: float, factor: float, jitter: float, seed: int) -> Backoff:
    return Backoff(initial, initial * factor, jitter=jitter, rng=random.Random(seed))


# --- Backoff ------------------------------------------------------------------------


@given(initials, cap_factors, jitters, rng_seeds)
def test_base_doubles_monotonically_to_the_cap_and_stays(
    initial: float, factor: float, jitter: float, seed: int
) -> None:
    backoff = make_backoff(initial, factor, jitter, seed)
    bases = []
    for _ in range(MAX_DOUBLINGS + 3):
        bases.append(backoff.base)
        backoff.next_delay()
    assert bases[0] == initial
    assert all(a <= b for a, b in itertools.pairwise(bases))
    assert all(b <= backoff.cap for b in bases)
    assert bases[-1] == backoff.cap
    # Exactly doubling until the cap; pinned there from then on.
    for n, base in enumerate(bases[:MAX_DOUBLINGS]):
        assert base == min(backoff.cap, initial * 2.0**n)
    reached = bases.index(backoff.cap)
    assert all(b == backoff.cap for b in bases[reached:])
    if factor <= 2.0**60:
        assert reached <= math.ceil(math.log2(factor)) + 1


@given(initials, cap_factors, jitters, rng_seeds)
def test_first_delay_is_about_initial(
    initial: float, factor: float, jitter: float, seed: int
) -> None:
    delay = make_backoff(initial, factor, jitter, seed).next_delay()
    assert initial * (1 - jitter) <= delay <= initial


@given(initials, cap_factors, jitters, rng_seeds, st.integers(1, 100))
def test_every_delay_is_within_jitter_bounds_of_its_base(
    initial: float, factor: float, jitter: float, seed: int, attempts: int
) -> None:
    backoff = make_backoff(initial, factor, jitter, seed)
    for _ in range(attempts):
        base = backoff.base
        delay = backoff.next_delay()
        assert base * (1 - jitter) <= delay <= base <= backoff.cap


@given(initials, cap_factors, rng_seeds, st.integers(1, 100))
def test_without_jitter_the_delay_is_the_base(
    initial: float, factor: float, seed: int, attempts: int
) -> None:
    backoff = make_backoff(initial, factor, 0.0, seed)
    for _ in range(attempts):
        base = backoff.base
        assert backoff.next_delay() == base


@given(initials, cap_factors, jitters, rng_seeds, st.integers(0, 100))
def test_reset_restarts_from_initial(
    initial: float, factor: float, jitter: float, seed: int, failures: int
) -> None:
    backoff = make_backoff(initial, factor, jitter, seed)
    for _ in range(failures):
        backoff.next_delay()
    backoff.reset()
    assert backoff.base == initial
    assert initial * (1 - jitter) <= backoff.next_delay() <= initial
    assert backoff.base == min(backoff.cap, 2 * initial)


@given(initials, cap_factors, jitters, rng_seeds)
def test_same_rng_seed_same_delays(initial: float, factor: float, jitter: float, seed: int) -> None:
    first = make_backoff(initial, factor, jitter, seed)
    second = make_backoff(initial, factor, jitter, seed)
    assert [first.next_delay() for _ in range(20)] == [second.next_delay() for _ in range(20)]


def test_defaults() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.cap, backoff.jitter) == (0.1, 5.0, 0.2)


@pytest.mark.parametrize(
    ("initial", "cap"),
    [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (math.nan, 1.0), (1.0, math.nan), (-math.inf, 1.0)],
)
def test_invalid_initial_or_cap_raises(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match=r"need 0 < initial <= cap"):
        Backoff(initial, cap)


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_invalid_jitter_raises(jitter: float) -> None:
    with pytest.raises(ValueError, match=r"jitter must be in \[0, 1\)"):
        Backoff(0.1, 1.0, jitter=jitter)


# --- supervise_feed on a virtual clock -----------------------------------------------

CONFIG = CoreConfig(backoff_initial=0.5, backoff_cap=4.0)


def expected_bases(count: int, *, resets_before: frozenset[int] = frozenset()) -> list[float]:
    """The base of each of ``count`` delays, the backoff restarting before the listed ones."""
    bases = []
    failures = 0
    for i in range(count):
        if i in resets_before:
            failures = 0
        bases.append(min(CONFIG.backoff_cap, CONFIG.backoff_initial * 2.0**failures))
        failures += 1
    return bases


def run_supervisor(
    attempt: Callable[[int, QuoteStore], Awaitable[None]], attempts: int, seed: int = 7
) -> tuple[list[float], QuoteStore]:
    """Run supervise_feed on a mock clock until ``attempts`` sessions have started.

    ``attempt(n, store)`` is session number n (from 0); it must raise or return.
    Returns the virtual time at which each session started, counted from the start.
    """
    times: list[float] = []

    async def main() -> QuoteStore:
        store = QuoteStore(clock=trio.current_time)
        start = trio.current_time()
        with trio.CancelScope() as scope:

            async def session(config: CoreConfig, session_store: QuoteStore) -> None:
                assert config is CONFIG
                assert session_store is store
                times.append(trio.current_time() - start)
                if len(times) == attempts:
                    scope.cancel()
                await attempt(len(times) - 1, session_store)

            await supervise_feed(CONFIG, store, session=session, rng=random.Random(seed))
        assert scope.cancelled_caught
        return store

    store = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(times) == attempts
    return times, store


def assert_intervals_follow(times: list[float], bases: list[float], seed: int = 7) -> None:
    intervals = [b - a for a, b in itertools.pairwise(times)]
    assert len(intervals) == len(bases)
    for interval, base in zip(intervals, bases, strict=True):
        assert base * (1 - JITTER) - 1e-9 <= interval <= base + 1e-9
    # And exactly the delays the same seeded policy draws, resets aside.
    replay = random.Random(seed)
    for interval, base in zip(intervals, bases, strict=True):
        assert interval == pytest.approx(base * (1 - JITTER * replay.random()), abs=1e-9)


async def refuse(n: int, store: QuoteStore) -> None:
    raise ConnectionRefusedError(111, "Connection refused")


@pytest.mark.parametrize("seed", [0, 7, 2025])
def test_refused_connections_back_off_to_the_cap(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quotopia.core")
    times, store = run_supervisor(refuse, attempts=10, seed=seed)
    assert times[0] == 0.0
    # 0.5, 1, 2, 4, then pinned at the 4 s cap.
    bases = expected_bases(9)
    assert bases == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert_intervals_follow(times, bases, seed)
    assert not store.connected
    assert store.reconnects == 0
    unavailable = [r for r in caplog.records if r.getMessage().startswith("FT unavailable")]
    # One per attempt: the last is logged before its sleep is cancelled.
    assert len(unavailable) == 10
    assert all(r.levelno == logging.INFO for r in unavailable)
    assert "connection refused" in unavailable[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_session_that_delivered_data_resets_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="quotopia.core")

    async def attempt(n: int, store: QuoteStore) -> None:
        if n == 4:
            store.feed_up()
            store.apply("BTC", 95400.0, None, 0.0, 1)
            raise StreamTerminatedError("Connection lost")
        raise ConnectionRefusedError(111, "Connection refused")

    times, store = run_supervisor(attempt, attempts=9)
    # Failures 0-3 grow the delay; session 4 delivered a quote, so the delay after
    # it starts over from the initial one and grows again.
    bases = expected_bases(8, resets_before=frozenset({4}))
    assert bases == [0.5, 1.0, 2.0, 4.0, 0.5, 1.0, 2.0, 4.0]
    assert_intervals_follow(times, bases)
    assert store.get("BTC") is not None
    assert not store.connected
    lost = [r for r in caplog.records if r.getMessage().startswith("feed lost")]
    assert len(lost) == 1
    assert lost[0].levelno == logging.WARNING
    assert "connection lost" in lost[0].getMessage()


def test_a_connection_without_data_does_not_reset_the_backoff() -> None:
    async def attempt(n: int, store: QuoteStore) -> None:
        store.feed_up()
        raise FeedEnded("FT ended the stream")

    times, store = run_supervisor(attempt, attempts=6)
    assert_intervals_follow(times, expected_bases(5))
    assert store.reconnects == 5
    assert not store.connected


def test_an_unexpected_error_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="quotopia.core")

    async def attempt(n: int, store: QuoteStore) -> None:
        if n in (1, 2):
            raise RuntimeError(f"bug number {n}")
        raise ConnectionRefusedError(111, "Connection refused")

    times, _ = run_supervisor(attempt, attempts=6)
    # The loop survived both errors and kept to the same schedule.
    assert_intervals_follow(times, expected_bases(5))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["feed session failed unexpectedly"] * 2
    for record, n in zip(errors, (1, 2), strict=True):
        assert record.levelno == logging.ERROR
        assert record.name == "quotopia.core"
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
        assert str(record.exc_info[1]) == f"bug number {n}"
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert "unexpected RuntimeError" in retries[1]
    assert "unexpected RuntimeError" in retries[2]


@pytest.mark.parametrize(
    "failure",
    [
        OSError("Network is unreachable"),
        ConnectionResetError(104, "Connection reset by peer"),
        GRPCError(Status.UNAVAILABLE, "FT is draining"),
        StreamTerminatedError("Connection lost"),
        TimeoutError(),  # asyncio.TimeoutError on 3.11+
        FeedEnded("FT ended the stream"),
        FeedStalled("no data from FT for 5s"),
        None,  # the session returned normally
    ],
    ids=repr,
)
def test_expected_failures_are_retried_without_a_traceback(
    failure: Exception | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quotopia.core")

    async def attempt(n: int, store: QuoteStore) -> None:
        if failure is not None:
            raise failure

    times, _ = run_supervisor(attempt, attempts=4)
    assert_intervals_follow(times, expected_bases(3))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_cancellation_during_a_session_is_not_swallowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="quotopia.core")
    started: list[float] = []

    async def hang(config: CoreConfig, store: QuoteStore) -> None:
        started.append(trio.current_time())
        store.feed_up()
        await trio.sleep_forever()

    async def main() -> None:
        store = QuoteStore(clock=trio.current_time)
        start = trio.current_time()
        with trio.move_on_after(30) as scope:
            await supervise_feed(CONFIG, store, session=hang, rng=random.Random(1))
        assert scope.cancelled_caught
        assert trio.current_time() - start == pytest.approx(30)
        assert started == [start]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Cancelled, not a failed session: nothing logged as an error, no retry scheduled.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
