"""What one bench run measures, at which sizes, and the context every part shares."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

__all__ = ["MODES", "Context", "Plan", "plan_for"]


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of every part; :func:`plan_for` gives the presets."""

    mode: str
    # 1. Core REST, under wrk
    rest_connections: int = 64
    #: Seconds of wrk on each server before the measured runs of a path (0: none).
    rest_warmup_s: int = 2
    #: Seconds of each measured wrk run.
    rest_duration_s: int = 3
    #: Solo rounds: wrk on each server in turn, the order rotating each round.
    rest_rounds: int = 3
    #: Paired rounds: Core and the raw app under wrk at once, on a CPU each. The
    #: ratio of one round moves by ±0.3 here, so the median needs many of them.
    rest_pairs: int = 8
    rest_workers: int = 2
    # 2. FT fan-out at the 1 s tick
    fanout_sizes: tuple[int, ...] = (100, 1_000, 5_000, 10_000)
    fanout_tick_s: float = 1.0
    fanout_warmup_s: float = 3.0
    fanout_window_s: float = 10.0
    #: After the window, how long a quote generated in it may take to arrive.
    grace_s: float = 2.0
    # 3. FT maximum throughput: shorter and shorter ticks, until someone falls behind
    throughput_subscribers: int = 100
    throughput_ticks_s: tuple[float, ...] = (
        0.1,
        0.05,
        0.03,
        0.02,
        0.015,
        0.01,
        0.007,
        0.005,
        0.003,
        0.002,
        0.001,
    )
    throughput_warmup_s: float = 2.0
    throughput_window_s: float = 5.0
    # 4. Freshness: generation → visible at Core
    freshness_tick_s: float = 0.05
    freshness_ticks: int = 1_000
    #: Each poller's interval; pollers take turns, so Core is asked every poll_s / pollers.
    freshness_poll_s: float = 0.04
    #: Concurrent pollers, so that under load (slow answers) most ticks are still seen.
    freshness_pollers: int = 8
    # 6. Push: SSE and WebSocket clients on Core, and the FastAPI peer, at the 1 s tick
    push_sizes: tuple[int, ...] = (1_000, 5_000, 10_000)
    push_warmup_s: float = 3.0
    push_window_s: float = 10.0
    #: Event streams that stop reading, on a 10 ms tick: Core's memory meanwhile.
    push_stalled: int = 1_000
    # 7. The recorder's ingest: quotes/s FT offers, into each engine
    ingest_rates: tuple[int, ...] = (5_000, 10_000, 20_000, 40_000)
    ingest_warmup_s: float = 3.0
    ingest_window_s: float = 10.0
    # 8. History queries through Core over many stored quotes
    history_rows: int = 1_000_000
    history_requests: int = 200
    #: Seconds one query's requests may take in all (a heavy query gets fewer).
    history_budget_s: float = 10.0
    # 9. FT beside the Go original, under grpc-go's client (scripts/bench/gofanout.py)
    #: The folder of the Go original's ft, core and fanout-load (None: $QUOTOPIA_GO_SEED).
    go_seed: str | None = None
    go_fanout_sizes: tuple[int, ...] = (1_000, 5_000)
    go_curve_sizes: tuple[int, ...] = (100, 300, 500, 700, 1_000)
    go_curve_tick_s: float = 0.01
    go_window_s: float = 8.0
    # 5. Footprint
    startup_repeats: int = 3
    idle_settle_s: float = 3.0
    # The gRPC load
    #: How long subscribers may take to start; past that, those that did are measured.
    connect_timeout_s: float = 60.0
    load_processes: int = 2
    streams_per_connection: int = 1
    #: grpcio (C-core, several processes), as users run; "wire" is the bench's lean reader.
    load_client: str = "grpcio"
    parts: tuple[str, ...] = (
        "footprint",
        "rest",
        "fanout",
        "throughput",
        "freshness",
        "push",
        "ingest",
        "history",
        "go",
    )


MODES = ("full", "quick", "smoke")


def plan_for(mode: str, **overrides: object) -> Plan:
    """The preset for ``mode`` (full, quick or smoke), with ``overrides`` applied."""
    presets: dict[str, dict[str, object]] = {
        "full": {},
        "quick": {
            "rest_warmup_s": 1,
            "rest_duration_s": 2,
            "rest_rounds": 2,
            "rest_pairs": 2,
            "fanout_sizes": (100, 1_000),
            "push_sizes": (100, 1_000),
            "push_stalled": 100,
            "push_warmup_s": 2.0,
            "push_window_s": 5.0,
            "fanout_warmup_s": 2.0,
            "fanout_window_s": 5.0,
            "throughput_window_s": 2.0,
            "throughput_warmup_s": 1.0,
            "freshness_ticks": 200,
            "ingest_rates": (10_000, 20_000),
            "ingest_warmup_s": 2.0,
            "ingest_window_s": 5.0,
            "history_rows": 200_000,
            "history_requests": 50,
            "go_fanout_sizes": (1_000, 2_000),
            "go_curve_sizes": (100, 300, 700),
            "go_window_s": 5.0,
            "startup_repeats": 1,
            "idle_settle_s": 1.0,
        },
        "smoke": {
            "rest_warmup_s": 0,
            "rest_duration_s": 1,
            "rest_rounds": 1,
            "rest_pairs": 1,
            "fanout_sizes": (10,),
            "push_sizes": (10,),
            "push_stalled": 10,
            "push_warmup_s": 0.5,
            "push_window_s": 2.0,
            "fanout_warmup_s": 0.5,
            "fanout_window_s": 2.0,
            "grace_s": 0.5,
            "throughput_subscribers": 10,
            "throughput_ticks_s": (0.1, 0.05),
            "throughput_warmup_s": 0.5,
            "throughput_window_s": 1.0,
            "freshness_ticks": 20,
            "ingest_rates": (1_000,),
            "ingest_warmup_s": 0.5,
            "ingest_window_s": 1.0,
            "history_rows": 3_000,
            "history_requests": 5,
            "go_fanout_sizes": (10, 20),
            "go_curve_sizes": (10, 20),
            "go_window_s": 2.0,
            "startup_repeats": 1,
            "idle_settle_s": 0.5,
            "load_processes": 1,
        },
    }
    return Plan(mode=mode, **{**presets[mode], **overrides})  # type: ignore[arg-type]


@dataclass
class Context:
    """What every part needs: the plan, the grpcio classes, and a progress log."""

    plan: Plan
    proto_dir: Path
    pb: ModuleType
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)
