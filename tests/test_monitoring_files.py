"""deploy/monitoring and compose.yaml's monitoring profile, checked as files.

No Prometheus server, Grafana or Docker is needed. promtool (Debian's
``prometheus`` package) validates the config and the rules and runs their unit
tests; the rest cross-checks the files against one another: what compose mounts
exists, the scrape targets are the compose services and their ports, the rules
and the dashboard use only catalogued metrics (tests/_monitoring.py), and every
alert has tests for firing and for staying quiet.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from _compose import FULL_COMPOSE, environment, load_compose
from _monitoring import (
    CATALOGUE,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DASHBOARDS_DIR,
    DATASOURCES,
    PROMETHEUS_CONFIG,
    PROMTOOL_TESTS,
    REPO,
    RULES_DIR,
    alert_rules,
    catalogue_entry,
    dashboard,
    dashboard_queries,
    load_yaml,
    metric_names,
    panels,
    recording_rules,
    rule_files,
    substitute_intervals,
)
from _prometheus import CONTAINER_RULES_DIR, render_config, require_tool

COMPOSE = REPO / "compose.yaml"
MONITORING_SERVICES = ("prometheus", "grafana", "jaeger")
#: Which environment variable sets the port each scraped service serves /metrics on.
METRICS_PORT_VARIABLE = {
    "ft": "FT_METRICS_PORT",
    "core": "CORE_PORT",
    "recorder": "RECORDER_METRICS_PORT",
}
#: Where Grafana's image reads provisioning files (GF_PATHS_PROVISIONING's default).
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
PROMTOOL_TIMEOUT = 60

#: Catalogued metrics no rule or panel uses, and why that is fine.
UNUSED: Mapping[str, str] = {
    "python_info": "the Build panel shows the Python version from quotopia_build_info",
    "quotopia_recorder_kafka_committed_offset": "per partition, for queries and for comparing "
    "with the topic's offsets; the lag panel charts what it means",
}


def _promtool(*args: str) -> str:
    """Run promtool; fail with its output unless it exits 0. Returns the output."""
    result = subprocess.run(
        [require_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


# --- promtool --------------------------------------------------------------------


def test_promtool_check_config(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps(render_config()), encoding="utf-8")
    output = _promtool("check", "config", str(config))
    # A rule_files glob that matches nothing is not an error to Prometheus: it
    # would just run without rules. So each file must show up as checked.
    for path in rule_files():
        assert f"Checking {path}" in output, output


def test_promtool_check_rules() -> None:
    output = _promtool("check", "rules", *map(str, rule_files()))
    found = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", output))
    assert found == len(recording_rules()) + len(alert_rules()), output


def test_promtool_test_rules() -> None:
    tests = sorted(PROMTOOL_TESTS.glob("*.yml"))
    assert tests, f"no promtool tests in {PROMTOOL_TESTS}"
    _promtool("test", "rules", *map(str, tests))


# --- what the promtool tests cover -------------------------------------------------


def _promtool_tests() -> list[dict[str, Any]]:
    return [load_yaml(path) for path in sorted(PROMTOOL_TESTS.glob("*.yml"))]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases: dict[str, list[list[Any]]] = {}
    for suite in _promtool_tests():
        for group in suite["tests"]:
            for case in group.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    alerts = set(alert_rules())
    # promtool passes a quiet case for an alert that does not exist: a typo there
    # would be a test of nothing.
    assert cases.keys() <= alerts, f"tests for unknown alerts: {sorted(cases.keys() - alerts)}"
    for alert in sorted(alerts):
        expected = cases.get(alert, [])
        assert any(expected), f"{alert}: no promtool case where it fires (exp_alerts)"
        assert not all(expected), f"{alert}: no promtool case where it must stay quiet"


def test_every_recording_rule_has_a_value_test() -> None:
    checked = [
        case["expr"]
        for suite in _promtool_tests()
        for group in suite["tests"]
        for case in group.get("promql_expr_test", [])
        if case.get("exp_samples")
    ]
    for record in recording_rules():
        assert any(record in metric_names(expr) for expr in checked), (
            f"{record}: no promql_expr_test with exp_samples"
        )


def test_alerts_do_not_read_recording_rules() -> None:
    """Rule groups run independently, so an alert would see another group's
    recorded value up to an evaluation late (see QuotopiaCoreLatencyHigh)."""
    recorded = set(recording_rules())
    for alert, rule in alert_rules().items():
        used = metric_names(rule["expr"]) & recorded
        assert not used, f"{alert} reads recording rules {sorted(used)}"


def test_every_alert_explains_itself() -> None:
    for alert, rule in alert_rules().items():
        assert alert.startswith("Quotopia"), alert
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, alert
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{alert}: no summary"
        # The teaching part: how to break the system so this alert fires.
        assert "Make it fire" in annotations.get("description", ""), alert


# --- metric names: the catalogue against the rules and the dashboard ---------------


def test_metric_names_finds_metrics_and_nothing_else() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (job, le) (rate(x_bucket{job="ft"}[$__rate_interval])))'
    ) == {"x_bucket"}
    assert metric_names('up{job=~"ft|core"} == 0') == {"up"}
    assert metric_names("sum by (symbol) (rate(e_total[5s])) or on () sum(0 * f)") == {
        "e_total",
        "f",
    }
    assert metric_names("time() - process_start_time_seconds offset 5m") == {
        "process_start_time_seconds"
    }
    assert metric_names("a / on (job) group_left (symbol) b > bool 1e6") == {"a", "b"}
    assert metric_names(
        'sum(rate(c_total[1m])) without (instance) or label_replace(d, "x", "$1", "y", "(.*)")'
    ) == {
        "c_total",
        "d",
    }


def _rule_and_panel_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every rule and every panel query."""
    found = [(f"recording rule {name}", expr) for name, expr in recording_rules().items()]
    found += [(f"alert {name}", rule["expr"]) for name, rule in alert_rules().items()]
    found += [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
    return found


def test_rules_and_panels_use_only_catalogued_metrics() -> None:
    known = set(recording_rules()) | {"up", "ALERTS"}
    for where, expr in _rule_and_panel_expressions():
        unknown = {name for name in metric_names(expr) - known if catalogue_entry(name) is None}
        assert not unknown, f"{where} uses metrics outside the catalogue: {sorted(unknown)}"


def test_every_catalogued_metric_is_used() -> None:
    used = {
        entry
        for _, expr in _rule_and_panel_expressions()
        for name in metric_names(expr)
        if (entry := catalogue_entry(name)) is not None
    }
    unused = set(CATALOGUE) - used - UNUSED.keys()
    assert not unused, f"catalogued but in no rule or panel (use them, or add to UNUSED): {unused}"
    stale = UNUSED.keys() & used
    assert not stale, f"listed in UNUSED but used after all: {sorted(stale)}"
    assert UNUSED.keys() <= CATALOGUE.keys()


# --- the dashboard -----------------------------------------------------------------


def _datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    uid = source["uid"]
    assert isinstance(uid, str)
    assert uid
    return uid


def test_every_panel_queries_the_provisioned_datasource() -> None:
    uid = _datasource_uid()
    board = dashboard()
    assert board["uid"], "a fixed uid keeps the dashboard's URL stable"
    assert board["schemaVersion"] >= 39
    assert board.get("templating", {}).get("list", []) == [], "no template variables"
    found = panels(board)
    ids = [panel["id"] for panel in found]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in found:
        title = panel.get("title")
        if panel["type"] == "row":  # a heading, no query of its own
            assert not panel.get("targets"), title
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        targets = panel.get("targets", [])
        assert any(target.get("expr") for target in targets), f"{title}: no query"
        for target in targets:
            assert target.get("datasource", {"uid": uid})["uid"] == uid, title
            assert target.get("expr"), f"{title}: a target without a query"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel's query, handed to it as a recording rule."""
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": substitute_intervals(expr, "1m")}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")
    _promtool("check", "rules", str(path))


