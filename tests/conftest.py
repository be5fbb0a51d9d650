"""Shared test configuration.

AnyIO's pytest plugin runs ``@pytest.mark.anyio`` tests; a module that wants both
backends overrides the ``anyio_backend`` fixture with ``params=["asyncio", "trio"]``.
grpclib pieces run on asyncio only.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
