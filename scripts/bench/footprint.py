"""Part 5: footprint. Memory idle and under load, time to ready, image size.

- Time to ready, from the moment the process is started: FT is ready when a new
  subscriber gets its first quote; Core when ``GET /quotes/BTC`` answers 200 (its
  feed is connected and a quote is in). Core is timed with FT already up, and the
  two together from a cold start (Core's first connection attempt may fail and
  back off, as it would in ``quotopia up``).
- RSS idle: FT and Core running together at the 1 s tick, Core connected, after a
  short settle. RSS under load: the peaks the other parts saw (Core under wrk, FT
  at its largest fan-out).
- The image size, built from the Dockerfile, where a Docker engine answers.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time

from .plan import Context
from .procs import ROOT, core_ready, ft_ready, start_core, start_ft
from .report import Part, Row, mib

__all__ = ["run"]

NO_DOCKER = "n/a (no Docker engine)"


def _image_size(ctx: Context) -> tuple[str, int | None]:
    """Build the image and return (shown, bytes); n/a without a Docker engine."""
    if shutil.which("docker") is None:
        return NO_DOCKER, None
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return NO_DOCKER, None
    ctx.log("  building the Docker image for its size")
    tag = "quotopia:bench"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT)], check=True, capture_output=True)
    shown = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", tag],
        check=True,
        capture_output=True,
        text=True,
    )
    size = int(shown.stdout.strip())
    return mib(size), size


def run(ctx: Context, *, loaded: dict[str, object]) -> Part:
    """``loaded`` holds peak RSS figures from the other parts (may be empty)."""
    plan = ctx.plan
    ctx.log(f"footprint: time to ready (x{plan.startup_repeats}), RSS, image")
    ft_times: list[float] = []
    core_times: list[float] = []
    cold_times: list[float] = []
    rss: dict[str, int] = {}
    for attempt in range(plan.startup_repeats):
        ft, ft_port = start_ft(1.0)
        with ft:
            ft_times.append(ft_ready(ft, ft_port, ctx.pb, 30))
            core, port = start_core(ft_port)
            with core:
                core_times.append(core_ready(core, port, 30))
                if attempt == 0:
                    time.sleep(plan.idle_settle_s)
                    rss = {"ft_idle": ft.rss(), "core_idle": core.rss()}
        # Both at once, as `quotopia up` starts them.
        begun = time.monotonic()
        ft, ft_port = start_ft(1.0)
        with ft:
            core, port = start_core(ft_port)
            with core:
                core_ready(core, port, 30)
                cold_times.append(time.monotonic() - begun)
    image, image_bytes = _image_size(ctx)
    data: dict[str, object] = {
        "ft_ready_s": ft_times,
        "core_ready_s": core_times,
        "both_ready_s": cold_times,
        **rss,
        **loaded,
        "image": image,
        "image_bytes": image_bytes,
    }

    def secs(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s" if values else "-"

    def peak(key: str) -> str:
        value = loaded.get(key)
        return mib(float(value)) if isinstance(value, int | float) else "-"

    rows = [
        Row(
            "5 footprint",
            "RSS idle: FT / Core",
            f"{mib(rss.get('ft_idle'))} / {mib(rss.get('core_idle'))}",
            "",
            "together, Core connected, 1 s tick",
        ),
        Row(
            "5 footprint",
            "RSS under load: FT / Core",
            f"{peak('ft_peak_rss')} / {peak('core_peak_rss')}",
            "",
            f"FT at {loaded.get('ft_peak_rss_at', '-')}; Core under wrk -c64",
        ),
        Row(
            "5 footprint",
            "time to ready: FT / Core / both",
            f"{secs(ft_times)} / {secs(core_times)} / {secs(cold_times)}",
            "",
            f"median of {plan.startup_repeats}; from process start to a quote served",
        ),
        Row("5 footprint", "image size", image, "", "docker build of ./Dockerfile"),
    ]
    return Part("footprint", rows, data)
