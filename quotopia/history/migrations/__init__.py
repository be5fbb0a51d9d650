"""Alembic's migration environment for the history database (see ``database.upgrade``)."""
