"""Shared test configuration.

AnyIO's pytest plugin runs ``@pytest.mark.anyio`` tests; a module that wants both
backends overrides the ``anyio_backend`` fixture with ``params=["asyncio", "trio"]``.
grpclib pieces run on asyncio only.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from _postgres import Postgres, running_postgres
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Hypothesis's per-example deadline (200 ms) measures wall time, which a noisy,
# shared 2-core machine cannot promise; properties here are about values, not speed.
settings.register_profile("quotopia", deadline=None)
settings.load_profile("quotopia")


@pytest.fixture(scope="session")
def quotes_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Google protobuf classes for proto/quotes.proto, generated now by grpc_tools.

    The independent, stock encoder: what Quotopia's bytes are checked against, and
    what the grpcio (C-core) client reads FT's stream with.
    """
    out = tmp_path_factory.mktemp("quotes_pb2")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={out}",
            str(REPO / "proto" / "quotes.proto"),
        ],
        check=True,
        timeout=60,
    )
    spec = importlib.util.spec_from_file_location("quotes_pb2", out / "quotes_pb2.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- databases: SQLite always, PostgreSQL as a private server --------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One private PostgreSQL server for the session (tests/_postgres.py)."""
    with running_postgres() as server:
        yield server


_database_count = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database, once on each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    server: Postgres = request.getfixturevalue("postgres_server")
    name = f"test_{next(_database_count)}"
    server.psql(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + f"/{name}"
