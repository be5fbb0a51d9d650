"""Quotopia's benchmark harness: the real services, measured beside their peers.

Run it from the repository root as ``python -m scripts.bench`` (``nox -s bench``
installs what it needs first). It prints one table and saves every figure, with
the machine it ran on, to ``bench-results/bench.json``. ``--smoke`` runs every
part at tiny sizes, to keep the harness working in CI; it never asserts a speed.

One module per part:

- :mod:`.rest`: Core's REST API under wrk, beside a raw ASGI app on the same server
- :mod:`.fanout`: FT's fan-out at the 1 s tick, and its maximum throughput
- :mod:`.freshness`: from a price's generation to its visibility at Core
- :mod:`.footprint`: memory, time to ready, image size
- :mod:`.loadclient`: the gRPC subscriber load (grpcio, several processes)
- :mod:`.peers`: the baselines (raw ASGI app, grpcio.aio FT) and Core on several workers
- :mod:`.procs`, :mod:`.protos`, :mod:`.latency`, :mod:`.report`: the shared pieces
"""
