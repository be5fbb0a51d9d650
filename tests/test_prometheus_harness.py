"""tests/_prometheus.py itself: a private Prometheus with the shipped config and rules.

With nothing to scrape, Prometheus must still load every rule, find every target
down, and start the QuotopiaServiceDown alert: proof that the harness rewrote the
targets and the rule paths, found the port, and that queries work, before any
test relies on it with real services.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from _monitoring import alert_rules, recording_rules
from _prometheus import running_prometheus

#: The jobs of prometheus.yml (render_config refuses targets for any other set).
JOBS = ("ft", "core", "recorder")


@pytest.fixture
def closed_addresses() -> Iterator[dict[str, str]]:
    """An address per job where nothing listens, and nothing can start to.

    Each socket is bound but never listens: a connection to it is refused, and
    since the test holds it, no other process can take the port meanwhile.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in JOBS]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        yield {
            job: f"127.0.0.1:{sock.getsockname()[1]}"
            for job, sock in zip(JOBS, sockets, strict=True)
        }
    finally:
        for sock in sockets:
            sock.close()


def test_prometheus_without_targets_reports_them_down(
    tmp_path: Path, closed_addresses: dict[str, str]
) -> None:
    with running_prometheus(tmp_path, closed_addresses) as prometheus:
        assert prometheus.rule_names() == set(recording_rules()) | set(alert_rules())

        (sample,) = prometheus.wait_for('up{job="ft"} == 0')
        assert sample["metric"]["instance"] == closed_addresses["ft"]
        prometheus.wait_for('up{job="core"} == 0')
        prometheus.wait_for('up{job="recorder"} == 0')

        health = {target["labels"]["job"]: target for target in prometheus.targets()}
        assert set(health) == set(JOBS)
        for job, target in health.items():
            assert target["health"] == "down", target
            assert "connection refused" in target["lastError"], f"{job}: {target}"

        # The shipped alert sees it at the next evaluation; `for: 15s` keeps it
        # pending, which is as far as a quick test needs to go.
        prometheus.wait_for(
            'ALERTS{alertname="QuotopiaServiceDown", job="ft", alertstate="pending"}'
        )
