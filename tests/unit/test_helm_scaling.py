"""Scaling and monitoring as rendered: KEDA / HPA on the gateways' queue signal, ServiceMonitors, alert rules, the
metrics port, and the NetworkPolicy admitting the chart's own scrapes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.unit.helm_render import FULL, NAMESPACE, REPO, container, env_of, render

pytest.importorskip("helm_python")


# -- scaling and monitoring ------------------------------------------------------------------------------------------


def test_engine_autoscaling_is_off_by_default(chart: Any) -> None:
    objs = render(chart)
    assert objs[("Deployment", f"{FULL}-engine")]["spec"]["replicas"] == 2
    assert not any(kind == "ScaledObject" for kind, _ in objs)
    assert ("HorizontalPodAutoscaler", f"{FULL}-engine") not in objs


def test_keda_scales_engines_on_the_gateway_queue(chart: Any) -> None:
    autoscaling = {"keda": {"enabled": True}, "minReplicas": 2, "maxReplicas": 6}
    values = {"engine": {"autoscaling": autoscaling}, "metrics": {"serviceMonitor": {"enabled": True}}}
    objs = render(chart, values)
    scaled = objs[("ScaledObject", f"{FULL}-engine")]["spec"]
    assert scaled["scaleTargetRef"] == {"name": f"{FULL}-engine"}
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (2, 6)
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    query = f'sum(max by (engine) (loragate_engine_waiting_requests{{namespace="{NAMESPACE}"}}))'
    assert trigger["metadata"]["query"] == query
    assert trigger["metadata"]["threshold"] == "4"
    assert "replicas" not in objs[("Deployment", f"{FULL}-engine")]["spec"]


def test_keda_can_scale_engines_on_slot_pressure(chart: Any) -> None:
    """The query values.yaml suggests for slot pressure renders as written (the namespace filled in)."""
    query = 'max(loragate_adapter_slots_wanted{namespace="{{ .Release.Namespace }}"})'
    autoscaling = {"keda": {"enabled": True}, "query": query, "targetPerReplica": 8}
    values = {"engine": {"autoscaling": autoscaling}, "metrics": {"serviceMonitor": {"enabled": True}}}
    [trigger] = render(chart, values)[("ScaledObject", f"{FULL}-engine")]["spec"]["triggers"]
    expected = f'max(loragate_adapter_slots_wanted{{namespace="{NAMESPACE}"}})'
    assert (trigger["metadata"]["query"], trigger["metadata"]["threshold"]) == (expected, "8")
    assert "loragate_adapter_slots_wanted" in (REPO / "helm" / "loragate" / "values.yaml").read_text()


def test_hpa_scales_engines_on_an_external_metric(chart: Any) -> None:
    values = {"engine": {"autoscaling": {"hpa": {"enabled": True}, "targetPerReplica": 3}}}
    objs = render(chart, values | {"metrics": {"serviceMonitor": {"enabled": True}}})
    hpa = objs[("HorizontalPodAutoscaler", f"{FULL}-engine")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == f"{FULL}-engine"
    [metric] = hpa["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "loragate_engine_waiting_requests"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert not any(kind == "ScaledObject" for kind, _ in objs)


def test_service_monitors_and_alert_rules_are_optional(chart: Any) -> None:
    objs = render(chart)
    assert not any(kind in ("ServiceMonitor", "PrometheusRule") for kind, _ in objs)
    on = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}})
    monitor = on[("ServiceMonitor", f"{FULL}-gateway")]["spec"]
    assert monitor["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    gateway_svc = on[("Service", f"{FULL}-gateway")]
    assert monitor["selector"]["matchLabels"].items() <= gateway_svc["metadata"]["labels"].items()
    assert ("ServiceMonitor", f"{FULL}-engine") in on
    rule = on[("PrometheusRule", FULL)]["spec"]
    assert rule["groups"], "the chart ships no alert rules"


def test_metrics_have_a_port_of_their_own_unless_told_otherwise(chart: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_module = pytest.importorskip("gateway.settings")
    on = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}})  # the default: port 9090
    gw = container(on, f"{FULL}-gateway", "gateway")
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in gw["ports"]
    for name, value in env_of(gw).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    assert (settings_module.Settings().port, settings_module.Settings().metrics_port) == (8080, 9090)
    ports = on[("Service", f"{FULL}-gateway")]["spec"]["ports"]
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in ports
    assert on[("ServiceMonitor", f"{FULL}-gateway")]["spec"]["endpoints"][0]["port"] == "metrics"
    pod = on[("Deployment", f"{FULL}-gateway")]["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/port"] == "9090"
    off = render(chart, {"gateway": {"metricsPort": None}})  # /metrics on the API port, no second port anywhere
    assert [p["name"] for p in container(off, f"{FULL}-gateway", "gateway")["ports"]] == ["http"]
    assert "LORAGATE_METRICS_PORT" not in env_of(container(off, f"{FULL}-gateway", "gateway"))
    assert [p["name"] for p in off[("Service", f"{FULL}-gateway")]["spec"]["ports"]] == ["http"]


def test_alert_rules_match_deploy_prometheus(chart: Any) -> None:
    """The chart's PrometheusRule carries exactly the alerts of deploy/prometheus/ (no drift between the two)."""
    rule_files = sorted((REPO / "deploy" / "prometheus").glob("alerts.y*ml"))
    if not rule_files:
        pytest.skip("deploy/prometheus/ has no alert rules file yet")
    expected = [group for path in rule_files for group in yaml.safe_load(path.read_text())["groups"]]
    rule = render(chart, {"metrics": {"prometheusRule": {"enabled": True}}})[("PrometheusRule", FULL)]
    assert rule["spec"]["groups"] == expected


