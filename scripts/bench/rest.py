"""Part 1: Core's REST API under wrk, beside the ceiling of its server.

``GET /quotes`` and ``GET /quotes/BTC`` over keep-alive connections (wrk -t1
-c64), each after a warm-up run, on:

- Core (``quotopia core``), fed by a real FT at the 1 s tick;
- a raw ASGI app on hypercorn's Trio worker returning the bytes Core returned
  (captured at the start of the run): the ceiling of Core's server;
- Core on 2 workers (``--workers 2`` if Core has it, else the bench's stand-in).

wrk's own CPU time is reported beside the server's, to show whether the client,
not the server, was the limit.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .plan import Context
from .procs import (
    BenchError,
    Sampler,
    Service,
    core_has_workers_flag,
    core_ready,
    ft_ready,
    http_get,
    others_cpu_pct,
    start_core,
    start_ft,
)
from .report import Part, Row, ms, pct, rate

__all__ = ["PATHS", "WrkResult", "parse_wrk", "require_wrk", "run", "run_wrk"]

PATHS = ("/quotes", "/quotes/BTC")

WRK_MISSING = (
    "wrk is not installed, and the REST and freshness parts need it: "
    "`apt-get install -y wrk` (Debian/Ubuntu), or `brew install wrk`"
)


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    duration_s: float
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float | None
    non_2xx: int
    socket_errors: int
    #: wrk's own CPU time (user + system) during the run.
    client_cpu_s: float

    @property
    def client_cpu_pct(self) -> float:
        return 100 * self.client_cpu_s / self.duration_s if self.duration_s else 0.0


def require_wrk() -> str:
    """The path of wrk, or a :class:`BenchError` saying how to install it."""
    found = shutil.which("wrk")
    if found is None:
        raise BenchError(WRK_MISSING)
    return found


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, float | int | None]:
    """Requests/s, the latency percentiles and the error counts from wrk --latency."""
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if found is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    percentiles = {
        int(p): _seconds(t) for p, t in re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", output, re.M)
    }
    done = re.search(r"(\d+) requests in ([\d.]+\w+),", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "requests_per_s": float(found[1]),
        "requests": int(done[1]) if done else 0,
        "duration_s": _seconds(done[2]) if done else 0.0,
        "latency_p50_s": percentiles.get(50),
        "latency_p90_s": percentiles.get(90),
        "latency_p99_s": percentiles.get(99),
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }


def run_wrk(url: str, *, connections: int, duration_s: int) -> WrkResult:
    """One wrk run (one thread, keep-alive connections); also measures wrk's CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [require_wrk(), "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    parsed = parse_wrk(done.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkResult(**parsed, client_cpu_s=cpu)  # type: ignore[arg-type]


def _measure(ctx: Context, service: Service, port: int) -> dict[str, dict[str, object]]:
    plan = ctx.plan
    out: dict[str, dict[str, object]] = {}
    for path in PATHS:
        url = f"http://127.0.0.1:{port}{path}"
        if plan.rest_warmup_s:
            run_wrk(url, connections=plan.rest_connections, duration_s=plan.rest_warmup_s)
        with Sampler(service) as sampler:
            result = run_wrk(
                url, connections=plan.rest_connections, duration_s=plan.rest_duration_s
            )
        out[path] = {
            **asdict(result),
            "client_cpu_pct": result.client_cpu_pct,
            "server_cpu_pct": sampler.cpu_pct(service),
            "server_peak_rss": sampler.peak_rss(service),
            "machine_busy_pct": sampler.machine_busy_pct,
            "others_cpu_pct": others_cpu_pct(
                sampler.machine_busy_pct, sampler.cpu_pct(service), result.client_cpu_pct
            ),
        }
        ctx.log(
            f"  {service.name} GET {path}: {result.requests_per_s:,.0f} req/s, "
            f"p50 {ms(result.latency_p50_s)}, p99 {ms(result.latency_p99_s)}"
        )
        if result.non_2xx or result.socket_errors:
            ctx.log(f"  ! {result.non_2xx} non-2xx responses, {result.socket_errors} socket errors")
    return out


def run(ctx: Context) -> Part:
    require_wrk()
    ctx.log("REST: Core, raw ASGI on hypercorn (Trio), Core on 2 workers")
    data: dict[str, object] = {"connections": ctx.plan.rest_connections}
    ft, ft_port = start_ft(1.0)
    with ft, tempfile.TemporaryDirectory(prefix="quotopia-bench-") as tmp:
        ft_ready(ft, ft_port, ctx.pb, 30)
        core, port = start_core(ft_port)
        with core:
            core_ready(core, port, 30)
            bodies = {path: http_get(port, path)[1].decode() for path in PATHS}
            data["core"] = _measure(ctx, core, port)
        bodies_file = Path(tmp) / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        raw = Service(
            "raw-asgi",
            [sys.executable, "-m", "scripts.bench.peers", "asgi", f"--bodies={bodies_file}"],
        )
        with raw:
            raw_port = int(raw.wait_line(r"raw ASGI listening on http://127\.0\.0\.1:(\d+)", 30)[1])
            data["raw_asgi"] = _measure(ctx, raw, raw_port)
        workers = ctx.plan.rest_workers
        multi, multi_port = start_core(ft_port, workers=workers)
        with multi:
            core_ready(multi, multi_port, 30, probes=4 * workers)
            data[f"core_x{workers}"] = _measure(ctx, multi, multi_port)
        data["workers_via"] = (
            "quotopia core --workers" if core_has_workers_flag() else "bench stand-in"
        )
        data["bodies"] = bodies
    return Part("rest", _rows(data, workers), data)


def _rows(data: dict[str, object], workers: int) -> list[Row]:
    core = data["core"]
    raw = data["raw_asgi"]
    multi = data[f"core_x{workers}"]
    assert isinstance(core, dict)
    assert isinstance(raw, dict)
    assert isinstance(multi, dict)
    rows = []
    for path in PATHS:
        c, r, m = core[path], raw[path], multi[path]
        share = 100 * c["requests_per_s"] / r["requests_per_s"] if r["requests_per_s"] else None
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: req/s (64 conns)",
                rate(c["requests_per_s"]),
                f"raw ASGI: {rate(r['requests_per_s'])}",
                f"Core at {pct(share)} of the ceiling; wrk CPU {pct(c['client_cpu_pct'])}; "
                f"other processes {pct(c['others_cpu_pct'])} / {pct(r['others_cpu_pct'])}",
            )
        )
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: p50 / p99",
                f"{ms(c['latency_p50_s'])} / {ms(c['latency_p99_s'])}",
                f"raw ASGI: {ms(r['latency_p50_s'])} / {ms(r['latency_p99_s'])}",
                f"server CPU: Core {pct(c['server_cpu_pct'])}, raw {pct(r['server_cpu_pct'])}",
            )
        )
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: req/s, {workers} workers",
                f"{rate(m['requests_per_s'])} ({ms(m['latency_p50_s'])} / "
                f"{ms(m['latency_p99_s'])})",
                f"1 worker: {rate(c['requests_per_s'])}",
                f"{data['workers_via']}; server CPU {pct(m['server_cpu_pct'])}; "
                f"other processes {pct(m['others_cpu_pct'])}",
            )
        )
    return rows
