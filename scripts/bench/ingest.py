"""Part 7: the recorder's ingest rate, into SQLite and into PostgreSQL.

FT runs with 100 symbols, its tick set so that it offers a given number of
quotes a second (100 symbols every 5 ms: 20,000/s); one ``quotopia recorder``
process reads FT's gRPC stream and writes every quote into a new database. Both
are the real commands, with their default batching (2,000 quotes, 0.2 s).

For each offered rate, after a warm-up, over a window:

- *offered*: quotes FT published (its ``quotopia_ft_quotes_published_total``);
- *written*: rows the recorder added (``quotopia_recorder_rows_written_total``);
- *missed*: quotes the recorder never got (gaps in the sequence numbers: it fell
  behind and FT conflated its stream);
- *lag p99*: from a quote's generation at FT to its commit, from the recorder's
  ``quotopia_recorder_write_latency_seconds`` histogram (interpolated within a
  bucket, as Prometheus's ``histogram_quantile`` does);
- the CPU of FT and of the recorder.

A rate is *sustained* when the recorder writes at least 90 % of it (batches
make a short window uneven), misses nothing, and its lag p99 stays under 1 s.
The engines' durability: SQLite in WAL mode with ``synchronous=NORMAL`` (a
commit survives the process, not always a power cut), PostgreSQL with ``fsync``
and ``synchronous_commit`` on.

The private PostgreSQL server is the tests' own harness (tests/_postgres.py),
started on a free port; with no PostgreSQL installed those rows say so.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .plan import Context
from .procs import ROOT, BenchError, Sampler, Service, http_get, quotopia_argv, start_ft
from .report import Part, Row, ms, pct, rate

__all__ = ["histogram_quantile", "postgres_server", "run"]

SYMBOLS = 100
#: A rate counts as sustained when this much of it is written...
KEPT = 0.9
#: ...and the lag p99 stays under this.
LAG_LIMIT_S = 1.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    status, body = http_get(port, "/metrics")
    if status != 200:
        raise BenchError(f"/metrics on :{port} answered {status}")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _sum(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets: (upper bound, count), in order."""
    found = [
        (float(dict(labels)["le"]), value)
        for (n, labels), value in samples.items()
        if n == f"{name}_bucket"
    ]
    return sorted(found)


def histogram_quantile(q: float, before: Samples, after: Samples, name: str) -> float | None:
    """The ``q`` quantile of what a histogram observed between two scrapes."""
    old = dict(_buckets(before, name))
    delta = [(bound, count - old.get(bound, 0.0)) for bound, count in _buckets(after, name)]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in delta:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound, as Prometheus
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def _symbols() -> str:
    return ",".join(f"S{i:03d}=100.00" for i in range(SYMBOLS))


def _recorder(ft_port: int, database: str) -> tuple[Service, int]:
    recorder = Service(
        "recorder",
        quotopia_argv(
            "recorder",
            "--host=127.0.0.1",
            "--metrics-port=0",
            f"--ft-addr=127.0.0.1:{ft_port}",
            f"--db={database}",
        ),
    )
    try:
        port = int(recorder.wait_line(r"recorder metrics on http://127\.0\.0\.1:(\d+)", 30)[1])
        recorder.wait_line(r"recording quotes from FT", 60)
    except BaseException:
        recorder.stop()
        raise
    return recorder, port


