"""Monitoring assets agree with the code: deploy/prometheus.yml, deploy/alerts.yml, the Grafana dashboard.

Every metric a rule or a panel queries must be one `pipeline.metrics.create_metrics()`
exports, so a renamed metric cannot leave a silent alert or an empty panel behind.
promtool (Debian's `prometheus` package) checks the config and rules and runs the rule
unit tests in deploy/alerts.test.yml; without it those tests skip, or fail when
FACEMATCH_REQUIRE_ASSETS=1 (CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.metrics import create_metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts.test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
COMPOSE = REPO / "docker-compose.kafka.yml"
REQUIRE_ENV = "FACEMATCH_REQUIRE_ASSETS"
# The dashboard schemaVersion each Grafana major writes (a dashboard newer than its Grafana does not load).
GRAFANA_SCHEMA = {10: 38, 11: 39}
PANEL_TYPES = {"timeseries", "stat", "table"}

# Sample names per metric type, from the family name prometheus_client reports (counters lose `_total`).
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
             "stateset": ("",), "unknown": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}
# Series Prometheus adds to every target itself.
_SCRAPE_SERIES = {"up"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_WORD = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*(?:\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}


def require(binary: str, package: str) -> str:
    """The binary's path; a skip naming the apt package when absent (a failure under FACEMATCH_REQUIRE_ASSETS=1)."""
    path = shutil.which(binary)
    if path:
        return path
    message = f"`{binary}` not installed: `apt-get install -y {package}` (Debian 12) to run this check"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message)
    pytest.skip(f"{message} (set {REQUIRE_ENV}=1 to fail instead of skipping)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or Grafana variables)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    while _RANGE.search(text):  # subqueries hold ranges in ranges
        text = _RANGE.sub(" ", text)
    names = set()
    for match in _WORD.finditer(text):
        word = match.group(0)
        if word.endswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exported_metric_names() -> set[str]:
    """Every series name the services export: the registry create_metrics() fills, plus `up`."""
    names = set(_SCRAPE_SERIES)
    for family in create_metrics().registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
        names |= {sample.name for sample in family.samples}
    return names


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query of a dashboard."""
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(request.param.read_text())
    return loaded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


# --- the PromQL name parser itself -------------------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{route=~"/x.*"}[5m])))', {"a_seconds_bucket"}),
    ("deriv(sum by (g, t) (lag_sum)[10m:1m]) > 0 and sum by (g, t) (lag_sum) > 1e3", {"lag_sum"}),
    ('absent(up{job="facematch-indexer"} == 1)', {"up"}),
    ("sum(rate(x_total[$__rate_interval])) / sum(rate(y_total[5m] offset 1h))", {"x_total", "y_total"}),
    ('sum(rate(c_total{status="504"}[5m])) by (route) / on (route) group_left sum(d)', {"c_total", "d"}),
])
def test_metric_names_are_parsed_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_names_come_from_the_registry(exported: set[str]) -> None:
    assert {"kafka_consumergroup_lag", "facematch_records_total", "facematch_match_seconds_bucket",
            "facematch_http_requests_total", "up"} <= exported
    assert "facematch_records" not in exported  # a counter is queried with its _total


# --- alert rules -------------------------------------------------------------------------------

def test_alert_rules_query_only_exported_metrics(exported: set[str]) -> None:
    unknown = {rule["alert"]: sorted(metric_names(rule["expr"]) - exported) for rule in alert_rules()}
    unknown = {name: missing for name, missing in unknown.items() if missing}
    assert not unknown, f"alert rules query metrics pipeline/metrics.py does not export: {unknown}"


def test_alert_rules_cover_lag_dlq_timeouts_latency_and_down() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    assert "deriv(" in exprs and "kafka_consumergroup_lag_sum" in exprs
    assert "rate(facematch_dead_letters_total[" in exprs
    assert re.search(r'facematch_http_requests_total\{status="504"\}', exprs)
    assert re.search(r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(facematch_time_to_searchable_seconds_bucket",
                     exprs)
    assert 'up{job="facematch-indexer"}' in exprs and 'up{job="facematch-embedder"}' in exprs


def test_every_alert_has_a_severity_and_a_summary() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_prometheus_loads_the_rules_and_scrapes_the_jobs_the_rules_name() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert [PROMETHEUS.parent / f for f in config["rule_files"]] == [ALERTS]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    named = {m for rule in alert_rules() for m in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert named <= jobs, f"rules name jobs deploy/prometheus.yml does not have: {named - jobs}"


def test_promtool_checks_the_config_and_its_rules() -> None:
    promtool = require("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    promtool = require("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_the_rule_unit_tests() -> None:
    promtool = require("promtool", "prometheus")
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert {rule["alert"] for rule in alert_rules()} <= tested, "an alert without a promtool unit test"
    result = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana -----------------------------------------------------------------------------------

def _grafana_service(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"]["grafana"]
    return service


def test_grafana_image_is_pinned(compose: dict[str, Any]) -> None:
    image = _grafana_service(compose)["image"]
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", image), f"pin an exact version: {image}"


def test_dashboards_exist() -> None:
    assert DASHBOARDS, "no dashboard JSON in deploy/grafana/dashboards"


def test_dashboard_has_the_keys_grafana_needs(dashboard: dict[str, Any], compose: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    major = int(_grafana_service(compose)["image"].split(":")[1].split(".")[0])
    assert dashboard["schemaVersion"] == GRAFANA_SCHEMA[major], f"Grafana {major} writes schemaVersion " \
        f"{GRAFANA_SCHEMA[major]}"
    assert dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_panels_are_supported_types_with_queries_on_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), title
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"])["uid"] == uid, title


def test_dashboard_queries_only_exported_metrics(dashboard: dict[str, Any], exported: set[str]) -> None:
    unknown = {f"{title} / {target['refId']}": sorted(metric_names(target["expr"]) - exported)
               for title, target in dashboard_targets(dashboard)}
    unknown = {where: missing for where, missing in unknown.items() if missing}
    assert not unknown, f"panels query metrics pipeline/metrics.py does not export: {unknown}"


def test_dashboard_shows_lag_throughput_latencies_index_dlq_and_time_to_searchable(
        dashboard: dict[str, Any]) -> None:
    queried = set().union(*(metric_names(t["expr"]) for _, t in dashboard_targets(dashboard)))
    assert {"kafka_consumergroup_lag_sum", "facematch_records_total", "facematch_match_seconds_bucket",
            "facematch_http_request_seconds_bucket", "facematch_embed_batch_seconds_bucket",
            "facematch_image_fetch_seconds_bucket", "facematch_index_faces", "facematch_index_events",
            "facematch_dead_letters_total", "facematch_time_to_searchable_seconds_bucket"} <= queried
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dashboard))
    assert "sum by (consumergroup, topic) (kafka_consumergroup_lag_sum)" in exprs
    assert "sum by (stage, outcome) (rate(facematch_records_total" in exprs
    assert "sum by (stage, reason) (rate(facematch_dead_letters_total" in exprs
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(facematch_match_seconds_bucket" in exprs


def test_grafana_provisioning_matches_the_compose_mounts(compose: dict[str, Any]) -> None:
    mounts = dict(volume.split(":")[:2][::-1] for volume in _grafana_service(compose)["volumes"])
    assert Path(REPO / mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA / "provisioning").resolve()
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "facematch.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert Path(REPO / mounts[path]).resolve() == (GRAFANA / "dashboards").resolve()
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "prometheus" in compose["services"]
