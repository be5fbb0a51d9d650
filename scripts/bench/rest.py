"""Part 1: Core's REST API under wrk, beside the ceiling of its server.

``GET /quotes`` and ``GET /quotes/BTC`` over keep-alive connections (wrk -t1
-c64) on three servers, all started at once and left running for the whole part:

- Core (``quotopia core``), fed by a real FT at the 1 s tick;
- a raw ASGI app on hypercorn's Trio worker returning the bytes Core returned
  (captured at the start of the part): the ceiling of Core's server;
- Core on 2 workers (``quotopia core --workers 2``);
- what users would pick instead, in the solo rounds: FastAPI on uvicorn returning
  the same bytes, and, with ``--go-seed`` (:mod:`.gofanout`), the Go original's
  Core (Gin, release mode) fed by the Go original's FT.

On a shared machine the same server under the same wrk run twice can differ by a
third, so a single run of each, one after the other, says little about their
ratio. Two measurements, each repeated, each reported as a median:

- **solo rounds**: wrk on one server at a time; each round runs every server once,
  in an order that rotates from round to round. This gives each server's req/s and
  latency, and the 2-worker ÷ 1-worker ratio of each round;
- **paired rounds**: Core and the raw app under two wrk runs *at the same time*,
  each server pinned to a CPU of its own (Linux), the CPUs swapped each round.
  Whatever else the machine is doing falls on both alike: the ratio of the two is
  what "Core at N % of its server's ceiling" means.

wrk's own CPU time is reported beside the servers', to show whether the client,
not the server, was the limit.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import gofanout
from .plan import Context
from .procs import (
    BenchError,
    Sampler,
    Service,
    core_ready,
    ft_ready,
    http_get,
    others_cpu_pct,
    start_core,
    start_ft,
)
from .report import Part, Row, ms, pct, rate

__all__ = [
    "PATHS",
    "WrkResult",
    "core_peak_rss",
    "parse_wrk",
    "require_wrk",
    "run",
    "run_wrk",
    "run_wrks",
]

PATHS = ("/quotes", "/quotes/BTC")

WRK_MISSING = (
    "wrk is not installed, and the REST and freshness parts need it: "
    "`apt-get install -y wrk` (Debian/Ubuntu), or `brew install wrk`"
)

#: The servers of the solo rounds, by the names their figures are saved under.
CORE, RAW, MULTI = "core", "raw_asgi", "core_multi"
FASTAPI, GO_CORE = "fastapi", "go_core"
#: The peers' rows, by label: FastAPI always, the Go original's Core with --go-seed.
PEERS = (("FastAPI/uvicorn", FASTAPI), ("Go Core (Gin)", GO_CORE))

#: One measured wrk run, as saved in the JSON: :class:`WrkResult`'s fields plus CPU.
Figures = dict[str, Any]


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


def run_wrks(urls: Sequence[str], *, connections: int, duration_s: int) -> list[WrkResult]:
    """One wrk (one thread, keep-alive connections) per URL, all at the same time.

    Their CPU time is measured together (the children's rusage), and shared out
    evenly: the runs are alike, and only the total matters for the verdict "was
    the client the limit".
    """
    argv = [require_wrk(), "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = [
        subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for url in urls
    ]
    outputs: list[tuple[int, str, str]] = []
    try:
        for wrk in runs:
            out, err = wrk.communicate(timeout=duration_s + 60)
            outputs.append((wrk.returncode, out, err))
    finally:
        for wrk in runs:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results = []
    for code, out, err in outputs:
        if code != 0:
            raise BenchError(f"wrk failed ({code}): {err or out}")
        results.append(WrkResult(**parse_wrk(out), client_cpu_s=cpu / len(urls)))  # type: ignore[arg-type]
    return results


def run_wrk(url: str, *, connections: int, duration_s: int) -> WrkResult:
    """One wrk run (one thread, keep-alive connections); also measures wrk's CPU."""
    return run_wrks([url], connections=connections, duration_s=duration_s)[0]


def _figures(result: WrkResult, sampler: Sampler, *services: Service) -> Figures:
    """A wrk result, with the CPU of ``services`` (in order) and of everyone else."""
    cpus = [sampler.cpu_pct(service) for service in services]
    return {
        **asdict(result),
        "client_cpu_pct": result.client_cpu_pct,
        "server_cpu_pct": cpus[0],
        "server_peak_rss": sampler.peak_rss(services[0]),
        "machine_busy_pct": sampler.machine_busy_pct,
        "others_cpu_pct": others_cpu_pct(
            sampler.machine_busy_pct, *cpus, result.client_cpu_pct * len(services)
        ),
    }


# --- CPU pinning for the paired rounds ------------------------------------------------


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin(service: Service, cpus: Sequence[int]) -> None:
    """Run every thread of ``service`` (and of its children) on ``cpus`` only (Linux).

    Affinity is per thread and only new threads inherit it, hence every thread.
    """
    for tid in service.thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            continue


# --- the part -------------------------------------------------------------------------


def _solo_round(
    ctx: Context, path: str, servers: dict[str, tuple[Service, int]], order: Sequence[str]
) -> dict[str, Figures]:
    figures = {}
    for name in order:
        service, port = servers[name]
        with Sampler(service) as sampler:
            result = run_wrk(
                f"http://127.0.0.1:{port}{path}",
                connections=ctx.plan.rest_connections,
                duration_s=ctx.plan.rest_duration_s,
            )
        figures[name] = _figures(result, sampler, service)
        _warn_errors(ctx, service, result)
    return figures


def _paired_round(
    ctx: Context,
    path: str,
    core: tuple[Service, int],
    raw: tuple[Service, int],
    cpus: tuple[Sequence[int], Sequence[int]] | None,
) -> dict[str, object]:
    (core_service, core_port), (raw_service, raw_port) = core, raw
    if cpus is not None:
        pin(core_service, cpus[0])
        pin(raw_service, cpus[1])
    try:
        with Sampler(core_service, raw_service) as sampler:
            core_result, raw_result = run_wrks(
                [f"http://127.0.0.1:{core_port}{path}", f"http://127.0.0.1:{raw_port}{path}"],
                connections=ctx.plan.rest_connections,
                duration_s=ctx.plan.rest_duration_s,
            )
    finally:
        if cpus is not None:
            everything = usable_cpus()
            pin(core_service, everything)
            pin(raw_service, everything)
    _warn_errors(ctx, core_service, core_result)
    _warn_errors(ctx, raw_service, raw_result)
    return {
        "core": _figures(core_result, sampler, core_service, raw_service),
        "raw_asgi": _figures(raw_result, sampler, raw_service, core_service),
        "core_cpus": list(cpus[0]) if cpus else None,
        "raw_cpus": list(cpus[1]) if cpus else None,
        "ratio": _ratio(core_result.requests_per_s, raw_result.requests_per_s),
    }


def _warn_errors(ctx: Context, service: Service, result: WrkResult) -> None:
    if result.non_2xx or result.socket_errors:
        ctx.log(
            f"  ! {service.name}: {result.non_2xx} non-2xx responses, "
            f"{result.socket_errors} socket errors"
        )


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _measure_path(
    ctx: Context, path: str, servers: dict[str, tuple[Service, int]]
) -> dict[str, object]:
    plan = ctx.plan
    names = list(servers)
    if plan.rest_warmup_s:
        for _, port in servers.values():
            run_wrk(
                f"http://127.0.0.1:{port}{path}",
                connections=plan.rest_connections,
                duration_s=plan.rest_warmup_s,
            )
    solo: dict[str, list[Figures]] = {name: [] for name in names}
    for number in range(plan.rest_rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        for name, figures in _solo_round(ctx, path, servers, order).items():
            solo[name].append(figures)
    rps = {name: [float(f["requests_per_s"]) for f in runs] for name, runs in solo.items()}
    ctx.log(
        f"  GET {path} solo, req/s per round: "
        + "; ".join(f"{name} {', '.join(f'{r:,.0f}' for r in rs)}" for name, rs in rps.items())
    )

    cpus = usable_cpus()
    pinned = len(cpus) >= 2 and hasattr(os, "sched_setaffinity")
    paired = []
    for number in range(plan.rest_pairs):
        first, second = ([cpus[0]], [cpus[1]]) if number % 2 == 0 else ([cpus[1]], [cpus[0]])
        paired.append(
            _paired_round(
                ctx, path, servers[CORE], servers[RAW], (first, second) if pinned else None
            )
        )
    ratios = [p["ratio"] for p in paired if isinstance(p["ratio"], float)]
    ctx.log(
        f"  GET {path} paired, Core ÷ raw per round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + ("" if pinned else " (not pinned: fewer than 2 CPUs)")
    )
    multi_ratios = [
        r for m, c in zip(rps[MULTI], rps[CORE], strict=True) if (r := _ratio(m, c)) is not None
    ]
    return {
        "solo": solo,
        "paired": paired,
        "pinned": pinned,
        "median_rps": {name: statistics.median(rs) for name, rs in rps.items()},
        "core_vs_raw": statistics.median(ratios) if ratios else None,
        "multi_vs_core": statistics.median(multi_ratios) if multi_ratios else None,
        "multi_vs_core_rounds": multi_ratios,
    }


def run(ctx: Context) -> Part:
    require_wrk()
    workers = ctx.plan.rest_workers
    ctx.log(
        f"REST: Core, raw ASGI on hypercorn (Trio), Core on {workers} workers; "
        f"{ctx.plan.rest_rounds} solo and {ctx.plan.rest_pairs} paired rounds "
        f"of {ctx.plan.rest_duration_s}s per path"
    )
    data: dict[str, Any] = {
        "connections": ctx.plan.rest_connections,
        "duration_s": ctx.plan.rest_duration_s,
        "workers": workers,
    }
    ft, ft_port = start_ft(1.0)
    with ft, tempfile.TemporaryDirectory(prefix="quotopia-bench-") as tmp, ExitStack() as peers:
        ft_ready(ft, ft_port, ctx.pb, 30)
        core, port = peers.enter_context(_started(start_core(ft_port)))
        core_ready(core, port, 30)
        bodies = {path: http_get(port, path)[1].decode() for path in PATHS}
        bodies_file = Path(tmp) / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        servers = {
            CORE: (core, port),
            RAW: _peer(peers, "raw-asgi", "asgi", bodies_file, "raw ASGI"),
            FASTAPI: _peer(peers, "fastapi", "fastapi", bodies_file, "peer FastAPI"),
        }
        multi, multi_port = peers.enter_context(_started(start_core(ft_port, workers=workers)))
        core_ready(multi, multi_port, 30, probes=4 * workers)
        servers[MULTI] = (multi, multi_port)
        if (folder := gofanout.go_seed(ctx)) is not None:
            _go_ft, go_ft_port = peers.enter_context(_started(gofanout.start_go_ft(folder, 1.0)))
            go_core, go_port = peers.enter_context(
                _started(gofanout.start_go_core(folder, go_ft_port))
            )
            core_ready(go_core, go_port, 30)  # the Go Core answers the same /quotes/BTC
            servers[GO_CORE] = (go_core, go_port)
        data["paths"] = {path: _measure_path(ctx, path, servers) for path in PATHS}
        data["bodies"] = bodies
    return Part("rest", _rows(data), data)


@contextmanager
def _started(started: tuple[Service, int]) -> Iterator[tuple[Service, int]]:
    """A started service and its port, stopped when the block ends."""
    with started[0]:
        yield started


def _peer(
    stack: ExitStack, name: str, command: str, bodies: Path, says: str
) -> tuple[Service, int]:
    """Start a peer of :mod:`.peers` serving ``bodies``; return it and its port."""
    argv = [sys.executable, "-m", "scripts.bench.peers", command, f"--bodies={bodies}"]
    service = stack.enter_context(Service(name, argv))
    ready = service.wait_line(rf"{says} listening on http://127\.0\.0\.1:(\d+)", 30)
    return service, int(ready[1])


def core_peak_rss(data: dict[str, Any]) -> int | None:
    """Core's (one worker's) highest RSS under wrk in this part's solo runs."""
    peaks = [
        int(figures["server_peak_rss"])
        for found in data.get("paths", {}).values()
        for figures in found["solo"][CORE]
    ]
    return max(peaks, default=None)


def _median_run(runs: list[Figures]) -> Figures:
    """The run whose req/s is the median (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda f: float(f["requests_per_s"]))
    return ordered[(len(ordered) - 1) // 2]


def _spread(values: Sequence[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if low == high else f"{low:{fmt}}-{high:{fmt}}"


def _rows(data: dict[str, Any]) -> list[Row]:
    paths = data["paths"]
    workers = data["workers"]
    rows = []
    for path, found in paths.items():
        solo = found["solo"]
        core, raw, multi = (_median_run(solo[name]) for name in (CORE, RAW, MULTI))
        rounds = len(solo[CORE])
        rps = {name: [f["requests_per_s"] for f in runs] for name, runs in solo.items()}
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: req/s (64 conns)",
                rate(core["requests_per_s"]),
                f"raw ASGI: {rate(raw['requests_per_s'])}",
                f"median of {rounds} solo runs of {data['duration_s']}s "
                f"(Core {_spread(rps[CORE], ',.0f')}, raw {_spread(rps[RAW], ',.0f')}); "
                f"wrk CPU {pct(core['client_cpu_pct'])}; "
                f"other processes {pct(core['others_cpu_pct'])} / {pct(raw['others_cpu_pct'])}",
            )
        )
        paired = found["paired"]
        ratios = [p["ratio"] for p in paired if p["ratio"] is not None]
        share = found["core_vs_raw"]
        how = "each on a CPU of its own, swapped each round" if found["pinned"] else "unpinned"
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: Core ÷ raw ASGI, paired",
                "-" if share is None else f"{share:.2f}x",
                "the ceiling: 1.00x",
                f"median of {len(ratios)} rounds, both under wrk at once, {how}; "
                f"per round {_spread(ratios, '.2f') if ratios else '-'}; server CPU: Core "
                f"{pct(statistics.median(p['core']['server_cpu_pct'] for p in paired))}, raw "
                f"{pct(statistics.median(p['raw_asgi']['server_cpu_pct'] for p in paired))}",
            )
        )
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: p50 / p99",
                f"{ms(core['latency_p50_s'])} / {ms(core['latency_p99_s'])}",
                f"raw ASGI: {ms(raw['latency_p50_s'])} / {ms(raw['latency_p99_s'])}",
                f"the median solo runs; server CPU: Core {pct(core['server_cpu_pct'])}, "
                f"raw {pct(raw['server_cpu_pct'])}",
            )
        )
        peers = [(label, name) for label, name in PEERS if name in solo]
        if peers:
            picked = {name: _median_run(solo[name]) for _, name in peers}
            rows.append(
                Row(
                    "1 REST",
                    f"GET {path}: req/s; p50 / p99, beside what users pick instead",
                    f"{rate(core['requests_per_s'])}; "
                    f"{ms(core['latency_p50_s'])} / {ms(core['latency_p99_s'])}",
                    "; ".join(
                        f"{label}: {rate(picked[name]['requests_per_s'])}, "
                        f"{ms(picked[name]['latency_p50_s'])} / {ms(picked[name]['latency_p99_s'])}"
                        for label, name in peers
                    ),
                    "the median solo runs; server CPU: Core "
                    f"{pct(core['server_cpu_pct'])}, "
                    + ", ".join(
                        f"{label} {pct(picked[name]['server_cpu_pct'])}" for label, name in peers
                    )
                    + "; Core ÷ "
                    + ", ".join(
                        f"{label} {core['requests_per_s'] / picked[name]['requests_per_s']:.2f}x"
                        for label, name in peers
                        if picked[name]["requests_per_s"]
                    ),
                )
            )
        multi_ratio = found["multi_vs_core"]
        per_round = found["multi_vs_core_rounds"]
        rows.append(
            Row(
                "1 REST",
                f"GET {path}: req/s, {workers} workers",
                f"{rate(multi['requests_per_s'])} ({ms(multi['latency_p50_s'])} / "
                f"{ms(multi['latency_p99_s'])})",
                f"1 worker: {rate(core['requests_per_s'])}",
                f"{workers} workers ÷ 1: "
                f"{'-' if multi_ratio is None else f'{multi_ratio:.2f}x'} (median of rounds; "
                f"per round {_spread(per_round, '.2f') if per_round else '-'}); "
                f"quotopia core --workers {workers}; server CPU {pct(multi['server_cpu_pct'])}, "
                f"wrk CPU {pct(multi['client_cpu_pct'])}; "
                f"other processes {pct(multi['others_cpu_pct'])}",
            )
        )
    return rows
