"""Alembic's environment: run the migrations on the connection the caller holds.

:func:`quotopia.history.database.upgrade` opens the connection, takes the
migration lock inside its transaction (so two services starting at once do not
both create the table) and passes it in ``config.attributes["connection"]``.
There is no ``alembic.ini`` and no offline mode: ``quotopia db upgrade`` is the
one way in.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from quotopia.history.schema import metadata

connection = context.config.attributes["connection"]
assert isinstance(connection, Connection), "run through quotopia.history.database.upgrade"
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds a table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
