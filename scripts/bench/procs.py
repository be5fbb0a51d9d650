"""The services under test as child processes: start, find the port, probe, measure, stop.

Every service listens on port 0 and the bench finds the real port: from the
service's own log line when it prints one, else from the process's listening
socket (FT runs with ``--log-level WARNING``, which hides its INFO "listening" line,
because at INFO it also logs every price).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import psutil

__all__ = [
    "ROOT",
    "BenchError",
    "Sampler",
    "Service",
    "clean_env",
    "core_ready",
    "ft_ready",
    "http_get",
    "others_cpu_pct",
    "scraping",
    "start_core",
    "start_ft",
]

ROOT = Path(__file__).resolve().parents[2]

#: Settings the quotopia CLI reads from the environment: never inherit them by accident.
_CLI_ENV_PREFIXES = ("FT_", "CORE_")


class BenchError(Exception):
    """A service or tool did not behave as the bench needs (not a slow result)."""


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_CLI_ENV_PREFIXES) and k != "LOG_LEVEL"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Service:
    """One service process, its output lines (stdout and stderr), and psutil on it.

    Resource handling: leaving the ``with`` block stops it (SIGTERM, then SIGKILL)
    and reaps it.
    """

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.started_at = time.monotonic()
        #: FT's /metrics port, once known (see start_ft).
        self.metrics_port: int | None = None
        self._popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=clean_env() | dict(env or {}),
        )
        self.pid = self._popen.pid
        self.process = psutil.Process(self.pid)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._popen.stdout is not None
        for line in self._popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail(self, what: str) -> BenchError:
        tail = "\n".join(f"    {line}" for line in self.lines[-20:])
        return BenchError(f"{self.name}: {what}; its last output:\n{tail}")

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching ``pattern`` (a regex), waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if found := regex.search(line):
                        return found
                checked = len(self.lines)
                if self._closed:
                    raise self.fail(f"exited before printing /{pattern}/")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.fail(f"printed no /{pattern}/ within {timeout:g}s")
                self._changed.wait(left)

    def listening_port(self, timeout: float) -> int:
        """The TCP port this process (or a child of it) listens on, once it does."""
        return min(self.listening_ports(timeout, 1))

    def listening_ports(self, timeout: float, count: int) -> set[int]:
        """The ``count`` TCP ports this process (or its children) listens on, once it does."""
        deadline = time.monotonic() + timeout
        while True:
            if self._popen.poll() is not None:
                raise self.fail(f"exited with status {self._popen.returncode}")
            ports = set()
            for proc in [self.process, *self.process.children(recursive=True)]:
                try:
                    for conn in proc.net_connections(kind="tcp"):
                        if conn.status == psutil.CONN_LISTEN and conn.laddr:
                            ports.add(int(conn.laddr.port))
                except psutil.NoSuchProcess:
                    continue
            if len(ports) >= count:
                return ports
            if time.monotonic() > deadline:
                raise self.fail(f"not listening on {count} ports after {timeout:g}s")
            time.sleep(0.01)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def thread_ids(self) -> list[int]:
        """The ids of every thread of the process and its children."""
        ids = []
        for proc in self._tree():
            try:
                ids += [thread.id for thread in proc.threads()]
            except psutil.NoSuchProcess:
                continue
        return ids

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, of the process and its children."""
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss(self) -> int:
        """Resident memory now, in bytes, of the process and its children."""
        total = 0
        for proc in self._tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def alive(self) -> bool:
        return self._popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                for proc in self._tree()[::-1]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                self._popen.wait()
        self._reader.join(5)
        if self._popen.stdout is not None:
            self._popen.stdout.close()
        return self._popen.returncode


class Sampler:
    """CPU and peak RSS of some services over an interval, sampled every 0.25 s.

    Use as a context manager around the measured interval; read :meth:`cpu_s` and
    :meth:`peak_rss` afterwards.
    """

    def __init__(self, *services: Service) -> None:
        self._services = services
        self._stop = threading.Event()
        self._peak = dict.fromkeys((s.name for s in services), 0)
        self._cpu0: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._begun = 0.0
        self.elapsed = 0.0
        self._machine0: Any = None
        #: How busy the whole machine was (every process, ours included), in percent
        #: of all its CPUs: on a shared machine, a hint of how noisy the figure is.
        self.machine_busy_pct = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for service in self._services:
            self._peak[service.name] = max(self._peak[service.name], service.rss())

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def __enter__(self) -> Sampler:
        self._cpu0 = {s.name: s.cpu_seconds() for s in self._services}
        self._machine0 = psutil.cpu_times()
        self._begun = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.elapsed = time.monotonic() - self._begun
        self._cpu = {s.name: s.cpu_seconds() - self._cpu0[s.name] for s in self._services}
        self.machine_busy_pct = _busy_pct(self._machine0, psutil.cpu_times())
        self._stop.set()
        self._thread.join()
        self._sample()

    def cpu_s(self, service: Service) -> float:
        return self._cpu[service.name]

    def cpu_pct(self, service: Service) -> float:
        return 100 * self._cpu[service.name] / self.elapsed if self.elapsed else 0.0

    def peak_rss(self, service: Service) -> int:
        return self._peak[service.name]


