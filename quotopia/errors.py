"""Quotopia's small, flat set of error types, and how to show them in one line."""

from __future__ import annotations

import os

__all__ = ["StartupError", "describe_os_error", "first_leaf"]


class StartupError(Exception):
    """A service could not start (for example, its port is taken).

    The command line reports it as one line and exit status 2, like a bad flag.
    """


def first_leaf(error: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def describe_os_error(error: BaseException) -> str:
    """``Address already in use`` and the like, from an OSError (or a group of them)."""
    error = first_leaf(error)
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    return str(error)