def _measure(ctx: Context, engine: str, database: str, offered: int) -> dict[str, Any]:
    plan = ctx.plan
    tick = SYMBOLS / offered
    ft, ft_port = start_ft(tick, extra=[f"--symbols={_symbols()}", "--log-level=WARNING"])
    with ft:
        recorder, port = _recorder(ft_port, database)
        with recorder:
            time.sleep(plan.ingest_warmup_s)
            assert ft.metrics_port is not None
            ft_before, before = _scrape(ft.metrics_port), _scrape(port)
            with Sampler(ft, recorder) as sampler:
                time.sleep(plan.ingest_window_s)
            ft_after, after = _scrape(ft.metrics_port), _scrape(port)
    window = sampler.elapsed

    def per_s(samples: tuple[Samples, Samples], name: str) -> float:
        return (_sum(samples[1], name) - _sum(samples[0], name)) / window

    published = per_s((ft_before, ft_after), "quotopia_ft_quotes_published_total")
    written = per_s((before, after), "quotopia_recorder_rows_written_total")
    missed = per_s((before, after), "quotopia_recorder_missed_quotes_total") * window
    name = "quotopia_recorder_write_latency_seconds"
    p50 = histogram_quantile(0.5, before, after, name)
    p99 = histogram_quantile(0.99, before, after, name)
    sustained = (
        published > 0
        and written >= KEPT * published
        and missed == 0
        and p99 is not None
        and p99 < LAG_LIMIT_S
    )
    result: dict[str, Any] = {
        "engine": engine,
        "target_per_s": offered,
        "published_per_s": round(published),
        "written_per_s": round(written),
        "missed": int(missed),
        "lag_p50_s": p50,
        "lag_p99_s": p99,
        "ft_cpu_pct": round(sampler.cpu_pct(ft), 1),
        "recorder_cpu_pct": round(sampler.cpu_pct(recorder), 1),
        "recorder_peak_rss": sampler.peak_rss(recorder),
        "machine_busy_pct": round(sampler.machine_busy_pct, 1),
        "sustained": sustained,
    }
    ctx.log(
        f"ingest {engine} {offered:,}/s: FT published {published:,.0f}/s, written "
        f"{written:,.0f}/s, missed {int(missed)}, lag p99 {ms(p99)}, recorder CPU "
        f"{sampler.cpu_pct(recorder):.0f}%"
    )
    return result


@contextmanager
def postgres_server() -> Iterator[Any]:
    """The tests' private PostgreSQL server with fsync on, or None if none is installed."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import _postgres  # the tests' harness, found through sys.path
    finally:
        sys.path.remove(str(ROOT / "tests"))
    if _postgres.find_pg_bin() is None:
        yield None
        return
    with _postgres.running_postgres() as server:
        # The harness turns fsync off for speed; a bench of writes wants it on.
        server.psql("ALTER SYSTEM SET fsync = on")
        server.psql("SELECT pg_reload_conf()")
        yield server


def run(ctx: Context) -> Part:
    results: list[dict[str, Any]] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="quotopia-bench-ingest-") as tmp:
        for offered in ctx.plan.ingest_rates:
            database = f"sqlite:///{Path(tmp) / f'ingest-{offered}.db'}"
            results.append(_measure(ctx, "sqlite", database, offered))
        with postgres_server() as server:
            if server is None:
                rows.append(Row("ingest", "into PostgreSQL", "-", notes="no PostgreSQL here"))
            else:
                for offered in ctx.plan.ingest_rates:
                    name = f"ingest_{offered}"
                    server.psql(f"CREATE DATABASE {name}")
                    url = server.url.rsplit("/", 1)[0] + f"/{name}"
                    results.append(_measure(ctx, "postgresql", url, offered))
    for result in results:
        rows.append(
            Row(
                "ingest",
                f"recorder into {result['engine']}, FT offering {result['target_per_s']:,}/s",
                f"{rate(result['written_per_s'])} written, lag p99 {ms(result['lag_p99_s'])}",
                f"FT published {rate(result['published_per_s'])}",
                f"{'sustained' if result['sustained'] else 'NOT sustained'}; missed "
                f"{result['missed']}; recorder CPU {pct(result['recorder_cpu_pct'])}"
                f", FT CPU {pct(result['ft_cpu_pct'])}",
            )
        )
    for engine in ("sqlite", "postgresql"):
        kept = [r["target_per_s"] for r in results if r["engine"] == engine and r["sustained"]]
        if any(r["engine"] == engine for r in results):
            best = max(kept, default=None)
            rows.append(
                Row(
                    "ingest",
                    f"highest rate sustained into {engine}",
                    rate(best) if best is not None else "none",
                    notes=f"of {', '.join(f'{r:,}' for r in ctx.plan.ingest_rates)}/s tried",
                )
            )
    return Part("ingest", rows, {"results": results})
