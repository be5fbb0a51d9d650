"""quotopia.logs: what each format writes to stderr, and what neither lets through.

Each test configures logging for real, with ``sys.stderr`` swapped for a buffer
while :func:`~quotopia.logs.configure` runs (the handler keeps the stream it was
given), and puts the logging set-up back afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotopia import logs

#: Loggers configure() changes, so the tests can put them back.
_TOUCHED = ("", "hypercorn.error", "grpclib", "asyncio", "alembic", "aiokafka")

#: Today's text format: date, time to the millisecond, level padded to 7, message.
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +(?P<message>.*)")
#: RFC 3339, UTC, to the millisecond.
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

log = logging.getLogger("quotopia.test")


@contextmanager
def configured(
    level: str = "INFO", fmt: str = "text", service: str = "ft", **kwargs: Any
) -> Iterator[io.StringIO]:
    """``logs.configure(level, fmt, service, **kwargs)`` writing into the buffer
    yielded; the logging set-up before it is restored on exit."""
    saved = [
        (logger, logger.level, logger.handlers[:], logger.filters[:])
        for logger in map(logging.getLogger, _TOUCHED)
    ]
    stream = io.StringIO()
    stderr, sys.stderr = sys.stderr, stream
    try:
        logs.configure(level, fmt, service, **kwargs)
    finally:
        sys.stderr = stderr
    try:
        yield stream
    finally:
        for logger, level_before, handlers, filters in saved:
            logger.setLevel(level_before)
            logger.handlers[:] = handlers
            logger.filters[:] = filters


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- text ---------------------------------------------------------------------------


def test_text_is_one_plain_line_per_event_and_shows_no_extras() -> None:
    with configured() as out:
        log.info("client connected: %s", "127.0.0.1:5000", extra={"subscribers": 3})
        log.warning("feed lost")
    first, second = out.getvalue().splitlines()
    assert TEXT_LINE.fullmatch(first), first
    assert first.endswith(" INFO    client connected: 127.0.0.1:5000")
    assert second.endswith(" WARNING feed lost")


def test_text_time_is_local_time_to_the_millisecond() -> None:
    with configured() as out:
        # Naive local times, as the text shows them.
        before = datetime.now()
        log.info("now")
        after = datetime.now()
    stamp = datetime.strptime(out.getvalue()[:23], "%Y-%m-%d %H:%M:%S.%f")
    # Milliseconds, truncated: the stamp may be up to 1 ms before ``before``.
    assert before - timedelta(milliseconds=1) <= stamp <= after


def test_a_worker_prefixes_its_text_lines() -> None:
    with configured(worker=2) as out:
        log.info("serving")
    assert out.getvalue().rstrip("\n").endswith(" INFO    worker 2: serving")


# --- json ---------------------------------------------------------------------------


def test_json_is_one_object_per_line_with_the_fixed_keys() -> None:
    with configured(fmt="json", service="core") as out:
        log.info("Core stopped")
        log.warning("feed lost: %s", "connection lost")
    first, second = json_lines(out)
    assert list(first) == ["time", "level", "logger", "message", "service"]
    assert first["level"] == "INFO"
    assert first["logger"] == "quotopia.test"
    assert first["message"] == "Core stopped"
    assert first["service"] == "core"
    assert second["level"] == "WARNING"
    assert second["message"] == "feed lost: connection lost"


def test_json_time_is_rfc3339_utc_to_the_millisecond() -> None:
    with configured(fmt="json") as out:
        before = datetime.now(UTC)
        log.info("now")
        after = datetime.now(UTC)
    (line,) = json_lines(out)
    assert RFC3339_MS.fullmatch(line["time"]), line["time"]
    stamp = datetime.fromisoformat(line["time"])
    assert stamp.utcoffset() == timedelta(0)
    # Milliseconds, truncated: the stamp may be up to 1 ms before ``before``.
    assert before - timedelta(milliseconds=1) <= stamp <= after


def test_json_extras_are_keys_of_their_own_with_their_types() -> None:
    with configured(fmt="json") as out:
        log.info(
            "client connected: %s",
            "127.0.0.1:5000",
            extra={"peer": "127.0.0.1:5000", "subscribers": 3, "symbols": ["BTC", "ETH"]},
        )
    (line,) = json_lines(out)
    assert line["message"] == "client connected: 127.0.0.1:5000"
    assert line["peer"] == "127.0.0.1:5000"
    assert line["subscribers"] == 3
    assert line["symbols"] == ["BTC", "ETH"]


def test_an_extra_cannot_replace_a_fixed_key() -> None:
    with configured(fmt="json", service="ft") as out:
        log.info("hello", extra={"level": "fake", "service": "fake", "logger": "fake"})
    (line,) = json_lines(out)
    assert (line["level"], line["service"], line["logger"]) == ("INFO", "ft", "quotopia.test")


def test_a_traceback_is_the_exception_key() -> None:
    with configured(fmt="json") as out:
        try:
            raise ValueError("bad tick")
        except ValueError:
            log.exception("tick failed")
        log.error("no traceback here")
    with_traceback, without = json_lines(out)
    assert with_traceback["message"] == "tick failed"
    assert with_traceback["exception"].startswith("Traceback (most recent call last):")
    assert with_traceback["exception"].endswith("ValueError: bad tick")
    assert "exception" not in without


def test_a_worker_has_a_worker_key() -> None:
    with configured(fmt="json", service="core", worker=2) as out:
        log.info("serving")
    (line,) = json_lines(out)
    assert (line["service"], line["worker"], line["message"]) == ("core", 2, "serving")


#: Names logging keeps for itself: an extra by one of them is an error. logs drops
#: those starting with "_" and those of its own keys.
_RESERVED = {*logging.makeLogRecord({}).__dict__, "message", "asctime", *logs.JSON_KEYS}


@given(
    message=st.text(),
    extra=st.dictionaries(
        st.text(min_size=1).filter(lambda key: key not in _RESERVED and key[0] != "_"),
        st.text() | st.integers(),
        max_size=5,
    ),
)
def test_any_message_and_extra_round_trip_on_one_line(message: str, extra: dict[str, Any]) -> None:
    with configured(fmt="json") as out:
        log.warning("%s", message, extra=extra)
    written = out.getvalue()
    assert written.isascii()
    assert written.count("\n") == 1
    assert written.endswith("\n")
    line = json.loads(written)
    assert line["message"] == message
    assert {key: line[key] for key in extra} == extra


# --- both -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", logs.LOG_FORMATS)
def test_records_below_the_level_are_dropped(fmt: str) -> None:
    with configured("warning", fmt) as out:
        log.info("dropped")
        log.warning("kept")
        log.error("kept too")
    assert out.getvalue().count("\n") == 2
    assert "dropped" not in out.getvalue()


@pytest.mark.parametrize("fmt", logs.LOG_FORMATS)
def test_chatty_libraries_only_show_warnings(fmt: str) -> None:
    with configured("DEBUG", fmt) as out:
        for name in ("hypercorn.error", "grpclib", "asyncio", "alembic.runtime.migration"):
            logging.getLogger(name).info("%s announces", name)
            logging.getLogger(name).warning("%s warns", name)
        log.debug("ours, at DEBUG")
    written = out.getvalue()
    assert "announces" not in written
    assert written.count(" warns") == 4
    assert "ours, at DEBUG" in written


def test_aiokafka_speaks_only_at_debug() -> None:
    """aiokafka logs each failed connection attempt at ERROR, ten times a second
    while a broker is away; the services report that themselves, once."""
    kafka_log = logging.getLogger("aiokafka.conn")
    with configured("INFO") as out:
        kafka_log.error("Unable connect to node with id 1")
        log.info("ours")
    assert "Unable connect" not in out.getvalue()
    assert "ours" in out.getvalue()
    with configured("DEBUG") as out:
        kafka_log.error("Unable connect to node with id 1")
        kafka_log.debug("Request 1: ApiVersionRequest_v0()")
    assert out.getvalue().count("\n") == 2


@pytest.mark.parametrize("fmt", logs.LOG_FORMATS)
def test_asyncio_writes_to_closed_sockets_are_dropped(fmt: str) -> None:
    asyncio_log = logging.getLogger("asyncio")
    with configured(fmt=fmt) as out:
        asyncio_log.warning("socket.send() raised exception.")
        asyncio_log.warning("some other asyncio warning")
    assert "socket.send()" not in out.getvalue()
    assert "some other asyncio warning" in out.getvalue()


def test_an_unknown_format_or_level_is_refused_and_changes_nothing() -> None:
    with configured() as out:
        with pytest.raises(ValueError, match="log format must be one of text, json"):
            logs.configure("INFO", "xml")
        with pytest.raises(ValueError, match="LOUD"):
            logs.configure("LOUD", "json")
        log.info("still text")
    assert out.getvalue().rstrip("\n").endswith(" INFO    still text")
