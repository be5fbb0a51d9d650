"""Core's side of the history database: reads off the event loop, and what can go wrong.

:class:`HistoryReader` runs the queries of :mod:`quotopia.history.queries` in
worker threads (:meth:`quotopia.history.database.Database.run`, which AnyIO runs
on Trio as on asyncio), so a slow database never stalls the event loop that
serves the latest prices. It turns every way the database can be missing into
:class:`HistoryUnavailable`, which the routes answer with a 503:

- no database configured (``--db none``);
- a database without the schema: a SQLite file that does not exist (Core never
  creates one, nor migrates: ``quotopia db upgrade`` does), or one that
  ``quotopia db upgrade`` has not been run on;
- a database Core cannot reach (PostgreSQL down, a file it cannot open).

An outage is logged once, as a WARNING without a traceback, when it starts; its
end once, at INFO. Any other database error is a bug and propagates (a 500 with
the traceback in the log).

The JSON bodies of the history routes are rendered here too, with the formats the
rest of the API uses (:func:`quotopia.core.recent.quote_fields`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

import anyio
from alembic.runtime.migration import MigrationContext
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from quotopia.core.recent import quote_fields
from quotopia.history.cursor import Cursor
from quotopia.history.database import Database, describe_url
from quotopia.history.queries import Candle, StoredQuote, candles, has_symbol, history_page
from quotopia.history.request import CandleQuery, HistoryQuery
from quotopia.history.schema import SYMBOL_LENGTH
from quotopia.telemetry import tracing

__all__ = [
    "NO_DATABASE",
    "NO_SCHEMA",
    "UNREACHABLE",
    "HistoryReader",
    "HistoryUnavailable",
    "candles_body",
    "page_body",
    "storable",
]

T = TypeVar("T")

logger = logging.getLogger("quotopia.core")
_tracer = tracing.tracer("quotopia.core")

#: The ``detail`` of each 503 answer.
NO_DATABASE: Final = "no history database configured (--db)"
NO_SCHEMA: Final = (
    "the history database has no schema yet: run `quotopia db upgrade` with the same --db"
)
UNREACHABLE: Final = "the history database is unreachable; retry later"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class HistoryUnavailable(Exception):
    """History cannot be read now; ``detail`` says why, for the client."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _NoSchema(Exception):
    pass


def storable(symbol: str) -> bool:
    """Could the database hold ``symbol`` at all? (If not, no need to ask it.)"""
    return 0 < len(symbol) <= SYMBOL_LENGTH and "\x00" not in symbol