def others_cpu_pct(machine_busy_pct: float, *ours_pct: float) -> float:
    """CPU used by processes outside the bench (in % of one CPU): the machine's busy
    share, less what the bench's own processes used. A noisy neighbour shows here."""
    return max(0.0, machine_busy_pct * (os.cpu_count() or 1) - sum(ours_pct))


def _busy_pct(before: Any, after: Any) -> float:
    def idle(times: Any) -> float:
        return float(times.idle + getattr(times, "iowait", 0.0))

    total = sum(after) - sum(before)
    return 100 * (1 - (idle(after) - idle(before)) / total) if total > 0 else 0.0


# --- our services ---------------------------------------------------------------------


def quotopia_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "quotopia", *args]


def start_ft(tick: float = 1.0, *, extra: Sequence[str] = ()) -> tuple[Service, int]:
    """Start ``quotopia ft`` on 127.0.0.1, port 0, quiet; return it and its port."""
    ft = Service(
        "ft",
        quotopia_argv(
            "ft",
            "--host=127.0.0.1",
            "--port=0",
            "--metrics-port=0",
            "--log-level=WARNING",
            f"--tick-interval={tick!r}",
            *extra,
        ),
    )
    try:
        # Quiet (at WARNING) FT logs no port: tell its two listening ports apart by
        # asking each for /livez, which only the metrics endpoint answers.
        ports = ft.listening_ports(30, 2)
        metrics = [p for p in ports if _answers_http(p)]
        if len(metrics) != 1:
            raise ft.fail(f"cannot tell FT's metrics port among {sorted(ports)}")
    except BaseException:
        ft.stop()
        raise
    ft.metrics_port = metrics[0]
    (port,) = ports - set(metrics)
    return ft, port


def shipped_scrape_interval() -> float:
    """The ``scrape_interval`` of the Prometheus configuration Quotopia ships
    (deploy/monitoring/prometheus/prometheus.yml), in seconds."""
    config = Path(__file__).resolve().parents[2] / "deploy/monitoring/prometheus/prometheus.yml"
    found = re.search(r"^\s*scrape_interval:\s*(\d+)s\s*$", config.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no scrape_interval in seconds in {config}")
    return float(found[1])


@contextlib.contextmanager
def scraping(port: int | None, interval: float | None = None) -> Iterator[None]:
    """GET ``/metrics`` on ``port`` every ``interval`` seconds while the block runs,
    as Prometheus does (by default at the interval Quotopia's configuration sets;
    Prometheus's own default is a minute), so that a figure measured inside
    includes what metrics cost FT as deployed. ``None``: no scraping."""
    if interval is None:
        interval = shipped_scrape_interval()
    if port is None:
        yield
        return
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(interval):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/metrics")
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                pass  # the figure says if FT was in trouble; the scraper need not
            finally:
                connection.close()

    thread = threading.Thread(target=scrape, name="metrics-scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _answers_http(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/livez")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def start_core(ft_port: int, *, workers: int = 1, extra: Sequence[str] = ()) -> tuple[Service, int]:
    """Start ``quotopia core`` on 127.0.0.1, port 0, fed by FT; return it and its port.

    With ``workers > 1``: ``quotopia core --workers N``; ``extra`` flags follow.
    """
    argv = quotopia_argv("core", "--host=127.0.0.1", "--port=0", f"--ft-addr=127.0.0.1:{ft_port}")
    if workers > 1:
        argv.append(f"--workers={workers}")
    argv += extra
    core = Service("core" if workers == 1 else f"core-x{workers}", argv)
    try:
        found = core.wait_line(r"Core listening on http://127\.0\.0\.1:(\d+)", 30)
    except BaseException:
        core.stop()
        raise
    return core, int(found[1])


# --- probes ---------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def core_ready(core: Service, port: int, timeout: float, *, probes: int = 1) -> float:
    """Wait until Core serves a quote (``GET /quotes/BTC`` is 200 ``probes`` times
    in a row); return the seconds since the process started."""
    deadline = time.monotonic() + timeout
    ok = 0
    while True:
        try:
            status, _ = http_get(port, "/quotes/BTC", timeout=1.0)
        except OSError:
            status = 0
        ok = ok + 1 if status == 200 else 0
        if ok >= probes:
            return time.monotonic() - core.started_at
        if not core.alive():
            raise core.fail("exited before serving quotes")
        if time.monotonic() > deadline:
            raise core.fail(f"served no quote within {timeout:g}s")
        time.sleep(0.01)


def ft_ready(ft: Service, port: int, pb: ModuleType, timeout: float) -> float:
    """Wait until FT streams a quote to a new subscriber; return the seconds since start."""
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_stream(
            "/QuoteService/StreamQuotes",
            request_serializer=pb.StreamQuotesRequest.SerializeToString,
            response_deserializer=pb.Quote.FromString,
        )
        while True:
            call: Any = method(pb.StreamQuotesRequest(), timeout=2.0)
            try:
                next(call)
                return time.monotonic() - ft.started_at
            except grpc.RpcError:
                pass
            finally:
                call.cancel()
            if not ft.alive():
                raise ft.fail("exited before streaming")
            if time.monotonic() > deadline:
                raise ft.fail(f"streamed no quote within {timeout:g}s")
            time.sleep(0.01)


def json_body(body: bytes) -> Any:
    return json.loads(body)