# -- the autoscalers' inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("autoscaler", ["keda", "hpa"])
def test_an_autoscaler_without_a_service_monitor_fails_the_render(chart: Any, autoscaler: str) -> None:
    """KEDA's and the HPA's query reads the gateways' metrics from Prometheus: without a scrape it never scales."""
    helm = pytest.importorskip("helm_python")
    values: dict[str, Any] = {"engine": {"autoscaling": {autoscaler: {"enabled": True}}}}
    with pytest.raises(helm.HelmRenderError) as info:
        render(chart, values)
    assert (
        f"engine.autoscaling.{autoscaler} scales on loragate_engine_waiting_requests, which Prometheus has only if it "
        "scrapes the gateways: set metrics.serviceMonitor.enabled=true"
    ) in str(info.value)
    # A Prometheus that scrapes the gateways without the operator (the pods' prometheus.io annotations) says so.
    values["engine"]["autoscaling"]["requireServiceMonitor"] = False
    objs = render(chart, values)
    assert not any(kind == "ServiceMonitor" for kind, _ in objs)
    pod = objs[("Deployment", f"{FULL}-gateway")]["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/scrape"] == "true"


def test_replica_count_is_the_autoscalers_minimum(chart: Any) -> None:
    helm = pytest.importorskip("helm_python")
    monitored = {"metrics": {"serviceMonitor": {"enabled": True}}}

    def scaled(engine: dict[str, Any]) -> tuple[Any, Any, str]:
        objs = render(chart, {"engine": engine} | monitored)
        assert "replicas" not in objs[("Deployment", f"{FULL}-engine")]["spec"]  # the autoscaler owns it
        spec = (objs.get(("ScaledObject", f"{FULL}-engine")) or objs[("HorizontalPodAutoscaler", f"{FULL}-engine")])[
            "spec"
        ]
        low = spec.get("minReplicaCount", spec.get("minReplicas"))
        high = spec.get("maxReplicaCount", spec.get("maxReplicas"))
        return low, high, objs[("NOTES", "")]["text"]

    keda = {"keda": {"enabled": True}}
    low, high, notes = scaled({"replicaCount": 3, "autoscaling": keda})
    assert (low, high) == (3, 8)
    assert "autoscaled 3-8 vLLM pod(s)" in notes and "is not used" not in notes
    assert scaled({"replicaCount": 3, "autoscaling": {"hpa": {"enabled": True}}})[:2] == (3, 8)
    assert scaled({"replicaCount": 0, "autoscaling": keda})[:2] == (0, 8)  # KEDA scales to zero
    # An explicit minimum wins, and the notes say why replicaCount is not used.
    low, _, notes = scaled({"replicaCount": 3, "autoscaling": keda | {"minReplicas": 1}})
    assert low == 1
    assert "Note: engine.replicaCount (3) is not used: the autoscaler owns the replica count, and\n" in notes
    assert "engine.autoscaling.minReplicas (1) is its minimum. Set minReplicas to null" in notes
    # Where replicaCount cannot be the minimum, the render says why.
    for engine, message in [
        (
            {"replicaCount": 0, "autoscaling": {"hpa": {"enabled": True}}},
            "engine.autoscaling.hpa: a HorizontalPodAutoscaler cannot scale to zero",
        ),
        (
            {"replicaCount": 9, "autoscaling": keda},
            "engine.replicaCount (9) is the autoscaler's minimum and exceeds engine.autoscaling.maxReplicas (8)",
        ),
    ]:
        with pytest.raises(helm.HelmRenderError) as info:
            render(chart, {"engine": engine} | monitored)
        assert message in str(info.value)
    # Without an autoscaler replicaCount is the count, whatever the autoscaling block says.
    fixed = render(chart, {"engine": {"replicaCount": 9}})
    assert fixed[("Deployment", f"{FULL}-engine")]["spec"]["replicas"] == 9