def test_grafana_provisioning() -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    # Prometheus by its compose service name and its container port.
    services = load_compose()["services"]
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    assert any(port.endswith(":9090") for port in services["prometheus"]["ports"])
    # Grafana's $__rate_interval is only right if it knows the scrape interval.
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval

    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    mounts = _mounts(services["grafana"])
    assert mounts[provider["options"]["path"]] == DASHBOARDS_DIR
    assert mounts[GRAFANA_PROVISIONING] == DATASOURCES.parents[1]


# --- compose.yaml's monitoring profile ---------------------------------------------


def _mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """A service's bind mounts: container path → the repository path mounted there.

    Named volumes (the history database's ``quotopia-data``) hold no repository
    file and are left out."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/", "~")):  # a named volume
                continue
        else:
            if volume.get("type") == "volume":
                continue
            assert volume.get("type") == "bind", volume
            source, target = volume["source"], volume["target"]
        assert source.startswith("./"), f"mount from outside the repository: {volume}"
        mounts[target] = (REPO / source).resolve()
    return mounts


def test_monitoring_services_are_behind_the_profile() -> None:
    services = load_compose()["services"]
    for name in MONITORING_SERVICES:
        assert services[name]["profiles"] == ["monitoring"], name
        assert services[name]["networks"] == ["quotopia-network"], name
    for name in METRICS_PORT_VARIABLE:
        assert "profiles" not in services[name], f"{name} must start without a profile"


@pytest.mark.parametrize("path", [COMPOSE, FULL_COMPOSE], ids=lambda p: p.name)
def test_images_are_pinned(path: Path) -> None:
    """A version, not a moving tag: MAJOR.MINOR.PATCH, or MAJOR.MINOR where that is
    the project's whole version (PostgreSQL's 15.13), with an optional variant."""
    for name, service in load_compose(path)["services"].items():
        if "build" in service or "image" not in service:  # built here, or an overlay
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", image), (
            f"{name}: pin a version: {image}"
        )


def test_every_mounted_file_exists() -> None:
    services = load_compose()["services"]
    mounted = 0
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert source.exists(), f"{name} mounts {source} (missing) at {target}"
            mounted += 1
    assert mounted >= 4, "prometheus.yml, the rules, and Grafana's two directories"


def test_prometheus_reads_what_compose_mounts() -> None:
    prometheus = load_compose()["services"]["prometheus"]
    mounts = _mounts(prometheus)
    flags = dict(flag.partition("=")[::2] for flag in prometheus["command"])
    assert mounts[flags["--config.file"]] == PROMETHEUS_CONFIG
    assert mounts[str(CONTAINER_RULES_DIR)] == RULES_DIR
    for pattern in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert PurePosixPath(pattern).parent == CONTAINER_RULES_DIR, pattern


def test_scrape_targets_are_the_compose_services_and_their_ports() -> None:
    services = load_compose()["services"]
    jobs = {
        job["job_name"]: [
            target for static in job["static_configs"] for target in static["targets"]
        ]
        for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    }
    assert set(jobs) == set(METRICS_PORT_VARIABLE)
    for job, variable in METRICS_PORT_VARIABLE.items():
        port = environment(services[job])[variable]
        assert jobs[job] == [f"{job}:{port}"], job
        # ...and published, so /metrics is reachable from the host too.
        assert f"{port}:{port}" in services[job]["ports"], job


def test_grafana_is_read_only_without_login() -> None:
    grafana = load_compose()["services"]["grafana"]
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_USER"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"]
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert _mounts(grafana)[str(home.parent)] / home.name == DASHBOARD
