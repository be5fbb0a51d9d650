"""Quote history: the database's schema, its migrations and every query on it.

``schema`` (the table), ``database`` (URLs, the engine, migrations, the worker
threads), ``queries`` (writes, pages, candles, retention), ``request`` and
``cursor`` (the history API's parameters and page cursors, pure). The recorder
writes through it and Core reads through it; nothing else touches the database.

This module itself holds only what the command line needs to describe the
``--db`` option, so that ``quotopia --help`` does not import SQLAlchemy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["DB_ENV", "default_database_url"]

#: The one environment variable every service that uses the database reads.
DB_ENV: Final = "QUOTOPIA_DB"


def default_database_url() -> str:
    """SQLite in the user's data directory: ``$XDG_DATA_HOME/quotopia/quotes.db``
    (``~/.local/share/quotopia/quotes.db`` when ``XDG_DATA_HOME`` is unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return f"sqlite:///{Path(base, 'quotopia', 'quotes.db')}"