class HistoryReader:
    """The history database, read from Core's event loop; or none (``url=None``).

    Resource handling: :meth:`close` (or ``with``) closes the pooled connections.
    Error handling: every read raises :class:`HistoryUnavailable` when there is no
    database, no schema in it, or no reaching it.
    """

    def __init__(self, url: URL | None, *, pool_size: int = 4) -> None:
        # create=False: no SQLite file (nor directory) appears just because Core started.
        self._database = None if url is None else Database(url, pool_size=pool_size, create=False)
        self._engine_name = "none" if url is None else url.get_backend_name()
        #: Seen the schema since the last error? Then reads skip looking for it.
        self._schema_seen = False
        #: The detail of the outage going on (logged when it began), or None.
        self._outage: str | None = None

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._database is not None:
            self._database.close()

    @property
    def configured(self) -> bool:
        return self._database is not None

    def describe(self) -> str:
        """The database, for logs (a password hidden), or ``none``."""
        return "none" if self._database is None else describe_url(self._database.url)

    async def page(
        self, query: HistoryQuery, *, known: bool
    ) -> tuple[list[StoredQuote], Cursor | None] | None:
        """One history page; None if the symbol is neither ``known`` nor in the database."""

        def work(connection: Connection) -> tuple[list[StoredQuote], Cursor | None] | None:
            rows, cursor = history_page(connection, query)
            if not rows and not known and not has_symbol(connection, query.symbol):
                return None
            return rows, cursor

        return await self._read(work, "history page")

    async def candles(self, query: CandleQuery, *, known: bool) -> list[Candle] | None:
        """The candles of a window; None if the symbol is neither ``known`` nor stored."""

        def work(connection: Connection) -> list[Candle] | None:
            found = candles(connection, query)
            if not found and not known and not has_symbol(connection, query.symbol):
                return None
            return found

        return await self._read(work, "candles")

    async def _read(self, work: Callable[[Connection], T], what: str) -> T:
        """``work`` in a worker thread; with tracing on, in a CLIENT span
        ``SELECT quotes``, the child of the request's span."""
        if not tracing.enabled():
            return await self._read_now(work)
        with _tracer.start_as_current_span(
            "SELECT quotes",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": self._engine_name,
                "db.operation.name": "SELECT",
                "db.collection.name": "quotes",
                "db.query.summary": "SELECT quotes",
                "quotopia.query": what,
            },
        ):
            return await self._read_now(work)

    async def _read_now(self, work: Callable[[Connection], T]) -> T:
        database = self._database
        if database is None:
            raise HistoryUnavailable(NO_DATABASE)
        try:
            result = await database.run(lambda connection: self._with_schema(connection, work))
        except _NoSchema:
            self._went_down(NO_SCHEMA, "has no schema (run `quotopia db upgrade`)")
            raise HistoryUnavailable(NO_SCHEMA) from None
        except DBAPIError as error:
            self._schema_seen = False
            unavailable = await self._diagnose(database, error)
            if unavailable is None:
                raise  # the schema is there and the database answers: a bug
            raise unavailable from None
        if self._outage is not None:
            self._outage = None
            logger.info("history database %s is available again", self.describe())
        return result

    def _with_schema(self, connection: Connection, work: Callable[[Connection], T]) -> T:
        """``work(connection)``, once the schema is known to be there (in the thread)."""
        if not self._schema_seen:
            if MigrationContext.configure(connection).get_current_revision() is None:
                raise _NoSchema
            self._schema_seen = True
        return work(connection)

    async def _diagnose(self, database: Database, error: DBAPIError) -> HistoryUnavailable | None:
        """Why ``error`` happened: no schema, no reaching the database, or neither (None)."""
        if database.dialect == "sqlite":
            assert database.url.database is not None
            if not await anyio.Path(database.url.database).exists():
                self._went_down(NO_SCHEMA, "does not exist (run `quotopia db upgrade`)")
                return HistoryUnavailable(NO_SCHEMA)
        elif isinstance(error, OperationalError | InterfaceError):
            # psycopg's errors of the connection itself: refused, dropped, timed out.
            self._went_down(UNREACHABLE, f"is unreachable: {_first_line(error)}")
            return HistoryUnavailable(UNREACHABLE)
        # Ask again, simply: a schema dropped since it was seen, or an unreadable file?
        try:
            revision = await database.run(
                lambda c: MigrationContext.configure(c).get_current_revision()
            )
        except DBAPIError as probe_error:
            self._went_down(UNREACHABLE, f"is unreachable: {_first_line(probe_error)}")
            return HistoryUnavailable(UNREACHABLE)
        if revision is None:
            self._went_down(NO_SCHEMA, "has no schema (run `quotopia db upgrade`)")
            return HistoryUnavailable(NO_SCHEMA)
        return None

    def _went_down(self, detail: str, says: str) -> None:
        """Log the start of an outage (once), or its change of cause."""
        if self._outage != detail:
            self._outage = detail
            logger.warning(
                "history database %s %s; the history routes answer 503", self.describe(), says
            )


def _first_line(error: DBAPIError) -> str:
    """The driver's own first line: what is wrong, without SQLAlchemy's decoration."""
    cause = error.orig if error.orig is not None else error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


# --- the bodies -----------------------------------------------------------------------


def _rfc3339(time_us: int) -> str:
    """RFC 3339, UTC, milliseconds: the format of every quote time in the API."""
    moment = _EPOCH + timedelta(microseconds=time_us)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _quote(row: StoredQuote) -> dict[str, object]:
    fields = quote_fields(row.symbol, row.price, row.time, row.change_percent, row.sequence)
    # A string: a 63-bit number is more than a JavaScript number holds exactly.
    fields["run_id"] = str(row.run_id)
    return fields


def page_body(
    query: HistoryQuery, rows: list[StoredQuote], cursor: Cursor | None
) -> dict[str, object]:
    """The body of ``GET /quotes/{symbol}/history``."""
    return {
        "symbol": query.symbol,
        "order": query.order,
        "quotes": [_quote(row) for row in rows],
        "next_cursor": None if cursor is None else cursor.encode(),
    }


def candles_body(query: CandleQuery, found: list[Candle]) -> dict[str, object]:
    """The body of ``GET /quotes/{symbol}/candles``."""
    return {
        "symbol": query.symbol,
        "interval": query.interval,
        "from": _rfc3339(query.from_us),
        "to": _rfc3339(query.to_us),
        "candles": [
            {
                "time": _rfc3339(candle.start_us),
                "open": candle.open,
                "high": candle.high,
                "low": candle.low,
                "close": candle.close,
                "count": candle.count,
            }
            for candle in found
        ],
    }
