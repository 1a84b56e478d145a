"""The Grafana dashboard and the Prometheus config/alerts query only metrics the gateway exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "loragate.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    GatewayMetrics(registry=registry)
    names: set[str] = set()
    for family in registry.collect():
        suffixes = SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, labels or variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # grouping labels
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    found = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call is None and name not in KEYWORDS:
            found.add(name)
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"${variable['name']}", query["query"] if isinstance(query, dict) else query


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (adapter) (rate(loragate_requests_total{adapter=~"$adapter"}[$__rate_interval]))',
            {"loragate_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (adapter, le) (rate(loragate_ttft_seconds_bucket[5m]))) > 5",
            {"loragate_ttft_seconds_bucket"},
        ),
        ("max by (engine) (loragate_engine_up) == 0 and on (engine) up", {"loragate_engine_up", "up"}),
        ("label_values(loragate_requests_total, adapter)", {"loragate_requests_total", "adapter"}),
        ('sum(rate(x_total{a="b{c}"}[1m])) / 2e3', {"x_total"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_names_include_suffixed_series() -> None:
    names = exported_names()
    assert {"loragate_requests_total", "loragate_time_to_first_token_seconds_bucket", "loragate_engine_up"} <= names
    assert {
        "loragate_adapter_resident",
        "loragate_engine_free_adapter_slots",
        "loragate_engine_waiting_requests",
    } <= names
    assert "loragate_requests" not in names  # a counter is only exported with its _total suffix
    assert all(name.startswith("loragate_") for name in names)


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "loragate-adapters"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"].strip("${}") in variables
            assert panel["targets"], panel["title"]


def test_every_dashboard_query_names_exported_metrics() -> None:
    exported = exported_names()
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for title, expr in dashboard_queries(dashboard):
        names = metric_names(expr) - {"adapter"} if expr.startswith("label_values") else metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported by the gateway"
        used |= names
    # the panels the issue asks for: traffic, latency, tokens, errors, load events, engine saturation
    for needed in (
        "loragate_requests_total",
        "loragate_request_duration_seconds_bucket",
        "loragate_time_to_first_token_seconds_bucket",
        "loragate_prompt_tokens_total",
        "loragate_completion_tokens_total",
        "loragate_adapter_loads_total",
        "loragate_adapter_evictions_total",
        "loragate_adapter_load_failures_total",
        "loragate_engine_waiting_requests",
        "loragate_engine_inflight_requests",
        "loragate_engine_free_adapter_slots",
    ):
        assert needed in used, needed


def test_a_typo_in_a_query_would_be_caught() -> None:
    exported = exported_names()
    assert metric_names("sum(rate(loragate_request_total[5m]))") - exported == {"loragate_request_total"}
    assert metric_names("histogram_quantile(0.9, rate(loragate_adapter_load_seconds[5m]))") - exported == {
        "loragate_adapter_load_seconds"
    }


def test_alert_rules_reference_exported_metrics() -> None:
    exported = exported_names()
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "LoragateEngineDown",
        "LoragateAdapterErrorRate",
        "LoragateAdapterLoadFailures",
        "LoragateHighTTFT",
    }
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_prometheus_config_scrapes_the_gateway_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS.parent / config["rule_files"][0]).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["loragate-gateway"]["metrics_path"] == "/metrics"
    keep = jobs["loragate-gateway"]["relabel_configs"][0]
    assert (keep["action"], keep["regex"]) == ("keep", "loragate;gateway")
