"""Where history lives: the database URL, the engine, migrations, and the threads.

One code path for both engines: SQLAlchemy Core with its standard drivers
(Python's own ``sqlite3``; ``psycopg`` 3 for PostgreSQL) and Alembic for the
schema. The drivers are blocking, so every statement runs in a worker thread
(:meth:`Database.run`, through AnyIO), never on an event loop. The same calls
then serve the recorder (asyncio) and Core (Trio), where SQLAlchemy's asyncio
extension would serve only the first.

Settings a reader should know about:

- SQLite runs in WAL mode: Core's readers and the recorder's writer, in other
  processes, do not block each other. ``synchronous=NORMAL`` (a commit survives
  a crash of the process, not always a power cut) buys the ingest rate; a busy
  timeout makes a second writer wait instead of failing.
- pysqlite's own transaction handling is off (SQLAlchemy's documented recipe):
  SQLAlchemy emits ``BEGIN`` itself, so transactions, DDL included, mean what
  they say. Migrations begin with ``BEGIN IMMEDIATE``, which takes SQLite's
  write lock at once; on PostgreSQL they take a transaction-scoped advisory
  lock. Either way, two services starting together migrate one after the other.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import URL, Connection, Engine, create_engine
from sqlalchemy.exc import ArgumentError

from quotopia.history import DB_ENV, default_database_url

__all__ = [
    "DB_ENV",
    "Database",
    "current_revision",
    "default_database_url",
    "describe_url",
    "head_revision",
    "parse_database_url",
    "upgrade",
]

T = TypeVar("T")

#: Words that turn history off where a service can run without it (Core).
NO_DATABASE: Final = ("", "none", "off")

#: Any constant will do: it only has to be the same in every process.
_PG_MIGRATION_LOCK: Final = 0x71756F74  # "quot"

#: Seconds a SQLite connection waits for another process's write lock.
_SQLITE_BUSY_TIMEOUT: Final = 30.0


def parse_database_url(text_url: str) -> URL | None:
    """A database URL, checked: ``sqlite:///PATH`` or ``postgresql://...``.

    ``none`` (or an empty string) returns ``None``: no database. ``postgres://``
    is accepted as an alias; both PostgreSQL spellings use the psycopg driver.
    Raises :class:`ValueError` with a one-line message for anything else,
    including an in-memory SQLite database, which each worker thread would see
    as a different, empty database.
    """
    if text_url.strip().lower() in NO_DATABASE:
        return None
    try:
        url = make_url(text_url.strip())
    except ArgumentError:
        raise ValueError(
            f"bad database URL {text_url!r}: expected sqlite:///PATH or postgresql://..."
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ValueError(f"unsupported SQLite driver {url.drivername!r}: use sqlite:///PATH")
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            raise ValueError("SQLite needs a file: sqlite:///relative/path or sqlite:////abs/path")
        return url.set(drivername="sqlite+pysqlite")
    if backend in ("postgresql", "postgres"):
        if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(
                f"unsupported PostgreSQL driver {url.drivername!r}: use postgresql://..."
            )
        return url.set(drivername="postgresql+psycopg")
    raise ValueError(
        f"unsupported database {backend!r} in {describe_url(url)}: "
        "use sqlite:///PATH or postgresql://..."
    )


def describe_url(url: URL) -> str:
    """``url`` as the user would write it, for logs and errors, with any password hidden."""
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)


def _create_engine(
    url: URL, *, pool_size: int, migrating: bool = False, create: bool = True
) -> Engine:
    """An engine for ``url`` with Quotopia's settings (see the module docstring).

    ``create=False`` never makes a SQLite file (nor its directory): connecting to
    a missing one fails instead, as a reader that only reads wants.
    """
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        path = Path(url.database)
        options: dict[str, Any] = {}
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            # A URI with mode=rw opens an existing file (read-write: WAL needs it)
            # or fails; a plain path would create it.
            uri = f"file:{quote(str(path.absolute()))}?mode=rw"
            options["creator"] = lambda: sqlite3.connect(
                uri, uri=True, timeout=_SQLITE_BUSY_TIMEOUT, check_same_thread=False
            )
        engine = create_engine(
            url,
            connect_args={"timeout": _SQLITE_BUSY_TIMEOUT, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=0,
            **options,
        )
        begin = "BEGIN IMMEDIATE" if migrating else "BEGIN"

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: object) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            connection.exec_driver_sql(begin)

        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        # A connection the server dropped (a restart) is noticed before use.
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5, "application_name": "quotopia"},
    )


def _alembic_config(connection: Connection) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", "quotopia.history:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this version of Quotopia ships."""
    config = AlembicConfig()
    config.set_main_option("script_location", "quotopia.history:migrations")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def upgrade(url: URL) -> tuple[str | None, str]:
    """Bring the schema at ``url`` to the newest revision; blocking.

    Returns ``(before, after)`` revisions (``before`` is ``None`` for a new
    database). Safe to run from several processes at once: the migration lock
    makes the later ones find the work done. Raises SQLAlchemy's
    :class:`~sqlalchemy.exc.OperationalError` if the database is unreachable.
    """
    # Alembic narrates every step at INFO; the caller logs the outcome instead.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    engine = _create_engine(url, pool_size=1, migrating=True)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
            before = MigrationContext.configure(connection).get_current_revision()
            command.upgrade(_alembic_config(connection), "head")
            after = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    assert after is not None
    return before, after


def current_revision(url: URL) -> str | None:
    """The revision the database at ``url`` is at (``None``: no schema); blocking."""
    engine = _create_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


class Database:
    """A connection pool to the history database, used from async code.

    :meth:`run` calls a blocking function with a connection in a worker thread
    and at most ``pool_size`` at a time, on either AnyIO backend. With
    ``create=False`` (a reader: Core) a SQLite database that does not exist is
    not created, its directory neither: a statement fails instead.

    Resource handling: :meth:`close` (or ``with``) closes every pooled connection.
    Cancellation: a statement already running in its thread is not interrupted;
    the caller waits for it to finish (or fail), so a transaction is committed
    or rolled back, never left half-done.
    """

    def __init__(self, url: URL, *, pool_size: int = 4, create: bool = True) -> None:
        self.url = url
        self.dialect = url.get_backend_name()
        self._engine = _create_engine(url, pool_size=pool_size, create=create)
        self._limiter = anyio.CapacityLimiter(pool_size)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"Database({describe_url(self.url)!r})"

    async def run(self, work: Callable[[Connection], T]) -> T:
        """``work(connection)`` in a worker thread, inside one transaction.

        The transaction commits if ``work`` returns and rolls back if it raises.
        """
        return await anyio.to_thread.run_sync(self._transaction, work, limiter=self._limiter)

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        with self._engine.begin() as connection:
            return work(connection)

    async def revision(self) -> str | None:
        """The schema revision the database is at (``None``: no schema yet)."""
        return await self.run(lambda c: MigrationContext.configure(c).get_current_revision())
