"""Quote history: the database's schema, its migrations and every query on it.

``schema`` (the table), ``database`` (URLs, the engine, migrations, the worker
threads), ``queries`` (writes, pages, candles, retention), ``request`` and
``cursor`` (the history API's parameters and page cursors, pure). The recorder
writes through it and Core reads through it; nothing else touches the database.
"""
