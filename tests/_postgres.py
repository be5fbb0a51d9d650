"""A private PostgreSQL server for tests: a throwaway cluster on a free port.

:func:`running_postgres` runs Debian's ``initdb`` and ``pg_ctl`` (``apt-get
install postgresql``; they live in ``/usr/lib/postgresql/N/bin``) on a cluster
in a new temporary directory, listening on 127.0.0.1 only, with ``trust``
authentication for the ``postgres`` user. Nothing of the machine's own
PostgreSQL (its clusters, its port 5432) is touched.

Ports: PostgreSQL cannot bind port 0, so the harness picks a free port and
starts the server on it; if something takes the port in between, the server
fails to bind, and the harness tries another port.

PostgreSQL refuses to run as root; under root (a container, CI) the cluster
belongs to the ``postgres`` user the Debian package creates, and the commands
run as that user through ``runuser``.

Resource handling: leaving the ``with`` block stops the server (immediate
shutdown) and removes the cluster, whatever happened in it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Postgres", "find_pg_bin", "require_postgres", "running_postgres"]

#: Seconds ``pg_ctl`` waits for the server to start or stop.
_PG_CTL_WAIT = 60
_BIND_ATTEMPTS = 5


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` with initdb and pg_ctl, or PATH's."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_postgres() -> Path:
    """PostgreSQL's bin directory; missing, the test skips (fails under CI=true)."""
    found = find_pg_bin()
    if found is None:
        # Imported here: the bench uses this harness without pytest installed.
        from _procs import missing_server

        missing_server("PostgreSQL's initdb not found (Debian: apt-get install postgresql)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Postgres:
    """A running private server. ``url`` connects as ``postgres`` to database ``quotopia``."""

    bin_dir: Path
    data_dir: Path
    port: int
    _as_user: Sequence[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/quotopia"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=_PG_CTL_WAIT + 10,
        )

    def start(self) -> None:
        """Start the server on :attr:`port` and wait until it accepts connections."""
        log = self.data_dir / "server.log"
        result = self._pg_ctl(
            "start",
            "-w",
            "-t",
            str(_PG_CTL_WAIT),
            "-l",
            str(log),
            "-o",
            f"-p {self.port} -k {self.data_dir}",
            check=False,
        )
        if result.returncode != 0:
            text = log.read_text() if log.exists() else ""
            raise _StartFailed(result.stderr + text, bind="could not bind" in text)

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``: like a crash, as a test wants)."""
        self._pg_ctl("stop", "-w", "-m", "immediate", "-t", str(_PG_CTL_WAIT), check=False)

    def psql(self, sql: str) -> str:
        """Run ``sql`` with psql against the ``quotopia`` database; its output."""
        return subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                self.url,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout


class _StartFailed(Exception):
    def __init__(self, output: str, *, bind: bool) -> None:
        super().__init__(output)
        self.bind = bind


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A new cluster with a ``quotopia`` database, running until the block ends."""
    bin_dir = require_postgres()
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: that is private to root, and the server runs
    # as postgres.
    base = Path(tempfile.mkdtemp(prefix="quotopia-pg-"))
    data_dir = base / "data"
    try:
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
        with (data_dir / "postgresql.conf").open("a") as conf:
            # Loopback only; fsync off: a test's data need not survive a power cut.
            conf.write("listen_addresses = '127.0.0.1'\nfsync = off\n")
        server = Postgres(bin_dir, data_dir, _free_port(), as_user)
        for attempt in range(_BIND_ATTEMPTS):
            try:
                server.start()
                break
            except _StartFailed as failed:
                if not failed.bind or attempt == _BIND_ATTEMPTS - 1:
                    raise AssertionError(f"PostgreSQL did not start:\n{failed}") from None
                server.port = _free_port()
        try:
            subprocess.run(
                [
                    str(bin_dir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(server.port),
                    "-U",
                    "postgres",
                    "quotopia",
                ],
                capture_output=True,
                check=True,
                timeout=60,
            )
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
