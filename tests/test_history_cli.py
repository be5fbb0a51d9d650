"""``quotopia db upgrade`` and ``quotopia db current``, as real processes, on both engines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _procs import clean_env

from quotopia.history.database import head_revision


def quotopia(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotopia", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_upgrade_creates_the_schema_once_and_current_reports_it(database_url: str) -> None:
    env = clean_env(QUOTOPIA_DB=database_url)
    before = quotopia("db", "current", env=env)
    assert (before.returncode, before.stdout) == (0, "none\n"), before.stderr
    first = quotopia("db", "upgrade", env=env)
    assert (first.returncode, first.stdout) == (0, f"{head_revision()}\n"), first.stderr
    assert "upgraded from an empty database" in first.stderr
    again = quotopia("db", "upgrade", "--db", database_url, env=clean_env())
    assert (again.returncode, again.stdout) == (0, f"{head_revision()}\n"), again.stderr
    assert "is up to date" in again.stderr
    assert quotopia("db", "current", env=env).stdout == f"{head_revision()}\n"


def test_the_default_database_is_sqlite_in_the_users_data_directory(tmp_path: Path) -> None:
    env = clean_env(XDG_DATA_HOME=str(tmp_path))
    result = quotopia("db", "upgrade", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "quotopia" / "quotes.db").is_file()
    assert f"sqlite:///{tmp_path}/quotopia/quotes.db" in result.stderr


def test_bad_or_unreachable_databases_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        "mysql://root@localhost/q": "unsupported database 'mysql'",
        "sqlite:///:memory:": "SQLite needs a file",
        "none": "--db names no database",
        # A port nothing listens on (1 is privileged and unused here): refused at once.
        "postgresql://quotopia:secret@127.0.0.1:1/q": "Connection refused",
        f"sqlite:///{tmp_path}/not-a-db": "file is not a database",
    }
    (tmp_path / "not-a-db").write_text("this is text, not SQLite\n" * 100)
    for url, says in cases.items():
        result = quotopia("db", "upgrade", "--db", url, env=clean_env())
        assert result.returncode == 2, (url, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("quotopia db: error:")
        assert says in lines[0]
        assert "secret" not in result.stderr  # passwords never reach a log
        assert "Traceback" not in result.stderr
