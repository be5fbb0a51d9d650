"""Part 9: FT beside the Go original, under grpc-go's own load client.

The fan-out and throughput parts measure FT with grpcio clients (C-core). This
part measures it the way the Go original measured itself: with ``fanout-load``,
the Go original's grpc-go load client (one TCP connection per stream; it sends
window updates and BDP pings as data arrives, as every grpc-go client does), and
beside the Go original's own FT in the same run, plus the grpcio.aio peer FT.

It needs the rebuild of the Go original (``../shared/anchors/go-seed``: its
``build.sh`` puts ``ft``, ``core`` and ``fanout-load`` in one folder, by default
``/tmp/quotopia-go-seed/bin``). Point the bench at that folder with ``--go-seed
DIR`` or ``QUOTOPIA_GO_SEED=DIR``; without it this part says so in one row and
measures nothing.

Cases, each feed fresh for each:

- fan-out on the 1 s tick at each of ``go_fanout_sizes``: every tick delivered?
  FT's CPU and RSS, and the CPU ratio to the Go FT;
- throughput on the 10 ms tick at each of ``go_curve_sizes``: delivered quotes/s
  (3 symbols, 100 ticks/s, N streams: 300 N expected), and whether a feed collapses past its
  saturation (delivered/s dropping below 0.9 of its best at a smaller N).

Memory per subscriber is the RSS slope between the two largest fan-out sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fanout import measure_feed, start_peer_ft
from .plan import Context
from .procs import BenchError, Service, ft_ready, start_ft
from .report import Part, Row, pct, rate

__all__ = ["GO_SEED_ENV", "go_seed", "run", "start_go_core", "start_go_ft"]

GO_SEED_ENV = "QUOTOPIA_GO_SEED"
BINARIES = ("ft", "core", "fanout-load")
#: A feed collapses when its delivered rate falls below this share of its best so far.
NO_COLLAPSE = 0.9
FEEDS = ("quotopia", "go", "grpcio_peer")
#: The load clients, each against every feed: the Go original's (grpc-go, one
#: connection per stream) and the fan-out part's (grpcio's C-core, several processes).
CLIENTS = ("grpc-go", "grpcio")
#: The feeds each client is run against. The grpcio load checks every quote's
#: generation time and sequence, which the Go original's Quote does not carry.
FEEDS_OF = {"grpc-go": FEEDS, "grpcio": ("quotopia", "grpcio_peer")}
GO_UNMEASURED = "not measured (its Quote has no time or sequence for the grpcio load)"

#: One fanout-load report (its ``-json`` line).
Result = dict[str, Any]


def go_seed(ctx: Context) -> Path | None:
    """The folder of the Go original's binaries, if the bench was pointed at one."""
    where = ctx.plan.go_seed or os.environ.get(GO_SEED_ENV)
    if not where:
        return None
    folder = Path(where)
    missing = [name for name in BINARIES if not (folder / name).is_file()]
    if missing:
        raise BenchError(f"--go-seed {folder}: no {', '.join(missing)} there (run build.sh)")
    return folder


def start_go_ft(folder: Path, tick: float) -> tuple[Service, int]:
    """The Go original's FT on 127.0.0.1 and a free port; return it and its port."""
    env = {"FT_LISTEN": "127.0.0.1:0", "TICK_MS": str(round(tick * 1000))}
    ft = Service("go-ft", [str(folder / "ft")], env=env)
    try:
        return ft, ft.listening_port(30)
    except BaseException:
        ft.stop()
        raise


def start_go_core(folder: Path, ft_port: int) -> tuple[Service, int]:
    """The Go original's Core (Gin, release mode), fed by the FT on ``ft_port``."""
    env = {
        "FT_ADDR": f"127.0.0.1:{ft_port}",
        "HTTP_ADDR": "127.0.0.1:0",
        "GIN_MODE": "release",
    }
    core = Service("go-core", [str(folder / "core")], env=env)
    try:
        return core, core.listening_port(30)
    except BaseException:
        core.stop()
        raise


