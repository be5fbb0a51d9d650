"""deploy/monitoring as data: the metric catalogue, the rules, the dashboard's queries.

The metric catalogue is the contract between the code (quotopia/ft, quotopia/core,
quotopia/recorder) and the monitoring files: the rules and panels may only use
what it names, and every name in it should be used somewhere
(tests/test_monitoring_files.py), while the end-to-end test
(tests/test_observability_e2e.py) checks that real FT, Core and recorder export
all of it.

PromQL has no parser in Python's standard library, so :func:`metric_names` finds
metric names the way a reader does: it drops strings, label matchers, ranges and
label lists, and keeps the identifiers that are not functions or keywords. That
is enough for the expressions here, and its own test shows what it catches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

__all__ = [
    "CATALOGUE",
    "CATALOGUE_FAMILIES",
    "DASHBOARD",
    "DASHBOARDS_DIR",
    "DASHBOARD_PROVIDERS",
    "DATASOURCES",
    "PROMETHEUS_CONFIG",
    "PROMTOOL_TESTS",
    "REPO",
    "RULES_DIR",
    "alert_rules",
    "catalogue_entry",
    "dashboard",
    "dashboard_queries",
    "exported_names",
    "load_yaml",
    "metric_names",
    "panels",
    "recording_rules",
    "rule_files",
    "substitute_intervals",
]

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
RULES_DIR = MONITORING / "prometheus" / "rules"
PROMTOOL_TESTS = MONITORING / "prometheus" / "tests"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "quotopia.yml"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS_DIR / "quotopia.json"

#: Every metric the services export by name, with its type. Counters carry their
#: ``_total``; a histogram ``X`` is exported as ``X_bucket``, ``X_sum``, ``X_count``.
#: FT's are ``quotopia_ft_*``, Core's ``quotopia_core_*``, the recorder's
#: ``quotopia_recorder_*`` (quotopia/recorder/metrics.py); every service exports the rest.
CATALOGUE: Mapping[str, str] = {
    # Every service.
    "quotopia_build_info": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
    # FT.
    "quotopia_ft_ticks_total": "counter",
    "quotopia_ft_quotes_published_total": "counter",
    "quotopia_ft_price": "gauge",
    "quotopia_ft_subscribers": "gauge",
    "quotopia_ft_subscriber_connects_total": "counter",
    "quotopia_ft_subscriber_disconnects_total": "counter",
    "quotopia_ft_quotes_conflated_total": "counter",
    "quotopia_ft_subscribers_behind": "gauge",
    "quotopia_ft_subscriber_backlog_max_ticks": "gauge",
    "quotopia_ft_subscriber_behind_max_seconds": "gauge",
    "quotopia_ft_delivery_latency_seconds": "histogram",
    "quotopia_ft_ready": "gauge",
    # FT, with --kafka.
    "quotopia_ft_kafka_connected": "gauge",
    "quotopia_ft_kafka_quotes_sent_total": "counter",
    "quotopia_ft_kafka_quotes_dropped_total": "counter",
    "quotopia_ft_kafka_failures_total": "counter",
    "quotopia_ft_kafka_buffer_quotes": "gauge",
    "quotopia_ft_kafka_buffer_capacity_quotes": "gauge",
    "quotopia_ft_kafka_ack_latency_seconds": "histogram",
    # Core.
    "quotopia_core_http_requests_total": "counter",
    "quotopia_core_http_request_duration_seconds": "histogram",
    "quotopia_core_feed_connected": "gauge",
    "quotopia_core_feed_reconnects_total": "counter",
    "quotopia_core_feed_rejected_total": "counter",
    "quotopia_core_quotes_received_total": "counter",
    "quotopia_core_quote_age_seconds": "gauge",
    "quotopia_core_price": "gauge",
    "quotopia_core_feed_latency_seconds": "histogram",
    "quotopia_core_ready": "gauge",
    "quotopia_core_push_connections": "gauge",
    "quotopia_core_push_events_sent_total": "counter",
    "quotopia_core_push_conflated_total": "counter",
    "quotopia_core_push_closed_total": "counter",
    # The recorder.
    "quotopia_recorder_quotes_received_total": "counter",
    "quotopia_recorder_missed_quotes_total": "counter",
    "quotopia_recorder_gaps_total": "counter",
    "quotopia_recorder_replayed_quotes_total": "counter",
    "quotopia_recorder_ft_runs_total": "counter",
    "quotopia_recorder_quotes_rejected_total": "counter",
    "quotopia_recorder_rows_written_total": "counter",
    "quotopia_recorder_duplicate_quotes_total": "counter",
    "quotopia_recorder_batches_total": "counter",
    "quotopia_recorder_batch_duration_seconds": "histogram",
    "quotopia_recorder_write_latency_seconds": "histogram",
    "quotopia_recorder_lag_seconds": "gauge",
    "quotopia_recorder_buffer_quotes": "gauge",
    "quotopia_recorder_buffer_capacity_quotes": "gauge",
    "quotopia_recorder_feed_connected": "gauge",
    "quotopia_recorder_feed_sessions_total": "counter",
    "quotopia_recorder_database_up": "gauge",
    "quotopia_recorder_retention_deleted_rows_total": "counter",
    "quotopia_recorder_ready": "gauge",
    # The recorder, with --source kafka.
    "quotopia_recorder_kafka_commits_total": "counter",
    "quotopia_recorder_kafka_commit_failures_total": "counter",
    "quotopia_recorder_kafka_assigned_partitions": "gauge",
    "quotopia_recorder_kafka_committed_offset": "gauge",
    "quotopia_recorder_kafka_lag_records": "gauge",
}

#: Families the catalogue names only by prefix (prometheus_client's process and
#: garbage-collector collectors): usable in queries, but nothing requires them.
CATALOGUE_FAMILIES = ("process_", "python_gc_")

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_names(name: str) -> set[str]:
    """The series names a catalogue entry appears under in a scrape."""
    if CATALOGUE[name] == "histogram":
        return {name + suffix for suffix in _HISTOGRAM_SUFFIXES}
    return {name}


def catalogue_entry(series: str) -> str | None:
    """The catalogue entry ``series`` belongs to (``X_bucket`` belongs to ``X``), the
    family prefix it starts with, or None if it is not in the catalogue."""
    for name in CATALOGUE:
        if series in exported_names(name):
            return name
    return next((family for family in CATALOGUE_FAMILIES if series.startswith(family)), None)


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path)


# --- rules -----------------------------------------------------------------------


def rule_files() -> list[Path]:
    files = sorted(RULES_DIR.glob("*.yml"))
    assert files, f"no rule files in {RULES_DIR}"
    return files


def _rules() -> Iterator[dict[str, Any]]:
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            yield from group["rules"]


def recording_rules() -> dict[str, str]:
    """Recording rule name → expression, from every rule file."""
    return {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}


def alert_rules() -> dict[str, dict[str, Any]]:
    """Alert name → the whole rule, from every rule file."""
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


# --- the dashboard ---------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside a collapsed row (which nests them)."""
    found: list[dict[str, Any]] = []
    for panel in board.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


#: Grafana's built-in interval variables, in both spellings.
_INTERVAL_VARIABLE = re.compile(
    r"\$(?:\{__rate_interval\}|\{__interval\}|__rate_interval|__interval)"
)


def substitute_intervals(expr: str, window: str) -> str:
    """``expr`` with Grafana's interval variables replaced by ``window`` (e.g. "1m").

    Raises AssertionError if another ``$`` variable is left: Prometheus could not
    run the query, and these tests could not either.
    """
    result = _INTERVAL_VARIABLE.sub(window, expr)
    assert "$" not in result, f"a Grafana variable other than the interval ones: {expr!r}"
    return result


# --- PromQL ----------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: An identifier, unless it continues a number (1e6) or a duration (5m), and
#: whether a call's "(" follows it.
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan", "start", "end"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, e.g. ``{"up"}`` for
    ``sum by (job) (up{job="ft"} == 0)``."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    names: set[str] = set()
    for found in _IDENTIFIER.finditer(text):
        word, call = found[1], found[2]
        if call is None and word.lower() not in _KEYWORDS:
            names.add(word)
    return names
