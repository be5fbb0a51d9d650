"""What every Quotopia service shares for being observed: metrics, build info, probes.

- :mod:`quotopia.telemetry.metrics`: a registry per service with the process and
  build-info metrics, a lock-free histogram for hot paths, the exposition.
- :mod:`quotopia.telemetry.probes`: the answers of ``/livez`` and ``/readyz``.
- :mod:`quotopia.telemetry.endpoint`: a small HTTP endpoint serving ``/metrics``,
  ``/livez`` and ``/readyz`` for a service that has no HTTP API of its own (FT).
"""

from __future__ import annotations
