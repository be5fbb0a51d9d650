"""``python -m scripts.bench``: run the parts, print the table, save the JSON.

Usage (from the repository root; ``nox -s bench -- ARGS`` passes ARGS here)::

    python -m scripts.bench              # the full run (about 10 minutes on 2 cores)
    python -m scripts.bench --quick      # smaller sizes, shorter windows
    python -m scripts.bench --smoke      # tiny sizes, well under a minute (CI)
    python -m scripts.bench --parts rest,freshness

Nothing here asserts a speed: the exit status is 1 only when a part could not be
measured (a service failed to start, wrk is missing, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import fanout, footprint, freshness, gofanout, history, ingest, protos, push, rest
from .loadclient import CLIENTS
from .plan import MODES, Context, Plan, plan_for
from .procs import ROOT, BenchError
from .report import Part, Row, save, table

__all__ = ["main"]

PARTS: dict[str, Callable[[Context], Part]] = {
    "rest": rest.run,
    "fanout": fanout.run_fanout,
    "throughput": fanout.run_throughput,
    "freshness": freshness.run,
    "push": push.run,
    "ingest": ingest.run,
    "history": history.run,
    "go": gofanout.run,
}
ALL_PARTS = (*PARTS, "footprint")
DEFAULT_OUT = ROOT / "bench-results" / "bench.json"
VERSIONS = (
    "quotopia",
    "grpclib",
    "betterproto2",
    "hypercorn",
    "quart",
    "quart-trio",
    "trio",
    "trio-asyncio",
    "anyio",
    "grpcio",
    "protobuf",
    "psutil",
    "sqlalchemy",
    "psycopg",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description="Benchmark Quotopia beside its peers; print a table, save JSON.",
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--smoke", action="store_true", help="tiny sizes, to check it works")
    sizes.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows")
    parser.add_argument(
        "--parts",
        default=",".join(ALL_PARTS),
        help=f"comma-separated parts to run, of {', '.join(ALL_PARTS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument(
        "--fanout-sizes", help="comma-separated subscriber counts for the fan-out part"
    )
    parser.add_argument("--push-sizes", help="comma-separated client counts for the push part")
    parser.add_argument(
        "--load-client",
        choices=CLIENTS,
        help="gRPC client of the fan-out and throughput parts' subscriber load: grpcio's "
        "grpc.aio (C-core, the default), or wire, the bench's lean HTTP/2 reader (cheaper "
        "for FT than any real client: its figures are labelled so)",
    )
    parser.add_argument(
        "--go-seed",
        metavar="DIR",
        help="the Go original's binaries (ft, core, fanout-load, built by "
        "../shared/anchors/go-seed/build.sh): its FT and Core join the run as peers, and "
        f"part 9 measures FT under grpc-go's client (default: ${gofanout.GO_SEED_ENV})",
    )
    parser.add_argument("--load-processes", type=int, help="processes sharing the gRPC load")
    parser.add_argument(
        "--streams-per-connection", type=int, help="subscriber streams per HTTP/2 connection"
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    assert mode in MODES
    overrides: dict[str, object] = {}
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))} (known: {ALL_PARTS})")
    overrides["parts"] = parts
    if args.fanout_sizes:
        overrides["fanout_sizes"] = tuple(int(n) for n in args.fanout_sizes.split(","))
    if args.push_sizes:
        overrides["push_sizes"] = tuple(int(n) for n in args.push_sizes.split(","))
    if args.load_client:
        overrides["load_client"] = args.load_client
    if args.load_processes:
        overrides["load_processes"] = args.load_processes
    if args.go_seed:
        overrides["go_seed"] = args.go_seed
    if args.streams_per_connection:
        overrides["streams_per_connection"] = args.streams_per_connection
    return plan_for(mode, **overrides)


def _raise_file_limit() -> None:
    """10,000 subscribers need as many sockets in FT and in the load processes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def _command(*argv: str, any_status: bool = False) -> str | None:
    """The first line a command prints ("" if nothing), or None if it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    except OSError:
        return None
    if done.returncode != 0 and not any_status:
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def _meta(plan: Plan) -> dict[str, object]:
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": plan.mode,
        "plan": dataclasses.asdict(plan),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "versions": _versions(),
        "wrk": _command("wrk", "--version", any_status=True),  # it exits 1 after the version
        "git_commit": _command("git", "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_command("git", "status", "--porcelain", "--untracked-files=no")),
    }


def _loaded_rss(parts: dict[str, Part]) -> dict[str, object]:
    """The peak RSS figures under load that the other parts measured."""
    out: dict[str, object] = {}
    rest_part = parts.get("rest")
    if rest_part is not None and (core := rest.core_peak_rss(rest_part.data)) is not None:
        out["core_peak_rss"] = core
    fanout_part = parts.get("fanout")
    sizes = fanout_part.data.get("sizes") if fanout_part is not None else None
    if isinstance(sizes, dict) and sizes:
        largest = max(sizes, key=int)
        out["ft_peak_rss"] = int(sizes[largest]["feed_peak_rss"])
        out["ft_peak_rss_at"] = f"N={int(largest):,}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = _plan(args)
    if {"rest", "freshness"} & set(plan.parts):
        try:
            rest.require_wrk()
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    _raise_file_limit()
    meta = _meta(plan)
    began = time.monotonic()
    parts: dict[str, Part] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="quotopia-bench-proto-") as tmp:
        proto_dir = protos.generate(Path(tmp))
        pb, _ = protos.load(proto_dir)
        ctx = Context(plan, proto_dir, pb)
        ctx.log(f"{plan.mode} run of {', '.join(plan.parts)}; load client: {plan.load_client}")
        for name in plan.parts:
            try:
                if name == "footprint":
                    part = footprint.run(ctx, loaded=_loaded_rss(parts))
                else:
                    part = PARTS[name](ctx)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                failed = True
                ctx.log(f"{name} FAILED: {exc}")
                detail = "".join(traceback.format_exception(exc))
                failure = Row(name, "FAILED", str(exc).splitlines()[0])
                part = Part(name, [failure], {"error": detail})
            parts[name] = part
    meta["duration_s"] = round(time.monotonic() - began, 1)
    meta["load_average_after"] = os.getloadavg()
    rows = [row for part in parts.values() for row in part.rows]
    save(args.out, meta, list(parts.values()))
    print(
        f"\nQuotopia bench, {plan.mode} run: {meta['cpus']} CPUs, load average "
        f"{_avg(meta['load_average_before'])} before, {_avg(meta['load_average_after'])} after; "
        f"{meta['duration_s']} s\n"
    )
    print(table(rows))
    print(f"\nsaved {_shown(args.out)}")
    return 1 if failed else 0


def _avg(loads: object) -> str:
    assert isinstance(loads, tuple)
    return "/".join(f"{x:.1f}" for x in loads)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