def _load(folder: Path, port: int, pid: int, n: int, tick: float, window_s: float) -> Result:
    argv = [
        str(folder / "fanout-load"),
        f"-addr=127.0.0.1:{port}",
        f"-n={n}",
        f"-tick-ms={round(tick * 1000)}",
        f"-window={window_s:g}s",
        f"-pid={pid}",
        "-json",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=window_s + 120, check=False)
    if done.returncode != 0:
        raise BenchError(f"fanout-load exited {done.returncode}: {done.stderr.strip()[-300:]}")
    result: Result = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _measure(
    ctx: Context, folder: Path, client: str, feed: str, n: int, tick: float, window_s: float
) -> Result:
    """One feed, fresh, under ``n`` streams of ``client`` (``grpc-go`` or ``grpcio``)."""
    starts: dict[str, Callable[[], tuple[Service, int]]] = {
        "quotopia": lambda: start_ft(tick),
        "go": lambda: start_go_ft(folder, tick),
        "grpcio_peer": lambda: start_peer_ft(ctx, tick),
    }
    service, port = starts[feed]()
    with service:
        ft_ready(service, port, ctx.pb, 30)
        if client == "grpc-go":
            result = _load(folder, port, service.pid, n, tick, window_s)
        else:
            result = _grpcio_load(ctx, service, port, n, tick, window_s)
    ctx.log(
        f"  {client} on {feed}, N={n:,}, tick {tick:g}s: {rate(result['msgs_per_sec'])} of "
        f"{rate(result['expected_msgs_per_sec'])}, "
        f"every tick {result['all_subscribers_every_tick']}, "
        f"CPU {pct(result['server_cpu_pct'])}, RSS {result['server_rss_mb']:.0f} MB, "
        f"load CPU {pct(result['client_cpu_pct'])}"
    )
    return result


def _grpcio_load(
    ctx: Context, service: Service, port: int, n: int, tick: float, window_s: float
) -> Result:
    """The fan-out part's grpcio load (:mod:`.loadclient`), reported as fanout-load reports."""
    found = measure_feed(
        ctx, service, port, n, tick=tick, warmup_s=2.0, window_s=window_s, client="grpcio"
    )
    return {
        "msgs_per_sec": found["delivered_per_s"],
        "expected_msgs_per_sec": found["nominal_per_s"],
        "all_subscribers_every_tick": found["every_tick_everywhere"],
        "keeps_up": found["every_tick_everywhere"],
        "server_cpu_pct": found["feed_cpu_pct"],
        "server_rss_mb": float(found["feed_peak_rss"]) / 2**20,  # type: ignore[arg-type]
        "client_cpu_pct": found["client_cpu_pct"],
        "latency_p99_s": found["latency_p99_s"],
        "client_processes": found["client_processes"],
    }


def run(ctx: Context) -> Part:
    folder = go_seed(ctx)
    if folder is None:
        why = f"no Go original to compare with: pass --go-seed DIR or set {GO_SEED_ENV}"
        ctx.log(f"go: skipped ({why})")
        return Part("go", [Row("9 vs Go", "FT under grpc-go's client", "skipped", "", why)], {})
    plan = ctx.plan
    ctx.log(
        f"go: {' and '.join(CLIENTS)} clients on {', '.join(FEEDS)}; 1 s tick at "
        f"{', '.join(f'{n:,}' for n in plan.go_fanout_sizes)}; {plan.go_curve_tick_s:g}s tick at "
        f"{', '.join(f'{n:,}' for n in plan.go_curve_sizes)}"
    )
    data: dict[str, Any] = {"folder": str(folder)}
    rows: list[Row] = []
    for client in CLIENTS:
        feeds = FEEDS_OF[client]
        fanout: dict[str, dict[str, Result]] = {feed: {} for feed in feeds}
        curve: dict[str, dict[str, Result]] = {feed: {} for feed in feeds}
        for n in plan.go_fanout_sizes:
            for feed in feeds:
                fanout[feed][str(n)] = _measure(ctx, folder, client, feed, n, 1.0, plan.go_window_s)
        for n in plan.go_curve_sizes:
            for feed in feeds:
                curve[feed][str(n)] = _measure(
                    ctx, folder, client, feed, n, plan.go_curve_tick_s, plan.go_window_s
                )
        found: dict[str, Any] = {"fanout": fanout, "curve": curve}
        found["collapse"] = {feed: _worst_drop(curve[feed]) for feed in feeds}
        found["kb_per_subscriber"] = {feed: _kb_per_subscriber(fanout[feed]) for feed in feeds}
        data[client] = found
        rows += _rows(client, found, plan.go_curve_tick_s)
    return Part("go", rows, data)


