"""Parts 2 and 3: FT's fan-out at the 1 s tick, and its maximum throughput.

Fan-out: N concurrent ``StreamQuotes`` subscribers on a fresh FT at the 1 s tick.
After every stream got its first quote and a warm-up, a fixed window: which ticks
generated in it reached every subscriber (within a grace period after it), the
latency from generation (``Quote.time``) to receipt, FT's CPU and peak RSS, and the
load processes' own CPU.

Throughput: a fixed number of subscribers, and a shorter tick at every step, on
FT and on the grpcio.aio peer (:mod:`.peers`). A step passes when every tick the
feed generated in the window reached every subscriber, with no gap in any
sequence: the subscribers kept up. The result is the highest delivered quotes/s
of a passing step. A feed whose event loop is saturated makes fewer ticks than
its schedule asks (it skips a tick rather than burst), so its delivered rate
levels off: the steps stop at the first failure, or once a feed makes fewer than
half of its ticks. The share of ticks made ("on time") is reported with each step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from quotopia.market import DEFAULT_SYMBOLS

from .loadclient import Subscribers
from .plan import Context
from .procs import Sampler, Service, ft_ready, others_cpu_pct, scraping, start_ft
from .report import Part, Row, mib, ms, pct, rate

__all__ = ["SYMBOLS", "measure_feed", "run_fanout", "run_throughput", "start_peer_ft"]

#: Symbols every feed in the bench streams (FT's default instruments).
SYMBOLS = len(DEFAULT_SYMBOLS.split(","))

#: Below this share of its nominal ticks, a feed is saturated: shorter ticks add nothing.
SATURATED = 0.5
#: In the fan-out part, a feed making fewer ticks than this is flagged as behind.
ON_SCHEDULE = 0.9


def start_peer_ft(ctx: Context, tick: float) -> tuple[Service, int]:
    """Start the grpcio.aio peer of FT (:mod:`.peers`); return it and its port."""
    peer = Service(
        "grpcio-peer",
        [
            sys.executable,
            "-m",
            "scripts.bench.peers",
            "ft",
            f"--proto-dir={ctx.proto_dir}",
            f"--tick-interval={tick!r}",
        ],
    )
    try:
        found = peer.wait_line(r"peer FT listening on 127\.0\.0\.1:(\d+)", 30)
    except BaseException:
        peer.stop()
        raise
    return peer, int(found[1])


def measure_feed(
    ctx: Context,
    feed: Service,
    port: int,
    subscribers: int,
    *,
    tick: float,
    warmup_s: float,
    window_s: float,
    client: str | None = None,
) -> dict[str, object]:
    """Hold ``subscribers`` streams of ``client`` (default: the plan's) on a ready
    feed; measure one window."""
    plan = ctx.plan
    client = client or plan.load_client
    ft_ready(feed, port, ctx.pb, 30)
    with Subscribers(
        f"127.0.0.1:{port}",
        subscribers,
        processes=plan.load_processes,
        per_connection=plan.streams_per_connection,
        client=client,
        proto_dir=ctx.proto_dir,
    ) as subs:
        connect_s, problem = subs.wait_ready(plan.connect_timeout_s)
        if problem:
            ctx.log(f"  ! {problem}; measuring the streams that started")
        rss_connected = feed.rss()
        t0 = time.time() + warmup_s
        t1 = t0 + window_s
        subs.begin(t0, t1, plan.grace_s)
        time.sleep(max(0.0, t0 - time.time()))
        with Sampler(feed) as sampler:
            time.sleep(max(0.0, t1 - time.time()))
        sample = subs.collect(SYMBOLS)
    result = sample.to_json()
    nominal_ticks = window_s / tick
    result.update(
        {
            "tick_s": tick,
            "load_client": client,
            "connect_s": connect_s,
            "connect_problem": problem,
            "nominal_per_s": subscribers * SYMBOLS / tick,
            "on_schedule": sample.ticks / nominal_ticks,
            "every_tick_everywhere": sample.every_tick_everywhere,
            "feed_cpu_pct": sampler.cpu_pct(feed),
            "feed_rss_connected": rss_connected,
            "feed_peak_rss": sampler.peak_rss(feed),
            "machine_busy_pct": sampler.machine_busy_pct,
            "others_cpu_pct": others_cpu_pct(
                sampler.machine_busy_pct,
                sampler.cpu_pct(feed),
                100 * sample.client_cpu_s / window_s,
            ),
        }
    )
    return result


def run_fanout(ctx: Context) -> Part:
    plan = ctx.plan
    ctx.log(f"fan-out: N = {', '.join(f'{n:,}' for n in plan.fanout_sizes)} at the 1 s tick")
    results: dict[str, dict[str, object]] = {}
    for n in plan.fanout_sizes:
        ft, port = start_ft(plan.fanout_tick_s)
        with ft, scraping(ft.metrics_port):
            result = measure_feed(
                ctx,
                ft,
                port,
                n,
                tick=plan.fanout_tick_s,
                warmup_s=plan.fanout_warmup_s,
                window_s=plan.fanout_window_s,
            )
        results[str(n)] = result
        ctx.log(f"  N={n:,}: {_summary(result)}")
    rows = [_fanout_row(int(n), r) for n, r in results.items()]
    data: dict[str, object] = {
        "tick_s": plan.fanout_tick_s,
        "window_s": plan.fanout_window_s,
        "load_client": plan.load_client,
        "streams_per_connection": plan.streams_per_connection,
        "sizes": results,
    }
    return Part("fanout", rows, data)


def _summary(r: dict[str, object]) -> str:
    return (
        f"{r['ticks_to_all']}/{r['ticks']} ticks to all, gaps {r['gaps']}, "
        f"p50 {ms(_f(r['latency_p50_s']))}, p99 {ms(_f(r['latency_p99_s']))}, "
        f"{rate(_f(r['delivered_per_s']))} delivered, feed CPU {pct(_f(r['feed_cpu_pct']))}, "
        f"load CPU {pct(_f(r['client_cpu_pct']))}"
    )


def _f(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _client(r: dict[str, object]) -> str:
    """The load client, as the table names it: a real one, or the bench's own reader."""
    if r.get("load_client") == "wire":
        return "the lean wire reader, not a real gRPC client"
    return f"{r.get('load_client')} clients"


def _fanout_row(n: int, r: dict[str, object]) -> Row:
    fraction = 100 * _f(r["fraction_to_all"])  # type: ignore[operator]
    errors = r["errors"]
    trouble = f"; errors {errors}" if errors else ""
    on_time = _f(r["on_schedule"]) or 0.0
    if on_time < ON_SCHEDULE:
        trouble += f"; FT made only {100 * on_time:.0f}% of its ticks"
    if r["connected"] != n:
        trouble += f"; only {r['connected']:,} of {n:,} subscribed in {_f(r['connect_s']):.0f}s"
    return Row(
        "2 fan-out",
        f"N={n:,}: ticks to all; deliveries; p50 / p99",
        f"{fraction:.0f}% ({r['ticks_to_all']}/{r['ticks']}), "
        f"{100 * (_f(r['deliveries']) or 0):.1f}% of deliveries; "
        f"{ms(_f(r['latency_p50_s']))} / {ms(_f(r['latency_p99_s']))}",
        "",
        f"FT CPU {pct(_f(r['feed_cpu_pct']))}, RSS {mib(_f(r['feed_peak_rss']))}; "
        f"load CPU {pct(_f(r['client_cpu_pct']))} ({r['client_processes']} procs "
        f"of {_client(r)}); "
        f"other processes {pct(_f(r['others_cpu_pct']))}; "
        f"gaps {r['gaps']}{trouble}",
    )


def run_throughput(ctx: Context) -> Part:
    plan = ctx.plan
    n = plan.throughput_subscribers
    ticks = ", ".join(f"{t:g}s" for t in plan.throughput_ticks_s)
    ctx.log(f"throughput: {n} subscribers, ticks {ticks}")
    feeds: dict[str, Callable[[float], tuple[Service, int]]] = {
        "quotopia": lambda tick: start_ft(tick),
        "grpcio_peer": lambda tick: start_peer_ft(ctx, tick),
    }
    data: dict[str, object] = {"subscribers": n, "saturated_below": SATURATED}
    best: dict[str, dict[str, object] | None] = {}
    failed: dict[str, dict[str, object] | None] = {}
    for name, start in feeds.items():
        steps = []
        best[name] = failed[name] = None
        for tick in plan.throughput_ticks_s:
            feed, port = start(tick)
            with feed:
                result = measure_feed(
                    ctx,
                    feed,
                    port,
                    n,
                    tick=tick,
                    warmup_s=plan.throughput_warmup_s,
                    window_s=plan.throughput_window_s,
                )
            passed = bool(result["every_tick_everywhere"])
            on_time = _f(result["on_schedule"]) or 0.0
            result["kept_up"] = passed
            steps.append(result)
            verdict = "kept up" if passed else "FELL BEHIND"
            ctx.log(
                f"  {name} tick {tick:g}s: {verdict}; {_summary(result)}, "
                f"{pct(100 * on_time)} of ticks made"
            )
            if not passed:
                failed[name] = result
                break
            previous = best[name]
            delivered = _f(result["delivered_per_s"]) or 0.0
            if previous is None or delivered > (_f(previous["delivered_per_s"]) or 0.0):
                best[name] = result
            if on_time < SATURATED:
                failed[name] = result
                break
        data[name] = {"steps": steps}
    data["best"] = best
    return Part("throughput", _throughput_rows(n, best, failed), data)


def _throughput_rows(
    n: int,
    best: dict[str, dict[str, object] | None],
    failed: dict[str, dict[str, object] | None],
) -> list[Row]:
    def figure(r: dict[str, object] | None) -> str:
        if r is None:
            return "none kept up"
        return f"{rate(_f(r['delivered_per_s']))} (tick {ms(_f(r['tick_s']))})"

    def load(r: dict[str, object] | None) -> str:
        if r is None:
            return "-"
        return (
            f"CPU {pct(_f(r['feed_cpu_pct']))}, load CPU {pct(_f(r['client_cpu_pct']))}, "
            f"busiest load process {pct(_f(r['client_busiest_process_cpu_pct']))}, "
            f"others {pct(_f(r['others_cpu_pct']))}, "
            f"{100 * (_f(r['on_schedule']) or 0):.0f}% of ticks made"
        )

    def why(r: dict[str, object] | None) -> str:
        if r is None:
            return "kept up at every step (try shorter ticks)"
        on_time = f"{100 * (_f(r['on_schedule']) or 0):.0f}% of ticks made"
        if r["kept_up"]:
            return f"saturated at tick {ms(_f(r['tick_s']))} ({on_time})"
        return (
            f"fell behind at tick {ms(_f(r['tick_s']))}: "
            f"{100 * (_f(r['fraction_to_all']) or 0):.0f}% of ticks to all, gaps {r['gaps']}, "
            f"{on_time}"
        )

    ft, peer = best["quotopia"], best["grpcio_peer"]
    return [
        Row(
            "3 throughput",
            f"max quotes/s delivered, all {n} keeping up ({_client(ft or peer or {})})",
            figure(ft),
            f"grpcio.aio peer: {figure(peer)}",
            f"at that step: FT {load(ft)}; peer {load(peer)}",
        ),
        Row(
            "3 throughput",
            "p50 / p99 at that step; the next step",
            "-" if ft is None else f"{ms(_f(ft['latency_p50_s']))} / {ms(_f(ft['latency_p99_s']))}",
            "-"
            if peer is None
            else f"peer: {ms(_f(peer['latency_p50_s']))} / {ms(_f(peer['latency_p99_s']))}",
            f"FT {why(failed['quotopia'])}; peer {why(failed['grpcio_peer'])}",
        ),
    ]
