"""A private Prometheus for tests, running the repository's own config and rules.

:func:`running_prometheus` starts ``prometheus`` (Debian: ``apt-get install
prometheus``) with deploy/monitoring/prometheus/prometheus.yml, rewritten for a
test: each job's target becomes a given ``127.0.0.1:PORT``, scrapes and rule
evaluations happen every second, and the rule files are read from the repository
instead of from the container's /etc/prometheus/rules. Its data goes into the
test's own directory.

Ports: Prometheus listens on ``127.0.0.1:0``, so the kernel picks a free port as
it binds, and the harness reads that port back from the child's own listening
socket (:func:`_listening_port`). Picking a free port in the test and handing it
over would leave a gap in which something else could take it.

HTTP goes through ``urllib`` with proxies disabled, as in tests/_services.py.

Resource handling: leaving the ``with`` block kills and reaps Prometheus, whatever
happened in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from _monitoring import PROMETHEUS_CONFIG, RULES_DIR, load_yaml
from _procs import missing_server, wait_until
from _services import DEADLINE

__all__ = [
    "CONTAINER_RULES_DIR",
    "Prometheus",
    "render_config",
    "require_tool",
    "running_prometheus",
]

#: Where compose mounts deploy/monitoring/prometheus/rules; prometheus.yml's
#: rule_files point there (tests/test_monitoring_files.py checks both ends).
CONTAINER_RULES_DIR = PurePosixPath("/etc/prometheus/rules")

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_tool(name: str) -> str:
    """The path of ``name`` (``prometheus``, ``promtool``) on PATH.

    Missing, it skips the test, except in CI (``CI=true``), where a missing tool
    means the checks would silently never run: there it fails.
    """
    found = shutil.which(name)
    if found is None:
        missing_server(f"{name} not found on PATH (Debian: apt-get install prometheus)")
    return found


def render_config(
    *, targets: Mapping[str, str] | None = None, interval: str | None = None
) -> dict[str, Any]:
    """prometheus.yml with its rule files read from the repository.

    ``targets`` (job name → ``host:port``) replaces each job's targets; it must
    name exactly the jobs the file has, so a renamed job cannot go unnoticed.
    ``interval`` sets the scrape interval, scrape timeout and rule evaluation
    interval, everywhere.
    """
    config: dict[str, Any] = load_yaml(PROMETHEUS_CONFIG)
    # relative_to() raises for a rule file outside the mounted directory: such a
    # file would not exist in the container either.
    config["rule_files"] = [
        str(RULES_DIR / PurePosixPath(pattern).relative_to(CONTAINER_RULES_DIR))
        for pattern in config.get("rule_files", [])
    ]
    jobs = config["scrape_configs"]
    if targets is not None:
        names = {job["job_name"] for job in jobs}
        assert set(targets) == names, f"targets for {sorted(targets)}, jobs are {sorted(names)}"
        for job in jobs:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    if interval is not None:
        config["global"] = {
            **config.get("global", {}),
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        }
        for job in jobs:
            job.pop("scrape_interval", None)
            job.pop("scrape_timeout", None)
    return config


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return inodes


def _listening_port(pid: int) -> int | None:
    """The TCP port ``pid`` listens on, or None while it listens on none yet.

    /proc/PID/net/tcp lists every IPv4 socket of the network namespace, not only
    the child's; the child's own sockets are the inodes its file descriptors
    point at (/proc/PID/fd/N → "socket:[INODE]").
    """
    inodes = _socket_inodes(pid)
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}", encoding="ascii") as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                # local_address is HEXIP:HEXPORT; st the state; field 9 the inode.
                if fields[3] == _LISTEN and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    assert len(ports) <= 1, f"pid {pid} listens on several ports: {sorted(ports)}"
    return ports.pop() if ports else None


class Prometheus:
    """A running Prometheus: its port, and its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _get(self, path: str, **params: str) -> Any:
        url = self.url(path) + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with _http.open(url, timeout=DEADLINE) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                body = json.load(error)  # the API explains a 400 (bad query) in JSON
        assert body.get("status") == "success", f"GET {path} {params}: {body}"
        return body["data"]

    def ready(self) -> bool:
        """Whether /-/ready answers 200 (config loaded, storage open)."""
        try:
            with _http.open(self.url("/-/ready"), timeout=DEADLINE) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: the result's samples, each ``{"metric": {...},
        "value": [time, "value"]}``. A scalar comes back as one sample without labels.

        Raises AssertionError with Prometheus's message if it refuses the query.
        """
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets: labels, ``health`` ("up", "down", "unknown")
        and ``lastError``."""
        found: list[dict[str, Any]] = self._get("/api/v1/targets", state="active")["activeTargets"]
        return found

    def rule_names(self) -> set[str]:
        """The names of the recording rules and alerts Prometheus has loaded."""
        groups = self._get("/api/v1/rules")["groups"]
        return {rule["name"] for group in groups for rule in group["rules"]}

    def wait_for(
        self,
        expr_or_probe: str | Callable[[], object],
        timeout: float = DEADLINE,
        *,
        what: str | None = None,
    ) -> Any:
        """Poll until a query has a non-empty result (a string) or a probe returns
        something other than None or False; return that.

        ``'up{job="ft"} == 0'`` waits until the comparison keeps a sample, that is,
        until it holds. On timeout the AssertionError says what the targets' last
        scrapes reported.
        """
        probe: Callable[[], object]
        if isinstance(expr_or_probe, str):
            expr = expr_or_probe

            def has_samples() -> object:
                return self.query(expr) or None

            probe = has_samples
            description = what or expr
        else:
            probe = expr_or_probe
            description = what or str(getattr(probe, "__name__", "a probe"))
        try:
            return wait_until(probe, timeout, interval=0.1, what=description)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.describe()}") from None

    def describe(self) -> str:
        """The targets' state and the end of Prometheus's log, for failure messages."""
        lines = ["targets:"]
        try:
            for target in self.targets():
                labels = target["labels"]
                lines.append(
                    f"  {labels.get('job')} {labels.get('instance')}: {target['health']}"
                    f" {target.get('lastError', '')}"
                )
        except (AssertionError, OSError) as error:
            lines.append(f"  (unavailable: {error})")
        tail = self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
        return "\n".join([*lines, "prometheus log (last lines):", *tail])


@contextmanager
def running_prometheus(
    workdir: Path, targets: Mapping[str, str], *, interval: str = "1s"
) -> Iterator[Prometheus]:
    """Prometheus with the shipped config and rules, scraping ``targets`` (job name →
    ``127.0.0.1:PORT``) every ``interval``, once it is ready. ``workdir`` holds the
    config, the data and the log (kept for a failing test's report)."""
    binary = require_tool("prometheus")
    config = workdir / "prometheus.yml"
    # JSON is YAML, and a dump needs no YAML writer.
    config.write_text(
        json.dumps(render_config(targets=targets, interval=interval), indent=2), encoding="utf-8"
    )
    log = workdir / "prometheus.log"
    # Proxy settings are for people's browsers, not for a scrape of 127.0.0.1.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:

        def bound_port() -> int | None:
            if process.poll() is not None:
                output = log.read_text(encoding="utf-8", errors="replace")
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{output}")
            try:
                return _listening_port(process.pid)
            except FileNotFoundError:  # it exited just now: the next call says how
                return None

        port = wait_until(bound_port, DEADLINE, interval=0.05, what="prometheus to listen")
        prometheus = Prometheus(process, port, log)
        prometheus.wait_for(prometheus.ready, DEADLINE, what="prometheus's /-/ready")
        yield prometheus
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