def _worst_drop(steps: dict[str, Result]) -> float | None:
    """The lowest delivered/s at any N as a share of the best at a smaller N."""
    best = 0.0
    worst: float | None = None
    for n in sorted(steps, key=int):
        delivered = float(steps[n]["msgs_per_sec"])
        if best:
            worst = min(delivered / best, worst if worst is not None else 1.0)
        best = max(best, delivered)
    return worst


def _kb_per_subscriber(sizes: dict[str, Result]) -> float | None:
    if len(sizes) < 2:
        return None
    small, large = sorted(sizes, key=int)[-2:]
    grown = float(sizes[large]["server_rss_mb"]) - float(sizes[small]["server_rss_mb"])
    return 1024 * grown / (int(large) - int(small))


def _rows(client: str, data: dict[str, Any], curve_tick: float) -> list[Row]:
    fanout: dict[str, dict[str, Result]] = data["fanout"]
    curve: dict[str, dict[str, Result]] = data["curve"]
    collapse: dict[str, float | None] = data["collapse"]
    per_sub: dict[str, float | None] = data["kb_per_subscriber"]
    measured_go = "go" in fanout
    rows = []

    def every(r: Result) -> str:
        return "every tick" if r["all_subscribers_every_tick"] else "NOT every tick"

    def go_figure(text: Callable[[], str]) -> str:
        return text() if measured_go else f"Go FT: {GO_UNMEASURED}"

    for n in fanout["quotopia"]:
        ours, peer = fanout["quotopia"][n], fanout["grpcio_peer"][n]
        notes = f"grpcio.aio peer {pct(peer['server_cpu_pct'])}, {every(peer)}; "
        notes += f"load CPU {pct(ours['client_cpu_pct'])}"
        baseline = f"Go FT: {GO_UNMEASURED}"
        if measured_go:
            go = fanout["go"][n]
            ratio = float(ours["server_cpu_pct"]) / max(float(go["server_cpu_pct"]), 0.1)
            notes = f"FT ÷ Go FT CPU {ratio:.2f}x; {notes} (on Go FT: {pct(go['client_cpu_pct'])})"
            baseline = (
                f"Go FT: {pct(go['server_cpu_pct'])}, {every(go)}; {go['server_rss_mb']:.0f} MB"
            )
        rows.append(
            Row(
                "9 vs Go",
                f"{client} clients, N={int(n):,}, 1 s tick: FT CPU; RSS",
                f"{pct(ours['server_cpu_pct'])}, {every(ours)}; {ours['server_rss_mb']:.0f} MB",
                baseline,
                notes,
            )
        )
    for n in curve["quotopia"]:
        ours, peer = curve["quotopia"][n], curve["grpcio_peer"][n]
        notes = f"grpcio.aio peer {rate(peer['msgs_per_sec'])}; kept up: FT {ours['keeps_up']}, "
        notes += f"peer {peer['keeps_up']}"
        baseline = f"Go FT: {GO_UNMEASURED}"
        if measured_go:
            go = curve["go"][n]
            of_go = float(ours["msgs_per_sec"]) / max(float(go["msgs_per_sec"]), 1.0)
            notes = f"FT ÷ Go FT {of_go:.2f}x; {notes}, Go FT {go['keeps_up']}"
            baseline = f"Go FT: {rate(go['msgs_per_sec'])}, CPU {pct(go['server_cpu_pct'])}"
        rows.append(
            Row(
                "9 vs Go",
                f"{client} clients, N={int(n):,}, {curve_tick * 1000:g} ms tick: delivered/s (of "
                f"{rate(ours['expected_msgs_per_sec'])})",
                f"{rate(ours['msgs_per_sec'])}, CPU {pct(ours['server_cpu_pct'])}",
                baseline,
                notes,
            )
        )

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def kb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} KB"

    rows.append(
        Row(
            "9 vs Go",
            f"{client} clients, {curve_tick * 1000:g} ms tick: "
            "worst delivered/s ÷ best at a smaller N",
            share(collapse["quotopia"]),
            go_figure(lambda: f"Go FT: {share(collapse['go'])}"),
            f"no collapse means ≥ {NO_COLLAPSE}x; grpcio.aio peer {share(collapse['grpcio_peer'])}",
        )
    )
    rows.append(
        Row(
            "9 vs Go",
            f"{client} clients: memory per subscriber (RSS slope, 1 s tick)",
            kb(per_sub["quotopia"]),
            go_figure(lambda: f"Go FT: {kb(per_sub['go'])}"),
            f"grpcio.aio peer {kb(per_sub['grpcio_peer'])}",
        )
    )
    return rows
