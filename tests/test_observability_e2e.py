"""Observability end to end: real FT, Core and recorder, scraped by the shipped
Prometheus config.

FT (publishing to a private Kafka broker, tests/_kafka.py, as well), Core, the
recorder (into a SQLite file of the test's own) and a private Prometheus
(tests/_prometheus.py) run as processes on 127.0.0.1, Prometheus with
deploy/monitoring's rules and a 1 s scrape. The test checks the contract of the
metric catalogue (tests/_monitoring.py) against what the services really export,
that every dashboard panel has data, and that Prometheus sees FT die.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from _kafka import tansu_broker
from _monitoring import CATALOGUE, dashboard_queries, exported_names, substitute_intervals
from _prometheus import Prometheus, running_prometheus
from _services import ft_metrics_port, http_get, running_core, running_ft, running_recorder

#: What Grafana's $__rate_interval would be with a 1 s scrape: at least 4 scrapes,
#: so a rate() window always holds two samples or more.
RATE_WINDOW = "5s"

#: Catalogue entries exported only from their first event on, which this test does
#: not cause, and why (none now: the recorder's per-symbol counters appear, at 0,
#: with their symbol's first quote).
FIRST_EVENT: Mapping[str, str] = {
    # This test's recorder reads FT's gRPC stream, so its feed drops with FT; the
    # Kafka source's figures are checked in tests/test_kafka_e2e.py.
    "quotopia_recorder_kafka_commits_total": "only with --source kafka",
    "quotopia_recorder_kafka_lag_records": "only with --source kafka",
    "quotopia_recorder_kafka_commit_failures_total": "only with --source kafka",
    "quotopia_recorder_kafka_assigned_partitions": "only with --source kafka",
    "quotopia_recorder_kafka_committed_offset": "only with --source kafka",
}


def _owner(name: str) -> set[str]:
    """The jobs that export catalogue entry ``name``."""
    if name.startswith("quotopia_ft_"):
        return {"ft"}
    if name.startswith("quotopia_core_"):
        return {"core"}
    if name.startswith("quotopia_recorder_"):
        return {"recorder"}
    return {"ft", "core", "recorder"}  # build info, process and Python collectors


def _exported(prometheus: Prometheus, job: str) -> set[str]:
    """Every metric name Prometheus has scraped from ``job``."""
    samples = prometheus.query(f'group by (__name__) ({{job="{job}"}})')
    return {sample["metric"]["__name__"] for sample in samples}


@pytest.mark.e2e
def test_metrics_dashboard_and_an_outage_through_prometheus(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    with (
        tansu_broker() as broker,
        # Tansu refuses aiokafka's idempotent producer (tests/test_kafka_harness.py).
        running_ft("--kafka", broker.bootstrap, "--no-kafka-idempotence") as ft,
        running_core(ft.port, "--db", database) as core,
        # Started once FT has ticked, as in compose (it waits for FT to be
        # healthy): it joins FT's runs late, so the per-symbol gap counters exist
        # from its first quotes, as on any real deployment.
        running_recorder(ft.port, database) as recorder,
    ):
        metrics_port = ft_metrics_port(ft)
        targets = {
            "ft": f"127.0.0.1:{metrics_port}",
            "core": f"127.0.0.1:{core.port}",
            "recorder": f"127.0.0.1:{recorder.port}",
        }
        with running_prometheus(tmp_path, targets) as prometheus:
            for job in targets:
                prometheus.wait_for(f'up{{job="{job}"}} == 1')
            prometheus.wait_for("quotopia_ft_ticks_total > 0")
            prometheus.wait_for("quotopia_ft_kafka_quotes_sent_total > 0")
            prometheus.wait_for("quotopia_core_feed_connected == 1")
            prometheus.wait_for("quotopia_recorder_ready == 1")
            prometheus.wait_for("quotopia_recorder_rows_written_total > 0")

            # Traffic for the request metrics, errors included: the routes are
            # templates, so /quotes/DOGE counts as "/quotes/{symbol}".
            for path, status in (
                ("/quotes", 200),
                ("/quotes/BTC", 200),
                ("/quotes/DOGE", 404),
                ("/health", 200),
                ("/nope", 404),
            ):
                assert http_get(core.port, path)[0] == status, path
            prometheus.wait_for(
                'quotopia_core_http_requests_total{route="/quotes/{symbol}", status="404"}'
            )

            # The catalogue is what the services export: every entry, from its owner.
            for job in targets:
                exported = _exported(prometheus, job)
                missing = {
                    name
                    for name in CATALOGUE
                    if job in _owner(name) and not exported_names(name) <= exported
                } - FIRST_EVENT.keys()
                assert not missing, f"{job} does not export {sorted(missing)}"

            # Every panel has data. Recording rules need two evaluations over
            # scraped samples, so poll rather than ask once.
            queries = [
                (title, substitute_intervals(expr, RATE_WINDOW))
                for title, expr in dashboard_queries()
            ]
            empty: list[str] = []

            def every_panel_has_data() -> bool:
                empty[:] = [
                    f"{title}: {expr}" for title, expr in queries if not prometheus.query(expr)
                ]
                return not empty

            try:
                prometheus.wait_for(every_panel_has_data, what="data for every panel query")
            except AssertionError as error:
                no_data = "\n".join(empty)
                raise AssertionError(f"panels without data:\n{no_data}\n{error}") from None

            # FT dies: Prometheus's scrape fails, Core's and the recorder's feeds
            # drop, and the shipped alert starts (pending: its `for` is 15 s).
            ft.process.kill()
            prometheus.wait_for('up{job="ft"} == 0')
            prometheus.wait_for("quotopia_core_feed_connected == 0")
            prometheus.wait_for("quotopia_recorder_feed_connected == 0")
            prometheus.wait_for(
                'ALERTS{alertname="QuotopiaServiceDown", job="ft", alertstate="pending"}'
            )
            # Core and the recorder are still scraped; a lost feed leaves the
            # recorder ready (its database is fine), as /readyz says.
            assert prometheus.query('up{job="core"} == 1'), prometheus.describe()
            assert prometheus.query('up{job="recorder"} == 1'), prometheus.describe()
            assert prometheus.query("quotopia_recorder_ready == 1"), prometheus.describe()
