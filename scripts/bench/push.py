"""6. Push: N event-stream and N WebSocket clients on one Core at FT's 1 s tick,
beside a FastAPI + sse-starlette peer on uvicorn streaming the same events to N
event-stream clients, in the same run.

For each, over one window: the share of ticks that reached every client, the
latency from a quote's generation at FT to its receipt, the server's CPU and
RSS (and what each connected client adds to it), and the load's own CPU, so a
reader can tell whether the load was the limit. The clients are the lean readers
of :mod:`.pushwire`, in :attr:`~.plan.Plan.load_processes` processes.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .fanout import SYMBOLS
from .loadclient import Subscribers
from .plan import Context
from .procs import (
    Sampler,
    Service,
    core_ready,
    http_get,
    others_cpu_pct,
    start_core,
    start_ft,
)
from .report import Part, Row, mib, ms, pct

__all__ = ["run"]

#: What is measured, in order: (name, label, protocol).
TARGETS = (
    ("core_sse", "Core SSE", "sse"),
    ("core_ws", "Core WebSocket", "ws"),
    ("peer_sse", "FastAPI+sse-starlette SSE", "sse"),
)


@contextmanager
def sse_peer(ctx: Context, ft_port: int) -> Iterator[tuple[Service, int]]:
    """The FastAPI + sse-starlette peer (:mod:`.peers`), fed by the FT on ``ft_port``."""
    peer = Service(
        "sse-peer",
        [
            sys.executable,
            "-m",
            "scripts.bench.peers",
            "sse",
            f"--ft-addr=127.0.0.1:{ft_port}",
            f"--proto-dir={ctx.proto_dir}",
        ],
    )
    with peer:
        found = peer.wait_line(r"peer SSE listening on http://127\.0\.0\.1:(\d+)", 30)
        yield peer, int(found[1])


def _measure(
    ctx: Context, server: Service, port: int, kind: str, clients: int, feed: Service
) -> dict[str, object]:
    plan = ctx.plan
    rss_idle = server.rss()
    with Subscribers(
        f"127.0.0.1:{port}",
        clients,
        processes=plan.load_processes,
        per_connection=1,
        client=kind,
        proto_dir=ctx.proto_dir,
    ) as subs:
        connect_s, problem = subs.wait_ready(plan.connect_timeout_s)
        if problem:
            ctx.log(f"  ! {problem}; measuring the clients that started")
        rss_connected = server.rss()
        t0 = time.time() + plan.push_warmup_s
        t1 = t0 + plan.push_window_s
        subs.begin(t0, t1, plan.grace_s)
        time.sleep(max(0.0, t0 - time.time()))
        with Sampler(server, feed) as sampler:
            time.sleep(max(0.0, t1 - time.time()))
        sample = subs.collect(SYMBOLS)
    result = sample.to_json()
    connected = max(1, sample.connected)
    result.update(
        {
            "protocol": kind,
            "connect_s": connect_s,
            "connect_problem": problem,
            "server_cpu_pct": sampler.cpu_pct(server),
            "server_rss_idle": rss_idle,
            "server_rss_connected": rss_connected,
            "server_peak_rss": sampler.peak_rss(server),
            "server_bytes_per_client": max(0, rss_connected - rss_idle) / connected,
            "ft_cpu_pct": sampler.cpu_pct(feed),
            "machine_busy_pct": sampler.machine_busy_pct,
            "others_cpu_pct": others_cpu_pct(
                sampler.machine_busy_pct,
                sampler.cpu_pct(server),
                sampler.cpu_pct(feed),
                100 * sample.client_cpu_s / plan.push_window_s,
            ),
        }
    )
    return result


def _closed_slow(port: int) -> int:
    """Core's count of event streams closed as slow, from its /metrics."""
    _, body = http_get(port, "/metrics")
    found = re.search(
        rb'^quotopia_core_push_closed_total\{kind="sse",reason="slow"\} (\S+)$', body, re.M
    )
    return int(float(found[1])) if found else 0


def _stalled(ctx: Context, clients: int) -> dict[str, object]:
    """``clients`` event streams that stop reading once subscribed, FT at a 10 ms
    tick (300 quotes a second each): Core's RSS until it has cut them all (the lag
    limit is 10 s), and how long that took."""
    plan = ctx.plan
    ft, ft_port = start_ft(0.01)
    with ft:
        core, port = start_core(ft_port)
        with core:
            core_ready(core, port, 30)
            rss_idle = core.rss()
            with Subscribers(
                f"127.0.0.1:{port}",
                clients,
                processes=plan.load_processes,
                per_connection=1,
                client="sse",
                proto_dir=ctx.proto_dir,
                stall=True,
            ) as subs:
                connect_s, problem = subs.wait_ready(plan.connect_timeout_s)
                rss_connected = core.rss()
                began = time.monotonic()
                peak = rss_connected
                cut = _closed_slow(port)
                while cut < clients and time.monotonic() - began < 60:
                    time.sleep(0.5)
                    peak = max(peak, core.rss())
                    cut = _closed_slow(port)
                took = time.monotonic() - began
                rss_after = core.rss()
    return {
        "clients": clients,
        "tick_s": 0.01,
        "connect_s": connect_s,
        "connect_problem": problem,
        "rss_idle": rss_idle,
        "rss_connected": rss_connected,
        "rss_peak_while_stalled": peak,
        "rss_after_cut": rss_after,
        "closed_slow": cut,
        "all_cut_after_s": took,
    }


