"""The container files: Dockerfile, compose.yaml, requirements.lock, scripts/healthcheck.py.

No Docker engine is needed. The files are linted (hadolint) and validated
(check-jsonschema's Compose spec schema), their structure is checked, the lock is
checked against the project's metadata, and the health probe is run for real
against ``quotopia ft``, ``quotopia core`` and ``quotopia recorder`` started as
processes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
from _compose import FULL_COMPOSE, environment, load_compose, merged
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
HEALTHCHECK = ROOT / "scripts" / "healthcheck.py"

# What each compose service runs after the image's ENTRYPOINT (`quotopia`). The
# end-to-end tests below start the very same commands, as `python -m quotopia ...`.
SERVICE_ARGS = {"ft": ["ft"], "core": ["core"], "recorder": ["recorder"]}

# Variables that would change what a child process does; the tests set their own.
_SETTINGS = re.compile(r"(FT|CORE|RECORDER|QUOTOPIA)_\w+|LOG_LEVEL|LOG_FORMAT")
# Bounds on every wait, well under pytest-timeout's 60 s per test.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
PROBE_TIMEOUT = 10.0


def _tool(name: str) -> str:
    """A console script of the test environment: next to the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH (the 'test' extra)")
    return found


# --- Dockerfile -------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker drops comments, even mid-instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends in a line continuation"
    return result


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for k, arguments in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, found {found}"
    return found[0]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.stderr == "", result.stderr
    findings = json.loads(result.stdout)
    report = "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert findings == [], report
    assert result.returncode == 0


