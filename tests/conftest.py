"""Shared test configuration.

AnyIO's pytest plugin runs ``@pytest.mark.anyio`` tests; a module that wants both
backends overrides the ``anyio_backend`` fixture with ``params=["asyncio", "trio"]``.
grpclib pieces run on asyncio only.
"""

from __future__ import annotations

import pytest
from hypothesis import settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Hypothesis's per-example deadline (200 ms) measures wall time, which a noisy,
# shared 2-core machine cannot promise; properties here are about values, not speed.
settings.register_profile("quotopia", deadline=None)
settings.load_profile("quotopia")