# -- the chart's own scrapes through its NetworkPolicy ---------------------------------------------------------------


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels only, as the chart writes them); {} selects everything."""
    assert not (selector or {}).get("matchExpressions"), "extend _selects"
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


def _admits(policy: dict[str, Any], peer: dict[str, Any], port: tuple[str, int]) -> bool:
    """Whether a NetworkPolicy's ingress rules let `peer` ({labels, namespace, namespace_labels}) reach `port`."""
    for rule in policy["spec"].get("ingress", []):
        port_ok = not rule.get("ports") or any(p.get("port") in port for p in rule["ports"])
        sources = rule.get("from")
        peer_ok = not sources or any(
            ("podSelector" in src or "namespaceSelector" in src)
            and _selects(src.get("podSelector"), peer["labels"])
            and (
                _selects(src["namespaceSelector"], peer["namespace_labels"])
                if "namespaceSelector" in src
                else peer["namespace"] == policy["metadata"]["namespace"]
            )
            for src in sources
        )
        if port_ok and peer_ok:
            return True
    return False


def _scrape_targets(objs: dict[tuple[str, str], Any]) -> list[tuple[str, dict[str, str], tuple[str, int]]]:
    """(ServiceMonitor, pod labels, (port name, number)) for every pod each ServiceMonitor endpoint scrapes."""
    targets = []
    for (kind, name), monitor in objs.items():
        if kind != "ServiceMonitor":
            continue
        services = [
            o
            for (k, _), o in objs.items()
            if k == "Service" and _selects(monitor["spec"]["selector"], o["metadata"]["labels"])
        ]
        assert services, f"ServiceMonitor {name} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            for service in services:
                [svc_port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
                for (k, _), deployment in objs.items():
                    labels = deployment["spec"]["template"]["metadata"]["labels"] if k == "Deployment" else {}
                    if k != "Deployment" or not _selects({"matchLabels": service["spec"]["selector"]}, labels):
                        continue
                    ports = [p for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
                    [target] = [p for p in ports if p["name"] == svc_port["targetPort"]]
                    targets.append((name, labels, (target["name"], target["containerPort"])))
    return targets


def _prometheus(namespace: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "labels": labels or {"app.kubernetes.io/name": "prometheus", "operator.prometheus.io/name": "k8s"},
        "namespace": namespace,
        "namespace_labels": {"kubernetes.io/metadata.name": namespace},
    }


def test_the_default_network_policy_admits_the_charts_own_scrapes(chart: Any) -> None:
    objs = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}})
    policies = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    targets = _scrape_targets(objs)
    assert sorted((name, port) for name, _, port in targets) == [
        (f"{FULL}-engine", ("http", 8000)),  # vLLM's /metrics on its API port
        (f"{FULL}-gateway", ("metrics", 9090)),
    ]

    def reachable(peer: dict[str, Any], labels: dict[str, str], port: tuple[str, int]) -> bool:
        guarding = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        return all(_admits(p, peer, port) for p in guarding)

    prometheus = _prometheus("monitoring")  # the values' default: the operator's pods in `monitoring`
    for name, labels, port in targets:
        assert reachable(prometheus, labels, port), f"{name} cannot scrape {labels['app.kubernetes.io/component']}"
    engine_targets = [(labels, port) for name, labels, port in targets if name == f"{FULL}-engine"]
    # Only that Prometheus: the same labels elsewhere, or another pod in monitoring, still cannot reach vLLM.
    for peer in (_prometheus("team-a"), _prometheus("monitoring", {"app": "grafana"})):
        assert not any(reachable(peer, labels, port) for labels, port in engine_targets)
    gateway_pod = _prometheus(
        NAMESPACE, objs[("Deployment", f"{FULL}-gateway")]["spec"]["template"]["metadata"]["labels"]
    )
    assert all(reachable(gateway_pod, labels, port) for labels, port in engine_targets)

    # A Prometheus in the release's own namespace (namespace ""), with labels of its own.
    values = {"serviceMonitor": {"enabled": True, "prometheus": {"namespace": "", "podLabels": {"app": "prom"}}}}
    objs = render(chart, {"metrics": values})
    policies = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    assert all(reachable(_prometheus(NAMESPACE, {"app": "prom"}), labels, port) for labels, port in engine_targets)
    assert not any(reachable(_prometheus("monitoring", {"app": "prom"}), lb, port) for lb, port in engine_targets)
    # No engine scrape, no Prometheus rule: only the gateways reach the engine port.
    values = {"serviceMonitor": {"enabled": True, "scrapeEngines": False}}
    [policy] = [o for (kind, _), o in render(chart, {"metrics": values}).items() if kind == "NetworkPolicy"]
    assert len(policy["spec"]["ingress"]) == 1