def test_dockerfile_runtime_stage() -> None:
    instructions = _instructions()
    # FROM IMAGE [AS NAME]: every image is a pinned slim-bookworm CPython 3.11, or a stage.
    stages: set[str] = set()
    for base, *alias in (args.split() for keyword, args in instructions if keyword == "FROM"):
        assert base in stages or re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
        stages.update(alias[-1:])

    runtime = _final_stage()
    user = _only(runtime, "USER")
    uid = user.partition(":")[0]
    assert uid.isdigit(), f"runtime must run as a fixed numeric UID, not {user!r}"
    assert int(uid) != 0, "runtime must not run as root"
    assert set(_only(runtime, "EXPOSE").split()) == {"50051", "8081", "8080", "8082"}
    assert _only(runtime, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(_only(runtime, "CMD")) == SERVICE_ARGS["ft"]

    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env

    # The HEALTHCHECK runs the probe script from where the runtime stage copies it.
    probe = json.loads(_only(runtime, "HEALTHCHECK").split(" CMD ", 1)[1])
    assert probe[0] == "python"
    assert f"scripts/healthcheck.py {probe[1]}" in [a for k, a in runtime if k == "COPY"]


def test_dockerfile_installs_the_lock_then_the_wheel() -> None:
    # hadolint cannot see these pip calls (`pip --python VENV install`), so check them here.
    runs = [args for keyword, args in _instructions() if keyword == "RUN"]
    lock_installs = [i for i, run in enumerate(runs) if "-r /tmp/requirements.lock" in run]
    wheel_installs = [i for i, run in enumerate(runs) if re.search(r"--no-deps\s+\S+\.whl", run)]
    assert lock_installs, "the dependencies must come from requirements.lock"
    assert wheel_installs, "the project must be installed as a wheel, with --no-deps"
    assert lock_installs[0] <= wheel_installs[0]


# --- compose.yaml -----------------------------------------------------------------


def test_compose_matches_compose_spec_schema() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
            str(FULL_COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services() -> None:
    compose = load_compose()
    assert "version" not in compose, "the Compose specification has no version key"
    services = compose["services"]
    # What a plain `docker compose up` starts; the `monitoring` profile's services
    # are checked in tests/test_monitoring_files.py.
    assert {name for name, service in services.items() if not service.get("profiles")} == set(
        SERVICE_ARGS
    )

    # FT's second port is its metrics endpoint (FT_METRICS_PORT); the recorder has
    # only that (RECORDER_METRICS_PORT).
    for name, ports in (
        ("ft", ["50051:50051", "8081:8081"]),
        ("core", ["8080:8080"]),
        ("recorder", ["8082:8082"]),
    ):
        service = services[name]
        assert service["container_name"] == f"quotopia-{name}"
        assert service["image"] == "quotopia:latest"
        build = service["build"]
        assert (build if isinstance(build, str) else build["context"]) == "."
        assert service["ports"] == ports
        assert service["networks"] == ["quotopia-network"]
        assert service["restart"] == "unless-stopped"
        assert environment(service)["QUOTOPIA_SERVICE"] == name
        healthcheck = service["healthcheck"]
        assert {"test", "interval", "timeout", "retries", "start_period"} <= healthcheck.keys()
        assert healthcheck["test"][:1] == ["CMD"]
        assert "/app/healthcheck.py" in healthcheck["test"]

    for name in ("core", "recorder"):
        assert environment(services[name])["FT_ADDR"] == "ft:50051", name
        assert services[name]["depends_on"] == {"ft": {"condition": "service_healthy"}}, name
    assert environment(services["recorder"])["RECORDER_METRICS_PORT"] == "8082"
    assert compose["networks"]["quotopia-network"]["name"] == "quotopia-network"


def test_compose_core_reads_what_the_recorder_writes() -> None:
    compose = load_compose()
    services = compose["services"]
    core, recorder = environment(services["core"]), environment(services["recorder"])
    url = recorder["QUOTOPIA_DB"]
    assert core["QUOTOPIA_DB"] == url
    prefix = "sqlite:///"
    assert url.startswith(prefix + "/"), f"an absolute SQLite path, in the volume: {url}"
    path = PurePosixPath(url.removeprefix(prefix))
    for name in ("core", "recorder"):
        # Read-write for both: SQLite's WAL readers write the -shm file too.
        (volume,) = services[name]["volumes"]
        source, target, *mode = volume.split(":")
        assert mode in ([], ["rw"]), f"{name}: WAL needs write access, got {volume}"
        assert source in compose["volumes"], f"{name}: not a named volume: {volume}"
        assert path.parent == PurePosixPath(target), f"{name}: {url} is not in {target}"
    # A new named volume takes the owner of the image's directory: the runtime
    # stage must create it for the unprivileged user.
    runs = " ".join(args for keyword, args in _final_stage() if keyword == "RUN")
    assert f"mkdir {path.parent}" in runs
    user = _only(_final_stage(), "USER")
    assert f"chown {user} {path.parent}" in runs


def test_compose_runs_the_commands_the_e2e_tests_run() -> None:
    """ENTRYPOINT + command in a container == the argv the tests below start."""
    services = load_compose()["services"]
    for name, args in SERVICE_ARGS.items():
        assert services[name]["command"] == args
    assert json.loads(_only(_final_stage(), "ENTRYPOINT")) == ["quotopia"]
    # ... and `quotopia` (the image) and `python -m quotopia` (the tests) are one main().
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["quotopia"] == "quotopia.cli:main"
    main_module = (ROOT / "quotopia" / "__main__.py").read_text(encoding="utf-8")
    assert "from quotopia.cli import main" in main_module


def _documented_variables(command: str) -> set[str]:
    """The environment variables ``quotopia COMMAND --help`` names (``env NAME``)."""
    result = subprocess.run(
        [sys.executable, "-m", "quotopia", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(re.findall(r"env\s+([A-Z][A-Z0-9_]+)", result.stdout))


#: Variables a service reads that are not its flags': the health probe's, and
#: OpenTelemetry's standard ones (quotopia/telemetry/tracing.py checks them).
_NOT_FLAGS = re.compile(r"QUOTOPIA_SERVICE|OTEL_\w+")


@pytest.mark.parametrize("path", [COMPOSE, FULL_COMPOSE], ids=lambda p: p.name)
def test_compose_sets_only_variables_the_commands_read(path: Path) -> None:
    """A misspelt variable in a compose file would be silently ignored: each one
    a quotopia service sets must be one its command documents."""
    services = load_compose(path)["services"]
    for name, args in SERVICE_ARGS.items():
        if name not in services:
            continue
        documented = _documented_variables(args[0])
        unknown = {
            variable
            for variable in environment(services[name])
            if not _NOT_FLAGS.fullmatch(variable) and variable not in documented
        }
        assert not unknown, f"{path.name}: {name} sets {sorted(unknown)}, not in --help"


def test_full_stack_wires_kafka_and_postgresql() -> None:
    """compose.yaml + compose.full.yaml: FT publishes to the broker, Core reads the
    topic as a broadcast, the recorder as a consumer group, both on PostgreSQL;
    each waits for the servers it needs to be healthy."""
    base, overlay = load_compose(), load_compose(FULL_COMPOSE)
    stack = merged(base, overlay)
    services = stack["services"]
    # The overlay adds the two servers and only settings to the existing services.
    assert set(services) == set(base["services"]) | {"kafka", "postgres"}
    for name in SERVICE_ARGS:
        assert set(overlay["services"][name]) <= {"environment", "depends_on"}, name
    for name in ("kafka", "postgres"):
        server = services[name]
        assert "profiles" not in server, name
        assert server["networks"] == ["quotopia-network"], name
        assert server["healthcheck"]["test"][:1] == ["CMD"], name
        (volume,) = server["volumes"]
        assert volume.split(":")[0] in stack["volumes"], f"{name}: keep its data in a volume"

    kafka = environment(services["kafka"])
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    ft, core, recorder = (environment(services[name]) for name in ("ft", "core", "recorder"))
    for env in (ft, core, recorder):
        assert env["QUOTOPIA_KAFKA"] == "kafka:9092"
        assert env["QUOTOPIA_KAFKA_TOPIC"] == "quotes"
    assert core["CORE_SOURCE"] == "kafka"
    assert recorder["RECORDER_SOURCE"] == "kafka"
    assert recorder["RECORDER_KAFKA_GROUP"]

    postgres = environment(services["postgres"])
    url = core["QUOTOPIA_DB"]
    assert recorder["QUOTOPIA_DB"] == url
    user, database = postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]
    assert url == f"postgresql://{user}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{database}"

    healthy = {"condition": "service_healthy"}
    assert services["ft"]["depends_on"] == {"kafka": healthy}
    for name in ("core", "recorder"):
        assert services[name]["depends_on"] == {
            "ft": healthy,
            "kafka": healthy,
            "postgres": healthy,
        }, name


# --- requirements.lock ------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in LOCK.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"not an exact pin: {line!r}"
        pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def _runtime_closure() -> set[str]:
    """Names of quotopia's runtime dependencies, transitively, from installed metadata.

    Markers are evaluated for this interpreter (CPython 3.11 here and in the image).
    """
    seen: set[str] = set()
    todo = [("quotopia", frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed; install the project to check the lock")
        for text in requires:
            requirement = Requirement(text)
            # evaluate() fills in this interpreter's environment around "extra".
            marker = requirement.marker
            if marker and not any(marker.evaluate({"extra": e}) for e in extras or {""}):
                continue  # another Python, or an extra nobody asked for (test, lint)
            key = canonicalize_name(requirement.name)
            if key not in seen or requirement.extras:
                seen.add(key)
                todo.append((requirement.name, frozenset(requirement.extras)))
    return seen


def test_requirements_lock_pins_the_runtime_dependencies() -> None:
    pins = _pins()
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]

    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is a dependency but not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {text!r}"
        )

    runtime = _runtime_closure()
    missing = runtime - pins.keys()
    assert not missing, f"transitive dependencies missing from requirements.lock: {sorted(missing)}"

    # An extra may name a runtime package too (the bench extra names hpack, which
    # grpclib needs anyway): only what the runtime does not need is dev-only.
    dev_only = {
        canonicalize_name(Requirement(t).name)
        for extra in project["optional-dependencies"].values()
        for t in extra
    } - runtime
    leaked = dev_only & pins.keys()
    assert not leaked, f"test/lint tools in the runtime lock: {sorted(leaked)}"


# --- scripts/healthcheck.py -------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quotopia_healthcheck", HEALTHCHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_picks_the_service(
    healthcheck: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid1 = tmp_path / "cmdline"
    pid1.write_bytes(b"/opt/venv/bin/python\0/opt/venv/bin/quotopia\0core\0--log-level\0DEBUG\0")
    monkeypatch.delenv("QUOTOPIA_SERVICE", raising=False)

    assert healthcheck.resolve_service([], pid1_cmdline=tmp_path / "absent") == "ft"
    assert healthcheck.resolve_service([], pid1_cmdline=pid1) == "core"
    monkeypatch.setenv("QUOTOPIA_SERVICE", "ft")
    assert healthcheck.resolve_service([], pid1_cmdline=pid1) == "ft"
    assert healthcheck.resolve_service(["core"], pid1_cmdline=pid1) == "core"


def _child_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _SETTINGS.fullmatch(k)}
    return env | settings


def _probe(**settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env=_child_env(**settings),
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        check=False,
    )


class _Service:
    """``python -m quotopia ARGS`` as a child process; a thread drains its stderr."""

    def __init__(self, *args: str) -> None:
        self.argv = [sys.executable, "-m", "quotopia", *args]
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=_child_env(LOG_LEVEL="INFO"),
            cwd=ROOT,
        )
        self.output: list[str] = []
        # Lines from the reader thread; None once stderr is closed. The thread also
        # keeps the pipe drained: FT logs every tick and must never block on it.
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_port(self, pattern: str) -> int:
        """Wait for the log line matching ``pattern`` and return its ``port`` group."""
        deadline = time.monotonic() + START_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:  # the process exited
                break
            self.output.append(line)
            if found := re.search(pattern, line):
                return int(found["port"])
        command = " ".join(self.argv)
        pytest.fail(f"no {pattern!r} in the output of {command}:\n{''.join(self.output)}")

    def stop(self) -> int:
        """SIGTERM (what `docker stop` sends), bounded wait, SIGKILL as a last resort."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self._reader.join(timeout=STOP_TIMEOUT)
        assert self.process.stderr is not None
        self.process.stderr.close()
        # Keep the rest of the log for failure messages.
        while not self._lines.empty():
            if (line := self._lines.get_nowait()) is not None:
                self.output.append(line)
        return self.process.returncode


@contextlib.contextmanager
def _running(*args: str) -> Iterator[_Service]:
    service = _Service(*args)
    try:
        yield service
    finally:
        service.stop()


FT_LISTENING = r"FT listening on \S+:(?P<port>\d+) "
CORE_LISTENING = r"Core listening on http://\S+:(?P<port>\d+),"
RECORDER_LISTENING = r"recorder metrics on http://\S+:(?P<port>\d+)/metrics"


@pytest.mark.e2e
def test_probe_reports_running_services_healthy(tmp_path: Path) -> None:
    ft_args = [*SERVICE_ARGS["ft"], "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    with _running(*ft_args) as ft:
        ft_port = ft.wait_for_port(FT_LISTENING)
        result = _probe(QUOTOPIA_SERVICE="ft", FT_PORT=str(ft_port))
        assert result.returncode == 0, result.stderr

        core_args = [*SERVICE_ARGS["core"], "--host", "127.0.0.1", "--port", "0"]
        with _running(*core_args, "--ft-addr", f"127.0.0.1:{ft_port}") as core:
            core_port = core.wait_for_port(CORE_LISTENING)
            result = _probe(QUOTOPIA_SERVICE="core", CORE_PORT=str(core_port))
            assert result.returncode == 0, result.stderr

        recorder_args = [*SERVICE_ARGS["recorder"], "--host", "127.0.0.1", "--metrics-port", "0"]
        database = f"sqlite:///{tmp_path / 'quotes.db'}"
        with _running(
            *recorder_args, "--ft-addr", f"127.0.0.1:{ft_port}", "--db", database
        ) as recorder:
            port = str(recorder.wait_for_port(RECORDER_LISTENING))
            # Healthy is ready: the endpoint listens first, /readyz turns 200 once
            # the schema is in place and recording began.
            deadline = time.monotonic() + START_TIMEOUT
            while (
                result := _probe(QUOTOPIA_SERVICE="recorder", RECORDER_METRICS_PORT=port)
            ).returncode:
                assert time.monotonic() < deadline, result.stderr
                time.sleep(0.1)


@pytest.mark.e2e
def test_probe_reports_stopped_service_unhealthy() -> None:
    with _running(
        *SERVICE_ARGS["ft"], "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"
    ) as ft:
        port = str(ft.wait_for_port(FT_LISTENING))
        # A clean exit on SIGTERM is what the image's STOPSIGNAL relies on.
        assert ft.stop() == 0, "".join(ft.output)

    for service, variable in (
        ("ft", "FT_PORT"),
        ("core", "CORE_PORT"),
        ("recorder", "RECORDER_METRICS_PORT"),
    ):
        result = _probe(QUOTOPIA_SERVICE=service, **{variable: port})
        assert result.returncode == 1, f"{service}: {result.stderr}"
        assert "unhealthy" in result.stderr

    unknown = _probe(QUOTOPIA_SERVICE="nope")
    assert unknown.returncode == 1  # never 2: Docker reserves it