def _settle(port: int, core: bool, timeout: float = 30.0) -> None:
    """Wait until the server has let go of the last run's connections."""
    if not core:
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = http_get(port, "/system")
        if b'"push_connections": 0' in body:
            return
        time.sleep(0.2)


def run(ctx: Context) -> Part:
    plan = ctx.plan
    ctx.log(f"push: N = {', '.join(f'{n:,}' for n in plan.push_sizes)} at the 1 s tick")
    results: dict[str, dict[str, object]] = {}
    ft, ft_port = start_ft(plan.fanout_tick_s)
    with ft:
        core, core_port = start_core(ft_port)
        with core, sse_peer(ctx, ft_port) as (peer, peer_port):
            core_ready(core, core_port, 30)
            servers = {"core_sse": (core, core_port), "core_ws": (core, core_port)}
            servers["peer_sse"] = (peer, peer_port)
            for n in plan.push_sizes:
                for name, label, kind in TARGETS:
                    server, port = servers[name]
                    _settle(port, name.startswith("core"))
                    result = _measure(ctx, server, port, kind, n, ft)
                    results[f"{name}/{n}"] = result
                    ctx.log(f"  N={n:,} {label}: {_summary(result)}")
    stalled = _stalled(ctx, plan.push_stalled)
    ctx.log(
        f"  {stalled['clients']:,} stalled streams: {stalled['closed_slow']:,} cut in "
        f"{_f(stalled['all_cut_after_s']):.1f}s; RSS {mib(_f(stalled['rss_connected']))} "
        f"connected, {mib(_f(stalled['rss_peak_while_stalled']))} at most meanwhile"
    )
    rows = [
        _row(name, label, n, results[f"{name}/{n}"], results.get(f"peer_sse/{n}"))
        for n in plan.push_sizes
        for name, label, _ in TARGETS
    ]
    rows.append(
        Row(
            "6 push",
            f"{stalled['clients']:,} event streams that stop reading (10 ms tick)",
            f"RSS {mib(_f(stalled['rss_connected']))} connected, "
            f"{mib(_f(stalled['rss_peak_while_stalled']))} at most while stalled",
            f"idle: {mib(_f(stalled['rss_idle']))}",
            f"{stalled['closed_slow']:,} cut as slow within {_f(stalled['all_cut_after_s']):.1f}s "
            f"(lag limit 10 s); RSS after: {mib(_f(stalled['rss_after_cut']))}",
        )
    )
    results["stalled_sse"] = stalled
    data: dict[str, object] = {
        "tick_s": plan.fanout_tick_s,
        "window_s": plan.push_window_s,
        "runs": results,
    }
    return Part("push", rows, data)


def _f(value: object) -> float:
    return 0.0 if value is None else float(value)  # type: ignore[arg-type]


def _summary(r: dict[str, object]) -> str:
    return (
        f"{r['ticks_to_all']}/{r['ticks']} ticks to all, p50 {ms(_f(r['latency_p50_s']))}, "
        f"p99 {ms(_f(r['latency_p99_s']))}, server CPU {pct(_f(r['server_cpu_pct']))}, "
        f"RSS {mib(_f(r['server_peak_rss']))}, load CPU {pct(_f(r['client_cpu_pct']))}"
    )


def _row(
    name: str, label: str, n: int, r: dict[str, object], peer: dict[str, object] | None
) -> Row:
    trouble = ""
    if r["errors"]:
        trouble += f"; errors {r['errors']}"
    if r["connected"] != n:
        trouble += f"; only {r['connected']:,} of {n:,} connected in {_f(r['connect_s']):.0f}s"
    compared = ""
    if peer is not None and name != "peer_sse":
        compared = f"peer SSE: CPU {pct(_f(peer['server_cpu_pct']))}"
    return Row(
        "6 push",
        f"N={n:,} {label}: ticks to all; p50 / p99",
        f"{100 * _f(r['fraction_to_all']):.0f}% ({r['ticks_to_all']}/{r['ticks']}); "
        f"{ms(_f(r['latency_p50_s']))} / {ms(_f(r['latency_p99_s']))}",
        compared,
        f"server CPU {pct(_f(r['server_cpu_pct']))}, RSS {mib(_f(r['server_peak_rss']))} "
        f"({_f(r['server_bytes_per_client']) / 1024:.1f} KiB/client); "
        f"FT CPU {pct(_f(r['ft_cpu_pct']))}; load CPU {pct(_f(r['client_cpu_pct']))} "
        f"({r['client_processes']} procs); gaps {r['gaps']}{trouble}",
    )
